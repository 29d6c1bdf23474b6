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
every module) records each module's outcome with the sha256 of its source and
the fingerprint of its options (`options.fingerprint`); a rerun skips the
modules converted and verified from the same source with the same options
(and whose DST still exists) and retries the rest. Archives are extracted
into `DST_ROOT/.migrate-batch/tmp/<pid>-*` (removed afterwards, or by the
next run if this one was killed); downloads are cached in
`DST_ROOT/.migrate-batch/tfhub_cache`.

One skeleton, `BatchRunner.run`: lock DST_ROOT, plan (hash the sources, skip
what is up to date), execute the rest, record each outcome, report. Only the
execution differs: `LocalExecutor` here (worker threads, each running one
module in its own process, held back by the memory gate), or
`beam_pipeline.BeamExecutor` (a Beam pipeline, one module per element).

The batch's modules, by concern:

    batch_sources   what to convert: discovery, manifests, hashes, archives, URLs
    batch_state     the state file, the run lock, cleanup after killed runs
    batch_report    ModuleOutcome, BatchReport (and its summary), Progress
    batch_family    the family of a module, from its checkpoint index
    batch_worker    the child process that converts one module
    batch           (here) the runner, its local executor, run_batch

This module never imports TensorFlow in the calling process and never prints:
progress goes to the `on_progress` callback, results into a `BatchReport`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Optional, Protocol, Sequence

from migrate import batch_family
from migrate import batch_report as report_lib
from migrate import batch_sources as sources_lib
from migrate import batch_state as state_lib
from migrate import batch_worker
from migrate import errors
from migrate import fileutil
from migrate import isolation
from migrate import keras_format
from migrate import options as options_lib
from migrate import preflight
from migrate import staging

# The public names of the batch, wherever they are defined (README).
from migrate.batch_report import (
    STATUS_CONVERTED, STATUS_FAILED, STATUS_SKIPPED, BatchReport, ModuleOutcome,
    Progress)
from migrate.batch_sources import (
    KIND_ARCHIVE, KIND_DIRECTORY, KIND_URL, MAX_ARCHIVE_BYTES, ManifestError,
    Source, discover, read_manifest)
from migrate.batch_state import STATE_FILENAME, WORK_DIRNAME
from migrate.options import ConvertOptions

__all__ = [
    "BatchReport", "BatchRunner", "ConvertOptions", "Executor", "KIND_ARCHIVE",
    "KIND_DIRECTORY", "KIND_URL", "LocalExecutor", "MAX_ARCHIVE_BYTES",
    "ManifestError", "MemoryGate", "ModuleOutcome", "Progress", "STATE_FILENAME",
    "STATUS_CONVERTED", "STATUS_FAILED", "STATUS_SKIPPED", "Source",
    "WORK_DIRNAME", "default_jobs", "discover", "estimated_peak_bytes",
    "read_manifest", "run_batch"]

Todo = tuple[int, Source, Optional[str], int]  # (index, source, sha256, size)


def default_jobs() -> int:
  return isolation.usable_cpus()


class Executor(Protocol):
  """How a batch executes its work items (the rest is `BatchRunner.run`)."""

  def execute(self, runner: "BatchRunner", todo: Sequence[Todo]
              ) -> dict[int, ModuleOutcome]:
    """Converts the modules of `todo`, records each outcome
    (`runner.record`); -> the outcomes by index (an item may be missing)."""

  def missing(self, source: Source) -> str:
    """The error of an item `execute` returned no outcome for."""


class BatchRunner:
  """One batch over DST_ROOT: plans, converts (in workers), records, reports.

  `run(sources, executor)` is the whole batch; `convert` (one module in a
  worker process, no state, no progress) is also what each Beam element runs.
  """

  def __init__(self, dst_root: str, options: Optional[ConvertOptions] = None, *,
               jobs: int = 1, on_progress: Optional[Callable[[Progress], None]] = None,
               quiet: bool = True, threads_per_worker: Optional[int] = None,
               max_archive_bytes: int = MAX_ARCHIVE_BYTES,
               memory_limit: Optional[int] = None):
    options = options or ConvertOptions()
    self.dst_root = os.path.abspath(dst_root)
    self.work_dir = os.path.join(self.dst_root, WORK_DIRNAME)
    self.scratch_root = os.path.join(self.work_dir, "tmp")
    self.tfhub_cache = os.path.join(self.work_dir, "tfhub_cache")
    self.state = self._load_state()
    self.jobs = jobs
    # A batch writes SavedModels unless told otherwise (the fingerprint says
    # which; records from before the option hold SavedModels).
    self.options = options.replace(
        output_format=options.output_format or options_lib.FORMAT_SAVEDMODEL)
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

  def _load_state(self) -> state_lib.BatchState:
    return state_lib.BatchState(
        os.path.join(self.dst_root, STATE_FILENAME), self.dst_root)

  # -- the skeleton ------------------------------------------------------------

  def run(self, sources: Sequence[Source], executor: Executor) -> BatchReport:
    """Plans, skips what is up to date, executes the rest, records, reports.

    One batch at a time per DST_ROOT (`RunLock`); what killed runs left is
    removed first. A failure of one module never stops the others.
    """
    sources = sources_lib.output_destinations(sources, self.options.output_format)
    started_at = report_lib.now_iso()
    self.started = time.monotonic()
    self.check_outside_sources(sources)
    try:
      os.makedirs(self.dst_root, exist_ok=True)
    except OSError as e:
      raise errors.OutputError(
          f"{self.dst_root}: expected a writable output directory, found "
          f"{type(e).__name__}: {e}") from None
    run_lock = state_lib.RunLock(self.dst_root)
    try:
      self.state = self._load_state()  # As the lock holder sees it.
      state_lib.clean_stale_files(self.dst_root, [s.destination for s in sources])
      outcomes, todo = self.plan(sources)
      failed = sum(1 for o in outcomes.values() if o.failed)
      self.skipped = len(outcomes) - failed
      self.total = len(todo) + failed
      self.done = self.failed = failed
      self.emit("planned")
      if todo:
        outcomes.update(executor.execute(self, todo))
      for i, source, sha, _ in todo:
        if i not in outcomes:
          outcomes[i] = ModuleOutcome(
              source=source.location, destination=source.destination,
              kind=source.kind, status=STATUS_FAILED, source_sha256=sha,
              exit_code=int(errors.ExitCode.INTERNAL),
              finished_at=report_lib.now_iso(), error=executor.missing(source))
    finally:
      state_lib.remove_empty_work_dir(self.dst_root)
      run_lock.release()
    return BatchReport(dst_root=self.dst_root, jobs=self.jobs,
                       started_at=started_at,
                       seconds=time.monotonic() - self.started,
                       modules=[outcomes[i] for i in sorted(outcomes)],
                       state_path=self.state.path)

  def check_outside_sources(self, sources: Sequence[Source]) -> None:
    """Refuses a DST_ROOT that is a module directory or lies inside one (by
    device and inode, as DST for one module): the state file and the other
    modules' outputs would be written into that input."""
    existing = os.path.abspath(self.dst_root)
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
      existing = os.path.dirname(existing)
    for source in sources:
      if (source.kind != KIND_URL and os.path.isdir(source.location) and
          staging.is_within(existing, source.location)):
        raise errors.OutputError(
            f"{self.dst_root}: expected an output root outside every module, "
            f"found it inside the module {source.location} (the input is "
            f"never modified)")

  def plan(self, sources: Sequence[Source]
           ) -> tuple[dict[int, ModuleOutcome], list[Todo]]:
    """Hashes local sources; -> (outcomes known now by index, the work items)."""
    def one(source: Source):
      if source.kind == KIND_URL:
        return None, 0, None
      if not os.path.lexists(source.location):
        return None, 0, errors.InputNotFoundError(
            f"{source.location}: no such file or directory")
      try:
        if source.root:
          fileutil.check_within(source.location, source.root)
        # Checks every entry before any is opened.
        size = sources_lib.source_size(source)
        return sources_lib.source_sha256(source.location, source.kind), size, None
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
            error=report_lib.one_line(error),
            finished_at=report_lib.now_iso())
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

  # -- options, state ------------------------------------------------------------

  def module_options(self, source: Source) -> ConvertOptions:
    """The batch's options with the source's own (a manifest row's) applied."""
    return self.options.replace(
        signature=source.signature or self.options.signature,
        output_key=source.output_key or self.options.output_key)

  def fingerprint(self, source: Source) -> dict[str, Any]:
    return options_lib.fingerprint(self.module_options(source))

  def _made_as_now(self, source: Source, record: dict) -> bool:
    """Converted and verified as this batch would (same options)."""
    return (record.get("status") == STATUS_CONVERTED and
            options_lib.matches_fingerprint(self.module_options(source),
                                            record.get("options") or {}))

  def up_to_date(self, source: Source, sha: Optional[str]) -> Optional[dict]:
    record = self.state.get(source.destination)
    if (record and sha and self._made_as_now(source, record)
        and record.get("source_sha256") == sha
        and record.get("source") == source.location
        and keras_format.output_exists(source.destination)):
      return record
    return None

  def skipped_outcome(self, source: Source, record: dict) -> ModuleOutcome:
    fields = {f.name for f in dataclasses.fields(ModuleOutcome)}
    kept = {k: v for k, v in record.items() if k in fields}
    kept.update(source=source.location, destination=source.destination,
                kind=source.kind, status=STATUS_SKIPPED, seconds=0.0)
    if "family" not in record and source.kind == KIND_DIRECTORY:
      kept["family"] = batch_family.family(source.location)  # An older record.
    return ModuleOutcome(**kept)

  def record(self, source: Source, outcome: ModuleOutcome) -> None:
    if outcome.status != STATUS_SKIPPED:
      record = dataclasses.asdict(outcome)
      record["options"] = self.fingerprint(source)
      self.state.put(source.destination, record)

  def _owned(self, destination: str) -> bool:
    """DST was made by a batch here (recorded), or is our model, unrecorded."""
    if self.state.get(destination) is not None:
      return True
    if keras_format.is_keras_path(destination):
      return keras_format.read_metadata(destination) is not None
    return staging.has_model_card(destination)

  # -- progress --------------------------------------------------------------------

  def emit(self, event: str, module: Optional[str] = None,
           outcome: Optional[ModuleOutcome] = None) -> None:
    """Counts and sends a `Progress` (serialized: the callback never runs in
    two threads at once)."""
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

  # -- one module ------------------------------------------------------------------

  def module_timeout(self, size: int) -> Optional[float]:
    """The time limit of a module of `size` bytes (None: no limit)."""
    if self.options.timeout is None:
      return preflight.default_timeout(size)
    return self.options.timeout or None

  def _url_cache_dir(self, source: Source) -> str:
    """Where `hub.resolve` puts a URL's module (TFHUB_CACHE_DIR/sha1(url))."""
    return os.path.join(self.tfhub_cache,
                        hashlib.sha1(source.location.encode()).hexdigest())

  def _rewrite_paths(self, text: str, source: Source,
                     scratch: Optional[str]) -> str:
    if scratch:
      name = sources_lib.archive_stem(os.path.basename(source.location))
      for inner in (os.path.join(scratch, name), scratch):
        text = text.replace(inner, source.location)
    if source.kind == KIND_URL:
      text = text.replace(self._url_cache_dir(source), source.location)
    return text

  def _family(self, source: Source, scratch: Optional[str]) -> str:
    """The module's family, read where the worker found the module (an
    archive's extraction, a URL's download): `unknown` if it got no module."""
    if source.kind == KIND_DIRECTORY:
      return batch_family.family(source.location)
    if source.kind == KIND_URL:
      return batch_family.family(self._url_cache_dir(source))
    if scratch:
      name = sources_lib.archive_stem(os.path.basename(source.location))
      return batch_family.family(sources_lib.module_root(os.path.join(scratch, name)))
    return batch_family.UNKNOWN

  def process(self, source: Source, sha: Optional[str],
              size: int = 0) -> Optional[ModuleOutcome]:
    """Converts one module in a worker process; records and returns the outcome."""
    if self.cancelled.is_set():
      return None
    self.emit("started", module=source.location)
    outcome = self.convert(source, sha, size)
    if outcome.failed and (self.cancelled.is_set() or (
        outcome.exit_code == errors.ExitCode.INTERNAL
        and "(KeyboardInterrupt" in (outcome.error or ""))):
      # Interrupted (Ctrl-C reaches the workers too): not recorded, redone
      # by the next run; the main thread is about to stop the batch. A
      # module converted before the interruption is recorded: the next run
      # does not convert it again.
      return None
    self.record(source, outcome)
    self.emit("finished", module=source.location, outcome=outcome)
    return outcome

  def convert(self, source: Source, sha: Optional[str],
              size: int = 0) -> ModuleOutcome:
    """Converts one module in a worker process (no state, no progress)."""
    began = time.monotonic()
    options = self.module_options(source)
    outcome = ModuleOutcome(source=source.location,
                            destination=source.destination, kind=source.kind,
                            status=STATUS_FAILED, source_sha256=sha,
                            signature=options.signature,
                            output_key=options.output_key)
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
      record = self.state.get(source.destination) or {}
      options = options.replace(
          # Replace a DST this batch made (from an older source, or whose
          # conversion was cut short), or with --overwrite any DST.
          overwrite=self.options.overwrite or self._owned(source.destination),
          # A batch keeps its cores busy with modules (--jobs), not with a
          # second process per module.
          parallel_verify=False,
          # The destination's name says the format (`output_destinations`).
          output_format=None)
      item = batch_worker.WorkItem(
          location=source.location, kind=source.kind,
          destination=source.destination, options=options, scratch=scratch,
          tfhub_cache=self.tfhub_cache if source.kind == KIND_URL else None,
          skip_if_sha256=(record.get("source_sha256")
                          if self._made_as_now(source, record) else None),
          threads=self.threads, quiet=self.quiet,
          max_archive_bytes=self.max_archive_bytes)
      before = staging.path_identity(source.destination)
      try:
        result = isolation.run_isolated(
            batch_worker.convert_in_worker, item, what=source.location,
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
        for k, v in report_lib.parity_fields(parity.get("json")).items():
          setattr(outcome, k, v)
    except errors.MigrationError as e:
      outcome.status = STATUS_FAILED
      outcome.exit_code = int(e.exit_code)
      outcome.error = self._rewrite_paths(report_lib.one_line(e),
                                          source, scratch)
      report_json = getattr(e, "report_json", "")
      if report_json:
        for k, v in report_lib.parity_fields(report_json).items():
          setattr(outcome, k, v)
        outcome.parity_summary = outcome.error
    except OSError as e:  # Creating DST's parent or the scratch directory.
      outcome.status = STATUS_FAILED
      outcome.exit_code = int(errors.ExitCode.OUTPUT)
      outcome.error = errors.printable(
          f"{source.destination}: expected a writable output directory, found "
          f"{type(e).__name__}: {e}")
    finally:
      outcome.family = self._family(source, scratch)
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
      outcome.finished_at = report_lib.now_iso()
    return outcome

# -- the local executor ------------------------------------------------------------

# -- memory ----------------------------------------------------------------------
# Peak RSS of one module's whole process tree (its worker), converted and
# verified, fitted to what tools/memory.py measured on the full-size families
# (docs/PERFORMANCE.md, Memory): at most PEAK_BASE_BYTES +
# PEAK_PER_VARIABLE_BYTE x the checkpoint + PEAK_PER_GRAPH_BYTE x
# saved_model.pb (a byte of graph costs far more than a byte of variables).
# Refitted when verification moved into one process (threads) with the TF1
# loader as its only default consumer: the estimate is 1.2-1.4x each
# family's measured peak (it was 1.3-2.4x with the fit before).
# ALL_CONSUMERS_FACTOR covers `--consumers=all`'s measurements of the
# two-process design (EfficientNet-B0 3.9 GB, NASNet-A Mobile 8.7 GB).
# For an archive the graph's share is unknown: up to UNKNOWN_GRAPH_BYTES of it
# is counted as graph; a URL's size is unknown before it is downloaded.
PEAK_BASE_BYTES = 1000 << 20
PEAK_PER_VARIABLE_BYTE = 5
PEAK_PER_GRAPH_BYTE = 480
UNKNOWN_GRAPH_BYTES = 8 << 20
ALL_CONSUMERS_FACTOR = 2.0
UNKNOWN_SIZE_BYTES = 256 << 20
# Left free for the batch process itself, the page cache and everyone else.
MEMORY_RESERVE_BYTES = 1 << 30
AVAILABLE_MEMORY = -1  # run_batch's default budget: MemAvailable at the start.


def estimated_peak_bytes(module_bytes: int, graph_bytes: Optional[int] = None,
                         all_consumers: bool = False) -> int:
  """The estimated peak memory of converting and verifying one module of
  `module_bytes` (0: unknown) whose saved_model.pb has `graph_bytes`;
  `all_consumers`: verified with `--consumers=all` (TFLite's conversion and
  the fit steps in the worker, the C API loader's child: NASNet-A Mobile's
  tree 8.7 GB, EfficientNet-B0's 3.9, measured with the reference side in a
  child process too)."""
  module_bytes = module_bytes or UNKNOWN_SIZE_BYTES
  if graph_bytes is None:
    graph_bytes = min(module_bytes, UNKNOWN_GRAPH_BYTES)
  peak = (PEAK_BASE_BYTES + PEAK_PER_GRAPH_BYTE * graph_bytes +
          PEAK_PER_VARIABLE_BYTE * max(0, module_bytes - graph_bytes))
  return int(peak * ALL_CONSUMERS_FACTOR) if all_consumers else peak


def _graph_bytes(source: Source) -> Optional[int]:
  if source.kind != KIND_DIRECTORY:
    return None
  try:
    return os.path.getsize(os.path.join(source.location, preflight.SAVED_MODEL_FILENAME))
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


class LocalExecutor:
  """Executes a batch here: `runner.jobs` worker threads, each converting one
  module at a time in its own process (`BatchRunner.process`), started while
  the memory gate lets it (`memory_budget` bytes; None: no limit)."""

  def __init__(self, memory_budget: Optional[int]):
    self.memory_budget = memory_budget

  def execute(self, runner: BatchRunner, todo: Sequence[Todo]
              ) -> dict[int, ModuleOutcome]:
    gate = MemoryGate(self.memory_budget)
    outcomes: dict[int, ModuleOutcome] = {}
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=runner.jobs, thread_name_prefix="migrate-batch")
    futures: dict[concurrent.futures.Future, int] = {}
    try:
      for i, source, sha, size in todo:
        need = estimated_peak_bytes(size if source.kind != KIND_URL else 0,
                                    _graph_bytes(source),
                                    runner.options.verify and runner.options.consumers == "all")
        futures[executor.submit(gate.run, need, runner.cancelled, runner.process,
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
          runner.emit("tick")
    except BaseException:
      # Interrupted: stop everything now. A worker thread may be just starting
      # a child, so kill until every thread has returned.
      runner.cancelled.set()
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
    return outcomes

  def missing(self, source: Source) -> str:
    # Its worker alone was interrupted (SIGINT).
    return (f"{source.location}: the worker was interrupted (SIGINT); rerun to "
            f"convert it")


def run_batch(sources: Sequence[Source], dst_root: str,
              options: Optional[ConvertOptions] = None, *,
              jobs: Optional[int] = None,
              on_progress: Optional[Callable[[Progress], None]] = None,
              quiet: bool = True,
              threads_per_worker: Optional[int] = None,
              max_archive_bytes: int = MAX_ARCHIVE_BYTES,
              memory_budget: Optional[int] = AVAILABLE_MEMORY,
              **keywords: Any) -> BatchReport:
  """Converts and verifies every source, `jobs` at a time; returns the report.

  `options` (default: the defaults) with `keywords` (its fields, as for
  `convert.convert`) applied are every module's options; a manifest row's
  signature and output key override them. Each module runs in its own
  spawned process, for at most `options.timeout` seconds (None:
  `preflight.default_timeout` of the module's size; 0: no limit) with at
  most `options.memory_limit` GiB of data (None: `jobs`' share of the
  machine; see `isolation.run_isolated`). Modules recorded in DST_ROOT's
  state as converted from the same content with the same options, whose DST
  exists, are skipped. A failure of one module never stops the others;
  `BatchReport.exit_code` is 10 if any failed. On KeyboardInterrupt the
  workers are killed, their staging directories removed, and the exception
  propagates.
  `threads_per_worker` (default: cores // jobs) caps TensorFlow's thread
  pools in each worker so that `jobs` workers do not oversubscribe the CPU.
  `memory_budget` (bytes; default: MemAvailable at the start less
  MEMORY_RESERVE_BYTES; None: no limit) holds workers back while the
  estimated peaks of those running (`estimated_peak_bytes`) would exceed it.
  """
  options = options_lib.build(options, **keywords)
  jobs = max(1, jobs or default_jobs())
  if threads_per_worker is None:
    threads_per_worker = max(1, default_jobs() // jobs)
  if memory_budget == AVAILABLE_MEMORY:
    available = available_memory_bytes()
    memory_budget = (None if available is None
                     else max(0, available - MEMORY_RESERVE_BYTES))
  runner = BatchRunner(dst_root, options, jobs=jobs, on_progress=on_progress,
                       quiet=quiet, threads_per_worker=threads_per_worker,
                       max_archive_bytes=max_archive_bytes,
                       memory_limit=options.memory_limit_bytes(jobs))
  return runner.run(sources, LocalExecutor(memory_budget))
