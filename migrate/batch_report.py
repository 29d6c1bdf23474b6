"""BATCH, report and progress: what happened to each module, as it happens.

`ModuleOutcome` (one module: family, status, exit code and one-line error,
timings, parity), `BatchReport` (every outcome in the order of the sources:
JSON, CSV, an HTML page, a table, the exit code, and the summary a person
acts on: counts by outcome and by family, failures grouped by cause with one
example each, the slowest modules) and `Progress` (sent to `on_progress`
while the batch runs). Every text that reaches a report is escaped
(`errors.printable`): paths and messages quote module text.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import datetime
import heapq
import io
import json
import os
import re
from typing import Any, Mapping, Optional

from migrate import batch_family
from migrate import errors
from migrate import fileutil

STATUS_CONVERTED = "converted"
STATUS_SKIPPED = "skipped (up to date)"
STATUS_FAILED = "failed"

# `--report` files, by extension.
REPORT_FORMATS = {".json": "json", ".csv": "csv", ".html": "html", ".htm": "html"}

# The end-of-run summary: the slowest modules shown; at most this many
# families and causes of failure in the terminal (all of them in the HTML).
SLOWEST = 5
MAX_SUMMARY_ROWS = 15


def now_iso() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass
class ModuleOutcome:
  """What happened to one module."""

  source: str
  destination: str
  kind: str
  status: str  # STATUS_CONVERTED, STATUS_SKIPPED or STATUS_FAILED.
  family: str = batch_family.UNKNOWN  # The model family (`batch_family`).
  exit_code: int = 0
  error: Optional[str] = None  # The one-line MigrationError text.
  source_sha256: Optional[str] = None
  seconds: float = 0.0  # Wall time of the worker (0 when skipped).
  stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
  parity_passed: Optional[bool] = None
  parity_checks: int = 0
  parity_failures: int = 0
  parity_summary: Optional[str] = None
  signature: Optional[str] = None
  output_key: Optional[str] = None
  finished_at: Optional[str] = None  # When it was converted (or failed).

  @property
  def failed(self) -> bool:
    return self.status == STATUS_FAILED


def parity_fields(report_json: Optional[str]) -> dict[str, Any]:
  """ModuleOutcome's parity fields from a ParityReport's JSON (none if unreadable)."""
  if not report_json:
    return {}
  try:
    data = json.loads(report_json)
  except ValueError:
    return {}
  checks = data.get("checks", [])
  return {"parity_passed": bool(data.get("passed")),
          "parity_checks": len(checks),
          "parity_failures": sum(1 for c in checks if not c.get("passed", True))}


_CSV_COLUMNS = ("source", "destination", "kind", "family", "status", "exit_code",
                "error", "seconds", "read_s", "build_s", "export_s", "verify_s",
                "parity_passed", "parity_checks", "parity_failures",
                "parity_summary", "source_sha256", "signature", "output_key",
                "finished_at")


@dataclasses.dataclass
class BatchReport:
  """Every module's outcome, in the order of the sources."""

  dst_root: str
  jobs: int
  started_at: str
  seconds: float
  modules: list[ModuleOutcome]
  state_path: str

  def count(self, status: str) -> int:
    return sum(1 for m in self.modules if m.status == status)

  @property
  def counts(self) -> dict[str, int]:
    return {"total": len(self.modules),
            STATUS_CONVERTED: self.count(STATUS_CONVERTED),
            STATUS_SKIPPED: self.count(STATUS_SKIPPED),
            STATUS_FAILED: self.count(STATUS_FAILED)}

  @property
  def failures(self) -> list[ModuleOutcome]:
    return [m for m in self.modules if m.failed]

  @property
  def exit_code(self) -> int:
    return errors.ExitCode.BATCH_FAILURES if self.failures else errors.ExitCode.OK

  def summary(self) -> str:
    c = self.counts
    unverified = sum(1 for m in self.modules
                     if m.status == STATUS_CONVERTED and not m.parity_passed)
    converted = (f"{c[STATUS_CONVERTED]} converted and verified" if not unverified
                 else f"{c[STATUS_CONVERTED]} converted ({unverified} not "
                      f"verified)")
    return (f"{c['total']} modules: {converted}, {c[STATUS_SKIPPED]} up to date, "
            f"{c[STATUS_FAILED]} "
            f"failed, in {self.seconds:.1f}s with {self.jobs} worker(s)")

  def to_dict(self) -> dict[str, Any]:
    """The report as plain data; every text escaped (`errors.printable`):
    paths and messages quote module text, and a path that is not UTF-8
    could not be written otherwise."""
    return _printable({
        "dst_root": self.dst_root, "jobs": self.jobs,
        "started_at": self.started_at, "seconds": round(self.seconds, 3),
        "state": self.state_path, "counts": self.counts,
        "exit_code": int(self.exit_code),
        "modules": [dataclasses.asdict(m) for m in self.modules]})

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  def to_csv(self) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for m in self.modules:
      row = {k: v for k, v in dataclasses.asdict(m).items() if k in _CSV_COLUMNS}
      for stage in ("read", "build", "export", "verify"):
        value = m.stage_seconds.get(stage)
        row[f"{stage}_s"] = "" if value is None else f"{value:.3f}"
      row["seconds"] = f"{m.seconds:.3f}"
      writer.writerow({k: ("" if v is None else _printable(v))
                       for k, v in row.items()})
    return out.getvalue()

  def to_html(self) -> str:
    # report_html imports this module (its helpers): imported here, when used.
    from migrate import report_html  # pylint: disable=g-import-not-at-top
    data = self.to_dict()
    return report_html.render(data, summarize(data))

  def render(self, path: str) -> str:
    """The report as JSON, CSV or an HTML page, by `path`'s extension
    (`REPORT_FORMATS`)."""
    return {"json": self.to_json, "csv": self.to_csv,
            "html": self.to_html}[report_format(path)]()

  def write(self, path: str) -> None:
    """Writes `render(path)` to `path`, atomically."""
    try:
      fileutil.atomic_write(path, self.render(path))
    except OSError as e:
      raise errors.OutputError(
          f"{path}: expected a writable report file, found "
          f"{type(e).__name__}: {e.strerror or e}") from None

  def format_summary(self) -> str:
    """The end of a run in the terminal: a screen at most, whatever the
    number of modules (`summarize`); the last line is `summary()`."""
    return format_summary(summarize(self.to_dict()), self.summary())

  def format_table(self) -> str:
    rows = [("module", "family", "status", "time", "parity", "error")]
    for m in self.modules:
      parity = (f"{m.parity_checks - m.parity_failures}/{m.parity_checks}"
                if m.parity_checks else "-")
      error = ""
      if m.error:
        error = f"[{m.exit_code}] {m.error}"
        error = error if len(error) <= 160 else error[:157] + "..."
      rows.append((errors.printable(relative_path(m.destination, self.dst_root)),
                   m.family, m.status,
                   f"{m.seconds:.1f}s" if m.seconds else "-", parity,
                   errors.printable(error)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join([v.ljust(w) for v, w in zip(r[:5], widths)] + [r[5]]).rstrip()
             for r in rows]
    lines.append(self.summary())
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Progress:
  """Sent to `on_progress`: after planning, on each start/finish, and every ~1 s."""

  event: str  # "planned", "started", "finished" or "tick".
  total: int  # Modules to convert in this run (without the up-to-date ones).
  done: int
  running: int
  converted: int
  failed: int
  skipped: int  # Up to date, not counted in `total`.
  elapsed: float
  module: Optional[str] = None
  outcome: Optional[ModuleOutcome] = None

  @property
  def eta_seconds(self) -> Optional[float]:
    if self.done == 0 or self.total <= self.done:
      return None if self.total > self.done else 0.0
    return self.elapsed / self.done * (self.total - self.done)

  def describe(self) -> str:
    eta = self.eta_seconds
    eta_text = "?" if eta is None else str(datetime.timedelta(seconds=round(eta)))
    return (f"{self.done}/{self.total} done ({self.converted} converted, "
            f"{self.failed} failed; {self.skipped} up to date), "
            f"{self.running} running, elapsed "
            f"{datetime.timedelta(seconds=round(self.elapsed))}, ETA {eta_text}")


def one_line(error: BaseException) -> str:
  """The error's cause, escaped, as one line of any length."""
  return errors.printable(errors.first_line(error, limit=None))


def report_format(path: str) -> str:
  """The format of a `--report` file by its extension: json, csv or html."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in REPORT_FORMATS:
    raise errors.UsageError(
        f"{path}: expected a report file ending in .json, .csv or .html, found "
        f"{repr(ext) if ext else 'no extension'}")
  return REPORT_FORMATS[ext]


# What differs between two modules failing for the same reason.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATH = re.compile(r"(?<![\w.])/[^\s'\",;()]+")
_NUMBER = re.compile(r"\b\d+(\.\d+)?\b")
CAUSE_WORDS = 16


def failure_cause(error: Optional[str], source: str = "") -> str:
  """The cause of a failure, to group failures by: the first words of the
  error line, without the module's own path (which it starts with), other
  paths, quoted names and numbers."""
  text = error or ""
  if source and text.startswith(source):
    text = text[len(source):]
  if text.startswith(("/", ":")):  # A path inside the module, or another one.
    text = text.split(": ", 1)[-1]
  text = _NUMBER.sub("N", _PATH.sub("…", _QUOTED.sub("'…'", text)))
  words = text.split()
  return " ".join(words[:CAUSE_WORDS]) + (" …" if len(words) > CAUSE_WORDS else "")


def _exit_name(code: int) -> str:
  try:
    return errors.ExitCode(code).name.lower()
  except ValueError:
    return "unknown"


def relative_path(path: str, root: str) -> str:
  """`path` relative to `root` if it is inside it (as the tables show it)."""
  root = root.rstrip(os.sep)
  return path[len(root) + 1:] if root and path.startswith(root + os.sep) else path


def summarize(data: Mapping[str, Any]) -> dict[str, Any]:
  """What a person needs to act on, from a report's plain data (`to_dict`):
  the counts by outcome and by family (most modules first), the failures
  grouped by exit code and cause (most first) with a count and one example,
  and the `SLOWEST` modules."""
  modules = data.get("modules", [])
  root = data.get("dst_root", "")
  by_family: dict[str, collections.Counter] = collections.defaultdict(
      collections.Counter)
  groups: dict[tuple[int, str], list] = {}
  for m in modules:
    by_family[m.get("family") or batch_family.UNKNOWN][m.get("status")] += 1
    if m.get("status") == STATUS_FAILED:
      key = (int(m.get("exit_code") or 0),
             failure_cause(m.get("error"), m.get("source") or ""))
      groups.setdefault(key, []).append(m)
  families = [{"family": name, "total": sum(c.values()),
               **{status: c[status] for status in
                  (STATUS_CONVERTED, STATUS_SKIPPED, STATUS_FAILED)}}
              for name, c in by_family.items()]
  families.sort(key=lambda f: (-f["total"], f["family"]))
  failures = [{"exit_code": code, "exit_name": _exit_name(code), "cause": cause,
               "count": len(ms), "example": ms[0].get("source"),
               "example_error": ms[0].get("error")}
              for (code, cause), ms in groups.items()]
  failures.sort(key=lambda f: (-f["count"], f["exit_code"], f["cause"]))
  timed = [m for m in modules if m.get("seconds")]
  slowest = heapq.nlargest(SLOWEST, timed, key=lambda m: float(m["seconds"]))
  return {"counts": dict(data.get("counts", {})), "families": families,
          "failures": failures,
          "slowest": [{"module": relative_path(m.get("destination", ""), root),
                       "source": m.get("source"), "family": m.get("family"),
                       "seconds": float(m["seconds"]),
                       "stage_seconds": m.get("stage_seconds") or {}}
                      for m in slowest]}


def format_stages(stage_seconds: Mapping[str, float]) -> str:
  return ", ".join(f"{k} {v:.1f}s" for k, v in stage_seconds.items())


def _not_listed(rows: list, what: str, modules_key: str) -> list[str]:
  """The line that counts the rows beyond `MAX_SUMMARY_ROWS` (if any)."""
  rest = rows[MAX_SUMMARY_ROWS:]
  if not rest:
    return []
  return [f"... {len(rest)} more {what} ({sum(r[modules_key] for r in rest)} modules)"]


def format_summary(summary: Mapping[str, Any], last_line: str) -> str:
  """`summarize`'s data as lines for the terminal: families and causes beyond
  `MAX_SUMMARY_ROWS` are counted, not listed (the report files list all)."""
  lines = []
  families = summary["families"]
  if families:
    rows = [("family", "modules", "converted", "up to date", "failed")]
    rows += [(f["family"], str(f["total"]), str(f[STATUS_CONVERTED]),
              str(f[STATUS_SKIPPED]), str(f[STATUS_FAILED]))
             for f in families[:MAX_SUMMARY_ROWS]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join([r[0].ljust(widths[0])] +
                        [v.rjust(w) for v, w in zip(r[1:], widths[1:])])
              for r in rows]
    lines += _not_listed(families, "families", "total")
  failures = summary["failures"]
  if failures:
    lines.append(f"failures by cause ({sum(f['count'] for f in failures)} "
                 f"modules, {len(failures)} causes):")
    for f in failures[:MAX_SUMMARY_ROWS]:
      lines.append(f"  {f['count']:>5}  exit {f['exit_code']} ({f['exit_name']}): "
                   f"{f['cause']}")
      lines.append(f"         e.g. {f['example']}")
    lines += _not_listed(failures, "causes", "count")
  if summary["slowest"]:
    lines.append("slowest:")
    for m in summary["slowest"]:
      stages = format_stages(m["stage_seconds"])
      lines.append(f"  {m['seconds']:>8.1f}s  {m['module']} ({m['family']}"
                   f"{'; ' + stages if stages else ''})")
  lines.append(last_line)
  return "\n".join(errors.printable(line) for line in lines)


def _printable(value: Any) -> Any:
  """`value` with every string in it escaped by `errors.printable`."""
  if isinstance(value, str):
    return errors.printable(value)
  if isinstance(value, dict):
    return {_printable(k): _printable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_printable(v) for v in value]
  return value

