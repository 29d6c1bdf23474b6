"""BATCH, report and progress: what happened to each module, as it happens.

`ModuleOutcome` (one module: family, status, exit code and one-line error, timings,
parity), `BatchReport` (every outcome in the order of the sources: a table,
JSON, CSV, the exit code) and `Progress` (sent to `on_progress` while the
batch runs). Every text that reaches a report is escaped
(`errors.printable`): paths and messages quote module text.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import os
from typing import Any, Optional

from migrate import batch_family
from migrate import errors
from migrate import fileutil

STATUS_CONVERTED = "converted"
STATUS_SKIPPED = "skipped (up to date)"
STATUS_FAILED = "failed"


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


_CSV_COLUMNS = ("source", "destination", "kind", "family", "status", "exit_code", "error",
                "seconds", "read_s", "build_s", "export_s", "verify_s",
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
    return (f"{c['total']} modules: {c[STATUS_CONVERTED]} converted and "
            f"verified, {c[STATUS_SKIPPED]} up to date, {c[STATUS_FAILED]} "
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

  def write(self, path: str) -> None:
    """Writes the report as CSV if `path` ends in .csv, else as JSON (atomically)."""
    text = self.to_csv() if path.lower().endswith(".csv") else self.to_json()
    fileutil.atomic_write(path, text)

  def format_table(self) -> str:
    def rel(path: str) -> str:
      inside = path.startswith(self.dst_root + os.sep)
      return os.path.relpath(path, self.dst_root) if inside else path
    rows = [("module", "status", "time", "parity", "error")]
    for m in self.modules:
      parity = (f"{m.parity_checks - m.parity_failures}/{m.parity_checks}"
                if m.parity_checks else "-")
      error = ""
      if m.error:
        error = f"[{m.exit_code}] {m.error}"
        error = error if len(error) <= 160 else error[:157] + "..."
      rows.append((errors.printable(rel(m.destination)), m.status,
                   f"{m.seconds:.1f}s" if m.seconds else "-", parity,
                   errors.printable(error)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join([v.ljust(w) for v, w in zip(r[:4], widths)] + [r[4]]).rstrip()
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


def _printable(value: Any) -> Any:
  """`value` with every string in it escaped by `errors.printable`."""
  if isinstance(value, str):
    return errors.printable(value)
  if isinstance(value, dict):
    return {_printable(k): _printable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_printable(v) for v in value]
  return value

