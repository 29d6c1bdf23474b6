"""Batch conversion: many TF1 Hub modules, each converted and verified in its own worker.

    sources = discover("old_modules/", "new_models/")      # or read_manifest(...)
    report = run_batch(sources, "new_models/", jobs=2, timeout=3600)
    report.exit_code                                       # 0, or 10 if any failed

A source is a module directory, a `.tar.gz` module archive (as tfhub.dev served
them: the module files at the archive root) or an http(s) URL that
`hub.resolve` accepts. Each module runs in a fresh spawned process
(`isolation.run_isolated`): a TensorFlow crash, abort, memory blow-up or hang
costs only that module. `jobs` modules run at a time.

Resumable: `DST_ROOT/.migrate-batch-state.json` (rewritten atomically after
every module) records each module's outcome with the sha256 of its source; a
rerun skips the modules converted and verified from the same source with the
same options (and whose DST still exists) and retries the rest. Archives are
extracted into `DST_ROOT/.migrate-batch/tmp/<pid>-*` (removed afterwards, or
by the next run if this one was killed); downloads are cached in
`DST_ROOT/.migrate-batch/tfhub_cache`.

This module never imports TensorFlow in the calling process and never prints:
progress goes to the `on_progress` callback, results into a `BatchReport`.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
import urllib.parse
import zlib
from typing import Any, Callable, Iterable, Optional, Sequence

from migrate import errors
from migrate import fileutil
from migrate import isolation
from migrate import keras_format
from migrate import preflight
from migrate import staging

STATE_FILENAME = ".migrate-batch-state.json"
WORK_DIRNAME = ".migrate-batch"
STATE_VERSION = 1
MODULE_DEF_FILENAME = preflight.MODULE_DEF_FILENAME
SAVED_MODEL_FILENAME = preflight.SAVED_MODEL_FILENAME
MODEL_CARD_FILENAME = staging.MODEL_CARD_FILENAME
MODEL_CARD_TITLE = staging.MODEL_CARD_TITLE
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")

KIND_DIRECTORY = "directory"
KIND_ARCHIVE = "archive"
KIND_URL = "url"

STATUS_CONVERTED = "converted"
STATUS_SKIPPED = "skipped (up to date)"
STATUS_FAILED = "failed"

# Safety limits for extracting a module archive: those of a module directory.
MAX_ARCHIVE_BYTES = fileutil.MAX_SOURCE_BYTES
MAX_ARCHIVE_MEMBERS = fileutil.MAX_SOURCE_ENTRIES
MAX_MANIFEST_BYTES = 64 << 20  # Hundreds of thousands of rows.


class ManifestError(errors.MigrationError):
  """The manifest CSV is malformed (a usage error)."""

  exit_code = errors.ExitCode.USAGE


# -- what to convert -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ConvertOptions:
  """Options of `convert.convert` shared by every module of a batch."""

  signature: Optional[str] = None
  output_key: Optional[str] = None
  keep_output_dropout: bool = False
  verify: bool = True
  keep_failed: bool = False
  allow_unsafe_ops: bool = False
  # Replace an existing DST that this batch did not make (one it made from an
  # older source, or whose conversion was interrupted, is always replaced).
  overwrite: bool = False
  # keras_format.FORMAT_SAVEDMODEL, or FORMAT_KERAS: each DST is then
  # `<destination>.keras`, a native Keras 3 model (see `output_destinations`).
  output_format: str = keras_format.FORMAT_SAVEDMODEL

  def fingerprint(self) -> dict[str, Any]:
    """The options that change the output: a record is reused only if equal."""
    fp = {"signature": self.signature, "output_key": self.output_key,
          "keep_output_dropout": self.keep_output_dropout,
          "verify": self.verify, "allow_unsafe_ops": self.allow_unsafe_ops}
    if self.output_format != keras_format.FORMAT_SAVEDMODEL:
      fp["output_format"] = self.output_format  # (Older records: SavedModels.)
    return fp


def output_destinations(sources: Sequence["Source"], output_format: str
                        ) -> list["Source"]:
  """`sources` with the destinations of `output_format`: `.keras` files for
  FORMAT_KERAS (a destination already ending in `.keras` is kept)."""
  if output_format != keras_format.FORMAT_KERAS:
    return list(sources)
  return [s if keras_format.is_keras_path(s.destination) else
          dataclasses.replace(s, destination=s.destination + keras_format.SUFFIX)
          for s in sources]


@dataclasses.dataclass(frozen=True)
class Source:
  """One module to convert: where it is, where its output goes."""

  location: str  # Absolute path (directory or archive) or URL.
  kind: str  # KIND_DIRECTORY, KIND_ARCHIVE or KIND_URL.
  destination: str  # Absolute path of the converted model.
  signature: Optional[str] = None  # Per-module overrides of ConvertOptions.
  output_key: Optional[str] = None
  # What a discovered source must stay inside (SRC_ROOT): a symlink out of it
  # is refused. None: the source itself is the boundary (manifest rows).
  root: Optional[str] = None

  @property
  def name(self) -> str:
    return self.location


def is_url(location: str) -> bool:
  return urllib.parse.urlparse(location).scheme in ("http", "https")


def _is_archive(path: str) -> bool:
  return path.endswith(ARCHIVE_SUFFIXES)


def _archive_stem(name: str) -> str:
  for suffix in ARCHIVE_SUFFIXES:
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


def _kind(location: str) -> str:
  if is_url(location):
    return KIND_URL
  if os.path.isfile(location) and _is_archive(location):
    return KIND_ARCHIVE
  return KIND_DIRECTORY


def discover(src_root: str, dst_root: str) -> list[Source]:
  """Finds TF1 Hub modules under `src_root`: a mirrored tree under `dst_root`.

  A directory holding `tfhub_module.pb` is a module (its subdirectories are
  not searched); `*.tar.gz` / `*.tgz` files are module archives
  (`x/foo.tar.gz` -> `DST_ROOT/x/foo`). Hidden directories and `dst_root`
  itself are skipped. If `src_root` is itself a module or an archive, its
  output is `DST_ROOT/<its name>`.
  """
  src_root = os.path.abspath(src_root)
  dst_root = os.path.abspath(dst_root)
  if not os.path.exists(src_root):
    raise errors.InputNotFoundError(f"{src_root}: no such file or directory")
  if os.path.isfile(src_root):
    if not _is_archive(src_root):
      raise errors.InputNotFoundError(
          f"{src_root}: expected a directory of TF1 Hub modules or a .tar.gz "
          f"module archive, found another file")
    name = _archive_stem(os.path.basename(src_root))
    return [Source(src_root, KIND_ARCHIVE, os.path.join(dst_root, name))]
  if os.path.isfile(os.path.join(src_root, MODULE_DEF_FILENAME)):
    return [Source(src_root, KIND_DIRECTORY,
                   os.path.join(dst_root, os.path.basename(src_root)))]
  # The walk lists symlinks without following them; a module reached through
  # one is checked against SRC_ROOT when it is planned (`Source.root`).
  sources = []
  for root, dirs, files in os.walk(src_root):
    dirs.sort()
    files.sort()
    keep = []
    for d in dirs:
      full = os.path.join(root, d)
      if d.startswith(".") or full == dst_root:
        continue
      if os.path.isfile(os.path.join(full, MODULE_DEF_FILENAME)):
        rel = os.path.relpath(full, src_root)
        sources.append(Source(full, KIND_DIRECTORY, os.path.join(dst_root, rel),
                              root=src_root))
      else:
        keep.append(d)
    dirs[:] = keep
    for f in files:
      if _is_archive(f) and not f.startswith("."):
        full = os.path.join(root, f)
        rel = os.path.relpath(os.path.join(root, _archive_stem(f)), src_root)
        sources.append(Source(full, KIND_ARCHIVE, os.path.join(dst_root, rel),
                              root=src_root))
  return sorted(sources, key=lambda s: s.destination)


def _default_destination_name(location: str) -> str:
  if is_url(location):
    path = urllib.parse.urlparse(location).path.rstrip("/")
    parts = [p for p in path.split("/") if p]
    if not parts:
      raise ManifestError(f"{location}: expected a URL with a path, found none "
                          f"(give a destination)")
    name = _archive_stem(parts[-1])
    # tfhub.dev handles end in a version number: publisher/model/1 -> model_1.
    if name.isdigit() and len(parts) > 1:
      name = f"{_archive_stem(parts[-2])}_{name}"
    return name
  return _archive_stem(os.path.basename(os.path.normpath(location)))


def read_manifest(manifest: str, src_root: str, dst_root: str) -> list[Source]:
  """Reads a CSV with columns source, destination[, signature, output_key].

  Relative sources resolve under `src_root`, relative destinations under
  `dst_root`; an empty destination is the source's name. A destination may
  not leave `dst_root` through `..`, and two rows may not share one.
  """
  src_root = os.path.abspath(src_root)
  dst_root = os.path.abspath(dst_root)
  try:
    # A regular file of sane size: a FIFO or /dev/zero must not block.
    text = fileutil.read_regular_file(manifest, max_bytes=MAX_MANIFEST_BYTES)
    rows = list(csv.DictReader(io.StringIO(text.decode("utf-8-sig"), newline="")))
    header = [h.strip() for h in (rows[0].keys() if rows else [])]
  except FileNotFoundError:
    raise errors.InputNotFoundError(f"{manifest}: no such manifest file") from None
  except errors.MigrationError as e:
    raise ManifestError(str(e)) from None
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise ManifestError(f"{manifest}: expected a UTF-8 CSV file, found "
                        f"{type(e).__name__}: {e}") from None
  if not rows:
    raise ManifestError(f"{manifest}: expected a header (source, destination"
                        f"[, signature, output_key]) and rows, found none")
  known = {"source", "destination", "signature", "output_key"}
  unknown = sorted(set(header) - known)
  if "source" not in header or unknown:
    raise ManifestError(
        f"{manifest}: expected columns source, destination[, signature, "
        f"output_key], found {', '.join(header)}")
  sources = []
  seen: dict[str, int] = {}
  for line, row in enumerate(rows, start=2):
    row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
    location = row.get("source", "")
    if not location:
      raise ManifestError(f"{manifest}:{line}: expected a source, found none")
    if not is_url(location):
      location = os.path.normpath(os.path.join(src_root, location))
    dest = row.get("destination") or _default_destination_name(location)
    if not os.path.isabs(dest):
      dest = os.path.normpath(os.path.join(dst_root, dest))
      if dest == dst_root or not dest.startswith(dst_root + os.sep):
        raise ManifestError(
            f"{manifest}:{line}: expected a destination inside {dst_root}, "
            f"found {row.get('destination')!r}")
    if dest in seen:
      raise ManifestError(
          f"{manifest}:{line}: expected a destination of its own, found "
          f"{dest} also on line {seen[dest]}")
    seen[dest] = line
    sources.append(Source(location, _kind(location), dest,
                          signature=row.get("signature") or None,
                          output_key=row.get("output_key") or None))
  return sources


# -- content hashes --------------------------------------------------------------

tree_sha256 = fileutil.tree_sha256


def source_sha256(location: str, kind: str) -> str:
  """The content hash of a local source (archive file or module directory):
  every byte that conversion reads (files reached through symlinks inside the
  module included). FIFOs, devices and links out of it are refused before
  anything opens them, so planning cannot block."""
  if kind == KIND_ARCHIVE:
    return fileutil.file_sha256(location)
  return fileutil.tree_sha256(location)


def _source_size(source: Source) -> int:
  """Bytes of a local source; refuses what `source_sha256` refuses."""
  if source.kind == KIND_ARCHIVE:
    os.close(fileutil.open_regular(source.location))
    size = os.path.getsize(source.location)
    if size > MAX_ARCHIVE_BYTES:
      raise errors.CorruptModuleError(
          f"{source.location}: expected an archive of at most "
          f"{MAX_ARCHIVE_BYTES} bytes, found {size}")
    return size
  if source.kind == KIND_DIRECTORY:
    return sum(f.size for f in fileutil.source_files(source.location))
  return 0


# -- archives --------------------------------------------------------------------

def extract_archive(archive: str, dest: str, *,
                    max_bytes: int = MAX_ARCHIVE_BYTES,
                    max_members: int = MAX_ARCHIVE_MEMBERS) -> str:
  """Extracts a module archive safely into the new directory `dest`.

  Only regular files and directories, no absolute paths or `..` (tarfile's
  'data' filter as well), at most `max_members` entries and `max_bytes`
  bytes. Returns the module directory: `dest`, or its only subdirectory if
  the files sit one level down.
  """
  def corrupt(found: str) -> errors.MigrationError:
    return errors.CorruptModuleError(
        f"{archive}: expected a gzipped tar archive of a TF1 Hub module, "
        f"found {found}")

  os.makedirs(dest)
  try:
    with os.fdopen(fileutil.open_regular(archive), "rb") as raw, \
         tarfile.open(fileobj=raw, mode="r:*") as tar:
      members = []
      total = 0
      for member in tar:
        if len(members) >= max_members:
          raise corrupt(f"more than {max_members} entries")
        name = member.name
        parts = name.replace("\\", "/").split("/")
        if os.path.isabs(name) or ".." in parts:
          raise corrupt(f"an entry outside the archive root ({name!r})")
        if not (member.isfile() or member.isdir()):
          raise corrupt(f"an entry that is not a file or directory ({name!r})")
        total += member.size
        if total > max_bytes:
          raise corrupt(f"more than {max_bytes} bytes of content")
        members.append(member)
      tar.extractall(dest, members=members, filter="data")
  except errors.MigrationError:
    raise
  except PermissionError as e:
    raise errors.InputNotFoundError(f"{archive}: expected a readable archive, "
                                    f"found {e.strerror}") from None
  except OSError as e:
    if e.errno == errno.ENOSPC:
      raise errors.OutputError(f"{dest}: expected room to extract {archive}, "
                               f"found the disk full") from None
    raise corrupt(f"{type(e).__name__}: {e}") from None
  except (tarfile.TarError, EOFError, zlib.error, ValueError) as e:
    raise corrupt(f"{type(e).__name__}: {e}") from None
  if not os.path.isfile(os.path.join(dest, MODULE_DEF_FILENAME)):
    entries = os.listdir(dest)
    if len(entries) == 1 and os.path.isfile(
        os.path.join(dest, entries[0], MODULE_DEF_FILENAME)):
      return os.path.join(dest, entries[0])
  return dest


# -- the worker (runs in a spawned child process) --------------------------------

@dataclasses.dataclass(frozen=True)
class WorkItem:
  """What a worker process needs: picklable, no TensorFlow objects."""

  location: str
  kind: str
  destination: str
  options: dict[str, Any]  # keyword arguments of convert.convert
  scratch: Optional[str] = None  # Temporary directory (archive extraction).
  tfhub_cache: Optional[str] = None  # TFHUB_CACHE_DIR for URLs.
  skip_if_sha256: Optional[str] = None  # URL: skip if resolved to this content.
  threads: Optional[int] = None  # TensorFlow intra/inter-op threads.
  quiet: bool = True
  max_archive_bytes: int = MAX_ARCHIVE_BYTES


def _silence_native_stderr() -> None:
  """Points this process's fd 2 at /dev/null (TensorFlow's C++ chatter).

  Done in the child rather than around `process.start()` in the parent,
  which would race between the parent's worker threads.
  """
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  os.close(devnull)


def _resolve_url(url: str, cache_dir: str) -> str:
  os.environ["TFHUB_CACHE_DIR"] = cache_dir
  os.environ["TFHUB_MODEL_LOAD_FORMAT"] = "COMPRESSED"
  import tensorflow_hub as hub  # pylint: disable=g-import-not-at-top
  import urllib.error  # pylint: disable=g-import-not-at-top
  try:
    return hub.resolve(url)
  except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
    reason = getattr(e, "reason", None) or e
    if isinstance(e, urllib.error.HTTPError):
      reason = f"HTTP {e.code} {e.reason}"
    raise errors.InputNotFoundError(
        f"{url}: expected a downloadable TF1 Hub module archive, found "
        f"{type(e).__name__}: {reason}") from None
  except (OSError, ValueError, tarfile.TarError, EOFError, zlib.error) as e:
    raise errors.CorruptModuleError(
        f"{url}: expected a gzipped tar archive of a TF1 Hub module, found "
        f"{type(e).__name__}: {e}") from None


def _fix_model_card_source(dst: str, shown_src: str, real_src: str) -> None:
  """The card names the archive/URL, not the temporary extraction directory."""
  path = os.path.join(dst, MODEL_CARD_FILENAME)
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError:
    return
  fixed = text.replace(f"`{shown_src}`", f"`{real_src}`")
  if fixed != text:
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(fixed)
    os.replace(tmp, path)


def convert_in_worker(item: WorkItem) -> dict[str, Any]:
  """Fetches/extracts the source, converts and verifies it; returns plain data."""
  if item.quiet:
    _silence_native_stderr()
  if item.threads:
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(item.threads))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", str(item.threads))
  src = item.location
  sha = None
  if item.kind == KIND_ARCHIVE:
    name = _archive_stem(os.path.basename(item.location))
    src = extract_archive(item.location, os.path.join(item.scratch, name),
                          max_bytes=item.max_archive_bytes)
  elif item.kind == KIND_URL:
    src = _resolve_url(item.location, item.tfhub_cache)
    sha = fileutil.tree_sha256(src)
    if sha == item.skip_if_sha256 and keras_format.output_exists(item.destination):
      return {"skipped": True, "source_sha256": sha}
  from migrate import convert  # pylint: disable=g-import-not-at-top
  result = convert.convert(src, item.destination, **item.options).to_dict()
  if src != item.location:
    _fix_model_card_source(item.destination, src, item.location)
  result["source_sha256"] = sha
  result["skipped"] = False
  return result


# -- outcomes, report ------------------------------------------------------------

def now_iso() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass
class ModuleOutcome:
  """What happened to one module."""

  source: str
  destination: str
  kind: str
  status: str  # STATUS_CONVERTED, STATUS_SKIPPED or STATUS_FAILED.
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


def _parity_fields(report_json: Optional[str]) -> dict[str, Any]:
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


_CSV_COLUMNS = ("source", "destination", "kind", "status", "exit_code", "error",
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
    _atomic_write(path, text)

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


# -- state -----------------------------------------------------------------------

def _atomic_write(path: str, text: str) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-{os.getpid()}-",
                             dir=directory)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


class BatchState:
  """`DST_ROOT/.migrate-batch-state.json`: one record per destination."""

  def __init__(self, path: str, dst_root: str):
    self.path = path
    self.dst_root = dst_root
    self._lock = threading.Lock()
    self.records: dict[str, dict[str, Any]] = {}
    self.warning: Optional[str] = None
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
      if data.get("version") == STATE_VERSION:
        self.records = dict(data.get("modules", {}))
      else:
        self.warning = f"{path}: unknown state version; starting afresh"
    except FileNotFoundError:
      pass
    except (OSError, ValueError, AttributeError) as e:
      self.warning = f"{path}: unreadable state ({e}); starting afresh"

  def key(self, destination: str) -> str:
    if destination.startswith(self.dst_root + os.sep):
      return os.path.relpath(destination, self.dst_root).replace(os.sep, "/")
    return destination

  def get(self, destination: str) -> Optional[dict[str, Any]]:
    with self._lock:
      return self.records.get(self.key(destination))

  def put(self, destination: str, record: dict[str, Any]) -> None:
    with self._lock:
      self.records[self.key(destination)] = record
      _atomic_write(self.path, json.dumps(
          {"version": STATE_VERSION, "modules": self.records}, indent=1,
          sort_keys=True))


def _remove_if_dead(path: str, pid_text: str) -> bool:
  if pid_text.isdigit() and not fileutil.pid_alive(int(pid_text)):
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      try:
        os.unlink(path)
      except OSError:
        return False
    return True
  return False


def clean_stale_files(dst_root: str, destinations: Iterable[str]) -> list[str]:
  """Removes what killed runs left: scratch dirs, state temp files, staging dirs."""
  removed = []
  scratch = os.path.join(dst_root, WORK_DIRNAME, "tmp")
  if os.path.isdir(scratch):
    for name in os.listdir(scratch):
      if _remove_if_dead(os.path.join(scratch, name), name.split("-", 1)[0]):
        removed.append(os.path.join(scratch, name))
  state_tmp = re.compile(rf"^\.{re.escape(STATE_FILENAME)}\.tmp-(\d+)-")
  try:
    for name in os.listdir(dst_root):
      match = state_tmp.match(name)
      if match and _remove_if_dead(os.path.join(dst_root, name), match.group(1)):
        removed.append(os.path.join(dst_root, name))
  except OSError:
    pass
  for dst in destinations:
    if os.path.isdir(os.path.dirname(dst)):
      removed += [os.path.join(os.path.dirname(dst), name)
                  for name in staging.clean_stale(dst)]
  return removed


class RunLock:
  """One batch at a time per DST_ROOT: flock on the directory itself.

  No lock file is left behind, and the lock goes with the process (even on
  SIGKILL).
  """

  def __init__(self, dst_root: str):
    self._fd = os.open(dst_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self._fd)
      raise errors.OutputError(
          f"{dst_root}: expected no other batch writing here, found one "
          f"running") from None

  def release(self) -> None:
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)


def remove_empty_work_dir(dst_root: str) -> None:
  """Removes DST_ROOT/.migrate-batch (and its tmp/) if nothing is left in them."""
  work_dir = os.path.join(dst_root, WORK_DIRNAME)
  for path in (os.path.join(work_dir, "tmp"), work_dir):
    try:
      os.rmdir(path)
    except OSError:
      pass


# -- progress --------------------------------------------------------------------

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


def default_jobs() -> int:
  return isolation.usable_cpus()


# -- the batch -------------------------------------------------------------------

def _one_line(error: BaseException) -> str:
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


class BatchRunner:
  """One batch over DST_ROOT: plans, converts (in workers), records.

  Shared by the worker threads of `run_batch` and used by the Beam DoFn
  (`migrate.beam_pipeline`), which converts but does not record.
  """

  def __init__(self, dst_root: str, *, jobs: int, timeout: Optional[float],
               options: ConvertOptions, on_progress, quiet: bool,
               threads_per_worker: Optional[int], max_archive_bytes: int,
               memory_limit: Optional[int] = None):
    self.dst_root = dst_root
    self.work_dir = os.path.join(dst_root, WORK_DIRNAME)
    self.scratch_root = os.path.join(self.work_dir, "tmp")
    self.tfhub_cache = os.path.join(self.work_dir, "tfhub_cache")
    self.state = BatchState(os.path.join(dst_root, STATE_FILENAME), dst_root)
    self.jobs = jobs
    self.timeout = timeout
    self.options = options
    self.on_progress = on_progress
    self.quiet = quiet
    self.threads = threads_per_worker
    self.max_archive_bytes = max_archive_bytes
    self.memory_limit = memory_limit
    self.cancelled = threading.Event()
    self._dirs_lock = threading.Lock()
    self._in_flight: dict[str, int] = {}  # DST parents of running modules.
    self._lock = threading.Lock()
    self.started = time.monotonic()
    self.total = 0
    self.done = 0
    self.running = 0
    self.converted = 0
    self.failed = 0
    self.skipped = 0

  # Progress (serialized: the callback never runs in two threads at once).
  def emit(self, event: str, module: Optional[str] = None,
           outcome: Optional[ModuleOutcome] = None) -> None:
    with self._lock:
      if event == "started":
        self.running += 1
      elif event == "finished" and outcome is not None:
        self.running -= 1
        if outcome.status == STATUS_SKIPPED:
          self.skipped += 1
          self.total -= 1
        else:
          self.done += 1
          if outcome.failed:
            self.failed += 1
          else:
            self.converted += 1
      if self.on_progress is None:
        return
      self.on_progress(Progress(
          event=event, total=self.total, done=self.done, running=self.running,
          converted=self.converted, failed=self.failed, skipped=self.skipped,
          elapsed=time.monotonic() - self.started, module=module,
          outcome=outcome))

  def convert_options(self, source: Source, overwrite: bool) -> dict[str, Any]:
    o = self.options
    return {"signature": source.signature or o.signature,
            "output_key": source.output_key or o.output_key,
            "keep_output_dropout": o.keep_output_dropout, "verify": o.verify,
            "keep_failed": o.keep_failed, "allow_unsafe_ops": o.allow_unsafe_ops,
            "overwrite": overwrite,
            # A batch keeps its cores busy with modules (--jobs), not with a
            # second process per module.
            "parallel_verify": False}

  def fingerprint(self, source: Source) -> dict[str, Any]:
    fp = self.options.fingerprint()
    fp["signature"] = source.signature or fp["signature"]
    fp["output_key"] = source.output_key or fp["output_key"]
    return fp

  def up_to_date(self, source: Source, sha: Optional[str]) -> Optional[dict]:
    record = self.state.get(source.destination)
    if (record and sha and record.get("status") == STATUS_CONVERTED
        and record.get("source_sha256") == sha
        and record.get("source") == source.location
        and record.get("options") == self.fingerprint(source)
        and keras_format.output_exists(source.destination)):
      return record
    return None

  def skipped_outcome(self, source: Source, record: dict) -> ModuleOutcome:
    fields = {f.name for f in dataclasses.fields(ModuleOutcome)}
    kept = {k: v for k, v in record.items() if k in fields}
    kept.update(source=source.location, destination=source.destination,
                kind=source.kind, status=STATUS_SKIPPED, seconds=0.0)
    return ModuleOutcome(**kept)

  def _owned(self, destination: str) -> bool:
    """DST was made by a batch here (recorded), or is our model, unrecorded."""
    if self.state.get(destination) is not None:
      return True
    if keras_format.is_keras_path(destination):
      return keras_format.read_metadata(destination) is not None
    try:
      card = fileutil.read_regular_file(
          os.path.join(destination, MODEL_CARD_FILENAME), max_bytes=1 << 20)
    except (OSError, errors.MigrationError):
      return False
    return card.split(b"\n", 1)[0].strip() == MODEL_CARD_TITLE.encode()

  def _rewrite_paths(self, text: str, source: Source,
                     scratch: Optional[str]) -> str:
    if scratch:
      name = _archive_stem(os.path.basename(source.location))
      for inner in (os.path.join(scratch, name), scratch):
        text = text.replace(inner, source.location)
    if source.kind == KIND_URL:
      cached = os.path.join(self.tfhub_cache,
                            hashlib.sha1(source.location.encode()).hexdigest())
      text = text.replace(cached, source.location)
    return text

  def process(self, source: Source, sha: Optional[str],
              size: int = 0) -> Optional[ModuleOutcome]:
    """Converts one module in a worker process; records and returns the outcome."""
    if self.cancelled.is_set():
      return None
    self.emit("started", module=source.location)
    outcome = self.convert(source, sha, size)
    if self.cancelled.is_set() or (
        outcome.exit_code == errors.ExitCode.INTERNAL
        and "(KeyboardInterrupt" in (outcome.error or "")):
      # Interrupted (Ctrl-C reaches the workers too): not recorded, redone
      # by the next run; the main thread is about to stop the batch.
      return None
    self.record(source, outcome)
    self.emit("finished", module=source.location, outcome=outcome)
    return outcome

  def record(self, source: Source, outcome: ModuleOutcome) -> None:
    if outcome.status != STATUS_SKIPPED:
      record = dataclasses.asdict(outcome)
      record["options"] = self.fingerprint(source)
      self.state.put(source.destination, record)

  def module_timeout(self, size: int) -> Optional[float]:
    """The time limit of a module of `size` bytes (None: no limit)."""
    if self.timeout is None:
      return preflight.default_timeout(size)
    return self.timeout or None

  def convert(self, source: Source, sha: Optional[str],
              size: int = 0) -> ModuleOutcome:
    """Converts one module in a worker process (no state, no progress)."""
    began = time.monotonic()
    outcome = ModuleOutcome(source=source.location,
                            destination=source.destination, kind=source.kind,
                            status=STATUS_FAILED, source_sha256=sha,
                            signature=source.signature or self.options.signature,
                            output_key=source.output_key or self.options.output_key)
    scratch = None
    created_parents: list[str] = []
    parent = os.path.dirname(source.destination)
    try:
      with self._dirs_lock:
        self._in_flight[parent] = self._in_flight.get(parent, 0) + 1
        probe = parent
        while not os.path.isdir(probe):
          created_parents.append(probe)
          probe = os.path.dirname(probe)
        os.makedirs(parent, exist_ok=True)
      if source.kind == KIND_ARCHIVE:
        os.makedirs(self.scratch_root, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self.scratch_root)
      overwrite = self.options.overwrite or self._owned(source.destination)
      record = self.state.get(source.destination) or {}
      item = WorkItem(
          location=source.location, kind=source.kind,
          destination=source.destination,
          options=self.convert_options(source, overwrite), scratch=scratch,
          tfhub_cache=self.tfhub_cache if source.kind == KIND_URL else None,
          skip_if_sha256=(record.get("source_sha256")
                          if record.get("status") == STATUS_CONVERTED
                          and record.get("options") == self.fingerprint(source)
                          else None),
          threads=self.threads, quiet=self.quiet,
          max_archive_bytes=self.max_archive_bytes)
      before = staging.path_identity(source.destination)
      try:
        result = isolation.run_isolated(
            convert_in_worker, item, what=source.location,
            timeout=self.module_timeout(size), memory_limit=self.memory_limit,
            quiet=False)  # The child silences its own stderr (item.quiet).
      except (errors.WorkerCrashedError, errors.WorkerTimeoutError,
              errors.ResourceLimitError) as e:
        raise staging.settled(e, source.destination, before,
                              verified=self.options.verify) from None
      if result.get("source_sha256"):
        outcome.source_sha256 = result["source_sha256"]
      if result.get("skipped"):
        outcome = self.skipped_outcome(source, record)
      else:
        parity = result.get("parity") or {}
        outcome.status = STATUS_CONVERTED
        outcome.stage_seconds = {k: round(v, 3)
                                 for k, v in result.get("seconds", {}).items()}
        outcome.signature = result.get("signature")
        outcome.output_key = result.get("output_key")
        outcome.parity_summary = parity.get("summary")
        for k, v in _parity_fields(parity.get("json")).items():
          setattr(outcome, k, v)
    except errors.MigrationError as e:
      outcome.status = STATUS_FAILED
      outcome.exit_code = int(e.exit_code)
      outcome.error = self._rewrite_paths(_one_line(e),
                                          source, scratch)
      report_json = getattr(e, "report_json", "")
      if report_json:
        for k, v in _parity_fields(report_json).items():
          setattr(outcome, k, v)
        outcome.parity_summary = outcome.error
    except OSError as e:  # Creating DST's parent or the scratch directory.
      outcome.status = STATUS_FAILED
      outcome.exit_code = int(errors.ExitCode.OUTPUT)
      outcome.error = errors.printable(
          f"{source.destination}: expected a writable output directory, found "
          f"{type(e).__name__}: {e}")
    finally:
      if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    with self._dirs_lock:
      self._in_flight[parent] -= 1
      if not self._in_flight[parent]:
        del self._in_flight[parent]
      if outcome.failed:
        # Leave no empty directories behind, unless another module in flight
        # is about to write below them.
        for path in created_parents:
          if any(p == path or p.startswith(path + os.sep) for p in self._in_flight):
            break
          try:
            os.rmdir(path)
          except OSError:
            break
    if outcome.status != STATUS_SKIPPED:
      outcome.seconds = round(time.monotonic() - began, 3)
      outcome.finished_at = now_iso()
    return outcome

  def plan(self, sources: Sequence[Source]):
    """Hashes local sources; -> (outcomes known now by index, [(i, source, sha, size)])."""
    def one(source: Source):
      if source.kind == KIND_URL:
        return None, 0, None
      if not os.path.lexists(source.location):
        return None, 0, errors.InputNotFoundError(
            f"{source.location}: no such file or directory")
      try:
        if source.root:
          fileutil.check_within(source.location, source.root)
        size = _source_size(source)  # Checks every entry before any is opened.
        return source_sha256(source.location, source.kind), size, None
      except errors.MigrationError as e:
        return None, 0, e
      except OSError as e:
        return None, 0, errors.InputNotFoundError(
            f"{source.location}: expected a readable module, found "
            f"{type(e).__name__}: {e}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as hashers:
      planned = list(hashers.map(one, sources))
    outcomes: dict[int, ModuleOutcome] = {}
    todo = []
    for i, (source, (sha, size, error)) in enumerate(zip(sources, planned)):
      if error is not None:
        outcomes[i] = ModuleOutcome(
            source=source.location, destination=source.destination,
            kind=source.kind, status=STATUS_FAILED,
            exit_code=int(error.exit_code),
            error=_one_line(error),
            finished_at=now_iso())
        self.record(source, outcomes[i])
        continue
      record = self.up_to_date(source, sha)
      if record is not None:
        outcomes[i] = self.skipped_outcome(source, record)
        continue
      todo.append((i, source, sha, size))
    # Largest first: the long modules start early, the short ones fill in.
    todo.sort(key=lambda t: -t[3])
    return outcomes, todo


# -- memory ----------------------------------------------------------------------
# Peak RSS of one module's whole process tree (worker and reference child),
# converted and verified, measured with tools/memory.py on the full-size families
# (README, Performance): at most PEAK_BASE_BYTES + PEAK_PER_VARIABLE_BYTE x the
# checkpoint + PEAK_PER_GRAPH_BYTE x saved_model.pb (NASNet's 8 MB graph costs
# more than Inception-v3's 91 MB of variables). For an archive the graph's share
# is unknown: up to UNKNOWN_GRAPH_BYTES of it is counted as graph; a URL's size
# is unknown before it is downloaded.
PEAK_BASE_BYTES = 1600 << 20
PEAK_PER_VARIABLE_BYTE = 15
PEAK_PER_GRAPH_BYTE = 300
UNKNOWN_GRAPH_BYTES = 8 << 20
UNKNOWN_SIZE_BYTES = 256 << 20
# Left free for the batch process itself, the page cache and everyone else.
MEMORY_RESERVE_BYTES = 1 << 30
AVAILABLE_MEMORY = -1  # run_batch's default budget: MemAvailable at the start.


def estimated_peak_bytes(module_bytes: int, graph_bytes: Optional[int] = None) -> int:
  """The estimated peak memory of converting and verifying one module of
  `module_bytes` (0: unknown) whose saved_model.pb has `graph_bytes`."""
  module_bytes = module_bytes or UNKNOWN_SIZE_BYTES
  if graph_bytes is None:
    graph_bytes = min(module_bytes, UNKNOWN_GRAPH_BYTES)
  return (PEAK_BASE_BYTES + PEAK_PER_GRAPH_BYTE * graph_bytes +
          PEAK_PER_VARIABLE_BYTE * max(0, module_bytes - graph_bytes))


def _graph_bytes(source: Source) -> Optional[int]:
  if source.kind != KIND_DIRECTORY:
    return None
  try:
    return os.path.getsize(os.path.join(source.location, SAVED_MODEL_FILENAME))
  except OSError:
    return None


def available_memory_bytes() -> Optional[int]:
  """MemAvailable of /proc/meminfo (None where there is none)."""
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


class MemoryGate:
  """Starts a module's worker only while the estimated peaks of the workers
  running fit in `budget` bytes; one worker may always run (a module bigger
  than the budget runs alone). `budget` None: no limit."""

  def __init__(self, budget: Optional[int]):
    self.budget = budget
    self.in_use = 0
    self.running = 0
    self.most_running = 0
    self._cond = threading.Condition()

  def run(self, need: int, cancelled: threading.Event, fn: Callable, *args):
    """`fn(*args)` once `need` bytes fit (None if cancelled while waiting)."""
    with self._cond:
      while (self.budget is not None and self.running and
             self.in_use + need > self.budget):
        if cancelled.is_set():
          return None
        self._cond.wait(timeout=0.5)
      self.in_use += need
      self.running += 1
      self.most_running = max(self.most_running, self.running)
    try:
      return fn(*args)
    finally:
      with self._cond:
        self.in_use -= need
        self.running -= 1
        self._cond.notify_all()


def _kill_workers() -> None:
  """Kills this process's worker processes (our own children, by pid)."""
  for child in multiprocessing.active_children():
    try:
      child.kill()
    except OSError:
      pass


def run_batch(sources: Sequence[Source], dst_root: str, *,
              jobs: Optional[int] = None,
              timeout: Optional[float] = None,
              options: Optional[ConvertOptions] = None,
              on_progress: Optional[Callable[[Progress], None]] = None,
              quiet: bool = True,
              threads_per_worker: Optional[int] = None,
              max_archive_bytes: int = MAX_ARCHIVE_BYTES,
              memory_limit: Optional[int] = None,
              memory_budget: Optional[int] = AVAILABLE_MEMORY) -> BatchReport:
  """Converts and verifies every source, `jobs` at a time; returns the report.

  Each module runs in its own spawned process (`timeout` seconds at most;
  None: `preflight.default_timeout` of the module's size; 0: no limit), with
  at most `memory_limit` bytes of data (see `isolation.run_isolated`).
  Modules recorded in DST_ROOT's state as converted from the same content
  with the same options, whose DST exists, are skipped. A failure of one
  module never stops the others; `BatchReport.exit_code` is 10 if any failed.
  On KeyboardInterrupt the workers are killed (their staging directories are
  removed by the next run) and the exception propagates.
  `threads_per_worker` (default: cores // jobs) caps TensorFlow's thread
  pools in each worker so that `jobs` workers do not oversubscribe the CPU.
  `memory_budget` (bytes; default: MemAvailable at the start less
  MEMORY_RESERVE_BYTES; None: no limit) holds workers back while the
  estimated peaks of those running (`estimated_peak_bytes`) would exceed it.
  """
  options = options or ConvertOptions()
  sources = output_destinations(sources, options.output_format)
  jobs = max(1, jobs or default_jobs())
  dst_root = os.path.abspath(dst_root)
  if threads_per_worker is None:
    threads_per_worker = max(1, default_jobs() // jobs)
  started_at = now_iso()
  try:
    os.makedirs(dst_root, exist_ok=True)
  except OSError as e:
    raise errors.OutputError(f"{dst_root}: expected a writable output "
                             f"directory, found {type(e).__name__}: {e}") from None
  run_lock = RunLock(dst_root)
  batch = BatchRunner(dst_root, jobs=jobs, timeout=timeout, options=options,
                 on_progress=on_progress, quiet=quiet,
                 threads_per_worker=threads_per_worker,
                 max_archive_bytes=max_archive_bytes, memory_limit=memory_limit)
  try:
    clean_stale_files(dst_root, [s.destination for s in sources])
    outcomes, todo = batch.plan(sources)
    failed = sum(1 for o in outcomes.values() if o.failed)
    batch.skipped = len(outcomes) - failed
    batch.total = len(todo) + failed
    batch.done = batch.failed = failed
    batch.emit("planned")
    if memory_budget == AVAILABLE_MEMORY:
      available = available_memory_bytes()
      memory_budget = (None if available is None
                       else max(0, available - MEMORY_RESERVE_BYTES))
    gate = MemoryGate(memory_budget)
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=jobs, thread_name_prefix="migrate-batch")
    futures: dict[concurrent.futures.Future, int] = {}
    try:
      for i, source, sha, size in todo:
        need = estimated_peak_bytes(size if source.kind != KIND_URL else 0,
                                    _graph_bytes(source))
        futures[executor.submit(gate.run, need, batch.cancelled, batch.process,
                                source, sha, size)] = i
      pending = set(futures)
      while pending:
        finished, pending = concurrent.futures.wait(
            pending, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in finished:
          outcome = future.result()
          if outcome is not None:
            outcomes[futures[future]] = outcome
        if pending:
          batch.emit("tick")
    except BaseException:
      # Interrupted: stop everything now. A worker thread may be just starting
      # a child, so kill until every thread has returned.
      batch.cancelled.set()
      for future in futures:
        future.cancel()
      running = [f for f in futures if not f.done()]
      while running:
        _kill_workers()
        _, still = concurrent.futures.wait(running, timeout=0.2)
        running = list(still)
      # The killed workers' staging directories go now, not at the next run.
      for _, source, _, _ in todo:
        staging.clean_stale(source.destination)
      raise
    finally:
      executor.shutdown(wait=True, cancel_futures=True)
    for i, source, sha, _ in todo:
      if i not in outcomes:  # Its worker alone was interrupted (SIGINT).
        outcomes[i] = ModuleOutcome(
            source=source.location, destination=source.destination,
            kind=source.kind, status=STATUS_FAILED, source_sha256=sha,
            exit_code=int(errors.ExitCode.INTERNAL), finished_at=now_iso(),
            error=f"{source.location}: the worker was interrupted (SIGINT); "
            f"rerun to convert it")
  finally:
    remove_empty_work_dir(dst_root)
    run_lock.release()
  return BatchReport(dst_root=dst_root, jobs=jobs, started_at=started_at,
                     seconds=time.monotonic() - batch.started,
                     modules=[outcomes[i] for i in sorted(outcomes)],
                     state_path=batch.state.path)
