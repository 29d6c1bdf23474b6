"""`migrate-hub-module`: the command line. The only module with flags and prints.

    migrate-hub-module SRC DST [--signature=] [--output_key=] [--overwrite]
                       [--keep_output_dropout] [--noverify] [--keep_failed]
                       [--report=FILE.json] [--allow_unsafe_ops]
    migrate-hub-module SRC DST.keras [...]   (a native Keras 3 model)
    migrate-hub-module verify OLD NEW [--report=FILE.json]
    migrate-hub-module batch SRC_ROOT DST_ROOT [--manifest=FILE.csv] [--jobs=N]
                       [--timeout=SECONDS] [--report=FILE.json,FILE.csv]
                       [--format=savedmodel|keras]

Exit codes (see migrate/errors.py): 0 ok, 1 internal error, 2 usage,
3 input not found, 4 not a TF1 Hub module, 5 unsupported module, 6 corrupt
module, 7 output problem, 8 unsafe ops, 9 parity failure, 10 batch with
failures, 11 TensorFlow crashed on the module, 12 timeout, 13 out of memory,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Optional, Sequence

# TensorFlow runs only in child processes (migrate.isolation); this process
# never imports it, so it starts fast and prints only its own lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

from migrate.errors import ExitCode, MigrationError, first_line, printable

PROG = "migrate-hub-module"

_SIGNATURE = flags.DEFINE_string(
    "signature", None, "TF1 signature behind __call__ (default: the one that "
    "'default' duplicates, else image_feature_vector, else "
    "image_classification).")
_OUTPUT_KEY = flags.DEFINE_string(
    "output_key", None, "Output of that signature (default: 'default', or the "
    "only output).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing DST.")
_KEEP_OUTPUT_DROPOUT = flags.DEFINE_bool(
    "keep_output_dropout", False, "Keep dropout that the train graph applies "
    "to the output features (against the image feature vector API).")
_VERIFY = flags.DEFINE_bool(
    "verify", True, "Check parity with the TF1 module before the output is "
    "moved into place (--noverify skips it; the output is then unverified).")
_KEEP_FAILED = flags.DEFINE_bool(
    "keep_failed", False, "Keep a model that fails parity at "
    "DST.failed-parity for inspection.")
_REPORT = flags.DEFINE_string("report", None, "Write the parity (or batch) "
                              "report as JSON to this file.")
_ALLOW_UNSAFE_OPS = flags.DEFINE_bool(
    "allow_unsafe_ops", False, "Convert modules whose graphs contain ops that "
    "reach the file system, the network or the Python process.")
_TIMEOUT = flags.DEFINE_float(
    "timeout", None, "Stop the work on a module after this many seconds "
    "(batch: per module). Default: 600 s plus 6 s per MiB of the module; 0: "
    "no limit.", lower_bound=0)
_MEMORY_LIMIT = flags.DEFINE_float(
    "memory_limit", None, "GiB of memory (data segment) each TensorFlow "
    "process may use; beyond it the module fails with exit code 13. Default: "
    "3/4 of the machine's memory shared by the processes that run at once "
    "(2 per conversion, 1 per batch worker), at least 2 GiB; 0: no limit.",
    lower_bound=0)
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an internal error, print "
                             "the traceback.")
# Batch-only flags (migrate-hub-module batch).
_MANIFEST = flags.DEFINE_string(
    "manifest", None, "batch: convert the modules listed in this CSV (columns "
    "source, destination[, signature, output_key]; relative sources resolve "
    "under SRC_ROOT, relative destinations under DST_ROOT) instead of "
    "scanning SRC_ROOT.")
_JOBS = flags.DEFINE_integer(
    "jobs", None, "batch: modules converted at a time, each in its own worker "
    "process (default: the number of cores).", lower_bound=1)
# The native Keras 3 output (migrate/keras_*.py): a DST ending in .keras.
_FORMAT = flags.DEFINE_enum(
    "format", None, ["savedmodel", "keras"], "Output format: a TF2 "
    "SavedModel directory, or a native Keras 3 model file (.keras, built-in "
    "layers only; verified on every installed Keras backend). Default: keras "
    "for a DST ending in .keras, else savedmodel; batch: savedmodel, keras "
    "writes DST_ROOT/<module>.keras.")
_BEAM_ARGS = flags.DEFINE_string(
    "beam_args", None, "batch: run the batch as an Apache Beam pipeline with "
    "these pipeline options, e.g. '--runner=DirectRunner "
    "--direct_num_workers=2' (needs the [beam] extra).")


_MAX_ERROR_CHARS = 4000  # A module can make a message long (names it quotes).


def _print_error(message: str) -> None:
  message = printable(message)
  if len(message) > _MAX_ERROR_CHARS:
    message = message[:_MAX_ERROR_CHARS - 3] + "..."
  print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def _print_out(text: str) -> None:
  """Prints `text` on stdout, each line escaped (it quotes module text)."""
  print("\n".join(printable(line) for line in text.split("\n")), flush=True)


class _Terminated(BaseException):
  """Raised in the main thread by SIGTERM, like KeyboardInterrupt by SIGINT."""


_SIGNALLED: list[int] = []


def _on_signal(signum, frame) -> None:  # pylint: disable=unused-argument
  """The first SIGINT/SIGTERM stops the work; later ones are ignored, so the
  cleanup and its one line are not cut short."""
  if _SIGNALLED:
    return
  _SIGNALLED.append(signum)
  if signum == signal.SIGINT:
    raise KeyboardInterrupt
  raise _Terminated


def _install_signal_handlers() -> None:
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, _on_signal)


def _interruption(signalled: BaseException, what: str) -> MigrationError:
  """The error for an interruption of the work on `what`, without the ending."""
  from migrate import errors  # pylint: disable=g-import-not-at-top
  if isinstance(signalled, _Terminated):
    return errors.TerminatedBySignal(f"{what}: terminated (SIGTERM)")
  return errors.InterruptedByUser(f"{what}: interrupted (Ctrl-C)")


def _memory_limit(processes: int) -> Optional[int]:
  from migrate import isolation  # pylint: disable=g-import-not-at-top
  if _MEMORY_LIMIT.value is None:
    return isolation.default_memory_limit(processes)
  return int(_MEMORY_LIMIT.value * 2**30) or None


def _timeout_for(src: str) -> Optional[float]:
  """--timeout, or the default for a module of this size (None: no limit)."""
  from migrate import fileutil  # pylint: disable=g-import-not-at-top
  from migrate import preflight
  if _TIMEOUT.value is not None:
    return _TIMEOUT.value or None
  return preflight.default_timeout(
      sum(f.size for f in fileutil.source_files(src)))


def _shape(shape) -> str:
  return "[" + ", ".join("None" if d is None else str(d) for d in shape) + "]"


def _print_conversion(r: dict) -> None:
  width = "?" if r["output_width"] is None else r["output_width"]
  size = (f"{r['default_image_size'][0]}x{r['default_image_size'][1]}"
          if r["default_image_size"] else "not recorded")
  training = "train graph" if r["has_train_graph"] else "none (inference only)"
  if r["hparams"]:
    training += f", keyword arguments: {', '.join(r['hparams'])}"
  lines = [
      f"converted {r['src']} -> {r['dst']}",
      f"  signature      {r['signature']} (output '{r['output_key']}', {r['kind']})",
      f"  input          float32 {_shape(r['input_shape'])}, default size {size}",
      f"  output         float32 [None, {width}]",
      f"  variables      {r['num_variables']} ({r['num_trainable_variables']} "
      f"trainable), {r['num_regularization_losses']} regularization losses",
      f"  training mode  {training}",
      f"  size           {r['output_bytes']} bytes ({r['size_ratio']:.3f}x the input)",
      "  parity         " + (r["parity"]["summary"] if r["parity"]
                             else "UNVERIFIED (--noverify)"),
  ]
  lines += [f"  note           {note}" for note in r["notes"]]
  _print_out("\n".join(lines))


def _check_reports_outside(*inputs: str) -> None:
  """Refuses a --report file inside an input (by inode): SRC is never written."""
  from migrate import errors  # pylint: disable=g-import-not-at-top
  from migrate import staging
  for path in (_REPORT.value or "").split(","):
    if not path.strip():
      continue
    target = os.path.dirname(os.path.realpath(path.strip()))
    for given in inputs:
      if os.path.isdir(given) and staging.is_within(target, given):
        raise errors.OutputError(
            f"{path.strip()}: expected a report path outside the input {given}, "
            f"found it inside (the input is never modified)")


def _write_report(report_json: str) -> None:
  if _REPORT.value and report_json:
    with open(_REPORT.value, "w", encoding="utf-8") as f:
      f.write(report_json)


def _reference_prestart(src: str) -> tuple[str, ...]:
  """What the worker prestarts: the reference side's child, when verification
  will give it one, so that its TensorFlow import overlaps the worker's."""
  from migrate import preflight  # pylint: disable=g-import-not-at-top
  prefix = os.path.join(src, preflight.CHECKPOINT_PREFIX)
  return ("migrate.verify",) if preflight.reference_child_pays(prefix) else ()


def _check_format(dst: str) -> None:
  """--format must agree with DST's name (a .keras file or a directory)."""
  from migrate import keras_format  # pylint: disable=g-import-not-at-top
  keras = keras_format.is_keras_path(dst)
  if _FORMAT.value == "keras" and not keras:
    raise _UsageError(f"--format=keras writes a .keras file: DST must end in "
                      f".keras, found {dst}")
  if _FORMAT.value == "savedmodel" and keras:
    raise _UsageError(f"--format=savedmodel writes a directory: DST may not "
                      f"end in .keras, found {dst}")


def _convert(src: str, dst: str) -> int:
  from migrate import errors  # pylint: disable=g-import-not-at-top
  from migrate import isolation
  from migrate import preflight
  from migrate import staging
  _check_format(dst)
  # What the file system alone shows is wrong is said at once, before a
  # worker imports TensorFlow; the worker checks again and goes deeper.
  preflight.check_source(src)
  preflight.check_destination(src, dst, overwrite=_OVERWRITE.value)
  _check_reports_outside(src)
  before = staging.path_identity(dst)
  try:
    try:
      result = isolation.run_isolated(
          "migrate.convert:convert_to_dict", src, dst, what=src,
          timeout=_timeout_for(src), quiet=not _VERBOSE.value,
          memory_limit=_memory_limit(2),  # The worker and its reference child.
          prestart=_reference_prestart(src) if _VERIFY.value else (),
          signature=_SIGNATURE.value, output_key=_OUTPUT_KEY.value,
          overwrite=_OVERWRITE.value,
          keep_output_dropout=_KEEP_OUTPUT_DROPOUT.value,
          verify=_VERIFY.value, keep_failed=_KEEP_FAILED.value,
          allow_unsafe_ops=_ALLOW_UNSAFE_OPS.value)
    except errors.ParityError as e:
      if e.table:
        _print_out(e.table)
      _write_report(e.report_json)
      raise
    except (errors.WorkerCrashedError, errors.WorkerTimeoutError,
            errors.ResourceLimitError) as e:
      # The worker renames the finished model into place, then sends its
      # summary: dying between the two leaves DST complete.
      raise staging.settled(e, dst, before, verified=_VERIFY.value) from None
    if result["parity"]:
      _print_out(result["parity"]["table"])
      _write_report(result["parity"]["json"])
    _print_conversion(result)
  except (KeyboardInterrupt, _Terminated) as e:
    raise staging.settled(_interruption(e, src), dst, before,
                          verified=_VERIFY.value) from None
  return ExitCode.OK


def _verify(old: str, new: str) -> int:
  from migrate import errors  # pylint: disable=g-import-not-at-top
  from migrate import isolation
  from migrate import keras_format
  from migrate import preflight
  preflight.check_source(old)
  if keras_format.is_keras_path(new):
    keras_format.check_converted(new)
  else:
    preflight.check_converted(new)
  _check_reports_outside(old, new)
  try:
    report = isolation.run_isolated(
        "migrate.convert:verify_to_dict", old, new, what=old,
        timeout=_timeout_for(old), quiet=not _VERBOSE.value,
        memory_limit=_memory_limit(2), prestart=_reference_prestart(old),
        allow_unsafe_ops=_ALLOW_UNSAFE_OPS.value)
  except (KeyboardInterrupt, _Terminated) as e:
    raise _interruption(e, old) from None
  _print_out(report["table"])
  _write_report(report["json"])
  if not report["passed"]:
    raise errors.ParityError(f"{new}: parity with {old} fails: "
                             f"{report['first_failure']}")
  _print_out(f"verified {new} against {old}: {report['summary']}")
  return ExitCode.OK


def _batch(src_root: str, dst_root: str) -> int:
  """Converts every module under SRC_ROOT (or in --manifest); 0 or 10."""
  import functools  # pylint: disable=g-import-not-at-top
  import time
  from migrate import batch
  from migrate import errors
  _check_reports_outside(src_root)
  if _MANIFEST.value:
    sources = batch.read_manifest(_MANIFEST.value, src_root, dst_root)
  else:
    sources = batch.discover(src_root, dst_root)
  if not sources:
    raise errors.InputNotFoundError(
        f"{src_root}: expected TF1 Hub modules (directories with "
        f"tfhub_module.pb, or .tar.gz module archives), found none")
  options = batch.ConvertOptions(
      signature=_SIGNATURE.value, output_key=_OUTPUT_KEY.value,
      keep_output_dropout=_KEEP_OUTPUT_DROPOUT.value, verify=_VERIFY.value,
      keep_failed=_KEEP_FAILED.value, allow_unsafe_ops=_ALLOW_UNSAFE_OPS.value,
      overwrite=_OVERWRITE.value, output_format=_FORMAT.value or "savedmodel")

  # Progress on stderr: a bar on a terminal, otherwise a line every ~15 s.
  tty = sys.stderr.isatty()
  bar = None
  last_line = [time.monotonic()]

  def say(line: str) -> None:
    if bar is not None:
      bar.write(line, file=sys.stderr)
    else:
      print(line, file=sys.stderr, flush=True)

  def on_progress(p) -> None:
    nonlocal bar
    if p.event == "planned":
      say(f"batch: {p.total + p.skipped} modules, {p.skipped} up to date, "
          f"{p.total - p.done} to convert with {jobs} worker(s)")
      if tty and p.total:
        from tqdm import tqdm  # pylint: disable=g-import-not-at-top
        bar = tqdm(total=p.total, initial=p.done, unit="module",
                   file=sys.stderr, mininterval=0.5, dynamic_ncols=True,
                   smoothing=0.1)
    if p.event == "finished" and p.outcome is not None:
      if p.outcome.failed:
        say(printable(f"FAILED {p.module}: [{p.outcome.exit_code}] "
                      f"{p.outcome.error}"))
      if bar is not None and not p.outcome.status.startswith("skipped"):
        bar.update(1)
    if bar is not None:
      bar.total = p.total
      bar.set_postfix_str(f"{p.converted} ok, {p.failed} failed, "
                          f"{p.running} running", refresh=False)
      if p.event == "tick":
        bar.refresh()
    elif p.event in ("finished", "tick") and time.monotonic() - last_line[0] >= 15:
      last_line[0] = time.monotonic()
      say(f"batch: {p.describe()}")

  jobs = _JOBS.value or batch.default_jobs()
  if _BEAM_ARGS.value is not None:
    import shlex  # pylint: disable=g-import-not-at-top
    try:
      from migrate import beam_pipeline  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise _UsageError(f"--beam_args needs apache_beam ({e}): pip install "
                        f"'migrate-hub-module[beam]'") from None
    print(f"batch: {len(sources)} modules, as a Beam pipeline", file=sys.stderr)
    run = functools.partial(beam_pipeline.run_pipeline,
                            pipeline_args=shlex.split(_BEAM_ARGS.value) or None)
  else:
    run = functools.partial(batch.run_batch, jobs=jobs, on_progress=on_progress,
                            quiet=not _VERBOSE.value,
                            memory_limit=_memory_limit(jobs))
  try:
    report = run(sources, dst_root, timeout=_TIMEOUT.value, options=options)
  except (KeyboardInterrupt, _Terminated) as e:
    if bar is not None:
      bar.close()
      bar = None
    error = _interruption(e, dst_root)
    raise type(error)(
        f"{error}; finished modules are recorded in "
        f"{os.path.join(dst_root, batch.STATE_FILENAME)}, the interrupted ones "
        f"left nothing: rerun to complete") from None
  finally:
    if bar is not None:
      bar.close()
  _print_out(report.format_table())
  for path in (_REPORT.value or "").split(","):
    if path.strip():
      report.write(path.strip())
  return report.exit_code


class _UsageError(Exception):
  pass


def main(argv: Sequence[str]) -> int:
  """Runs one command; returns its exit code (never raises for user errors)."""
  args = list(argv[1:])
  try:
    if args and args[0] == "verify":
      if len(args) != 3:
        raise _UsageError("verify takes OLD NEW")
      return _verify(args[1], args[2])
    if args and args[0] == "batch":
      if len(args) != 3:
        raise _UsageError("batch takes SRC_ROOT DST_ROOT")
      return _batch(args[1], args[2])
    if len(args) != 2:
      raise _UsageError(f"expected SRC DST, found {len(args)} argument(s)")
    return _convert(args[0], args[1])
  except _UsageError as e:
    _print_error(f"{e} (see --help)")
    return ExitCode.USAGE
  except MigrationError as e:
    _print_error(str(e))
    if _VERBOSE.value and getattr(e, "traceback_text", ""):
      print(e.traceback_text, file=sys.stderr)
    return e.exit_code
  except (KeyboardInterrupt, _Terminated) as e:  # Before any work began.
    error = _interruption(e, PROG)
    _print_error(f"{error}; nothing was written")
    return error.exit_code
  except Exception as e:  # pylint: disable=broad-except
    if _VERBOSE.value:
      raise
    _print_error(f"internal error ({type(e).__name__}: {first_line(e)}); this "
                 f"is a bug in {PROG}: rerun with --verbose and report it")
    return ExitCode.INTERNAL


def _parse_flags(argv: Sequence[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _print_error(f"{e} (see --help)")
    sys.exit(ExitCode.USAGE)


def run() -> None:
  """Console-script entry point."""
  _install_signal_handlers()
  logging.set_verbosity(logging.ERROR)
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
