"""`migrate-hub-module`: the command line. The only module with flags and prints.

    migrate-hub-module SRC DST [--signature=] [--output_key=] [--overwrite]
                       [--keep_output_dropout] [--noverify] [--keep_failed]
                       [--report=FILE.json] [--allow_unsafe_ops]
    migrate-hub-module verify OLD NEW [--report=FILE.json]
    migrate-hub-module batch SRC_ROOT DST_ROOT [--manifest=FILE.csv] [--jobs=N]
                       [--timeout=SECONDS] [--report=FILE.json]

Exit codes (see migrate/errors.py): 0 ok, 1 internal error, 2 usage,
3 input not found, 4 not a TF1 Hub module, 5 unsupported module, 6 corrupt
module, 7 output problem, 8 unsafe ops, 9 parity failure, 10 batch with
failures, 11 TensorFlow crashed on the module, 12 timeout.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

# TensorFlow's C++ start-up chatter would bury the one line we print.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

from migrate.errors import ExitCode, MigrationError

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
    "(batch: per module).", lower_bound=1)
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an internal error, print "
                             "the traceback.")


def _import_tensorflow_quietly() -> None:
  """Imports TensorFlow with native stderr silenced (CUDA probes, CPU notes).

  Errors are this tool's own one-line messages; what TensorFlow's C++ side
  prints while loading would bury them. Python-level errors still surface.
  """
  if _VERBOSE.value:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    return
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import,redefined-outer-name
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def _print_error(message: str) -> None:
  print(f"{PROG}: error: {message}", file=sys.stderr)


def _shape(shape) -> str:
  return "[" + ", ".join("None" if d is None else str(d) for d in shape) + "]"


def _print_conversion(result) -> None:
  width = "?" if result.output_width is None else result.output_width
  size = (f"{result.default_image_size[0]}x{result.default_image_size[1]}"
          if result.default_image_size else "not recorded")
  lines = [
      f"converted {result.src} -> {result.dst}",
      f"  signature      {result.signature} (output '{result.output_key}', "
      f"{result.kind})",
      f"  input          float32 {_shape(result.input_shape)}, default size {size}",
      f"  output         float32 [None, {width}]",
      f"  variables      {result.num_variables} ({result.num_trainable_variables} "
      f"trainable), {result.num_regularization_losses} regularization losses",
      f"  training mode  {'train graph' if result.has_train_graph else 'none (inference only)'}"
      + (f", keyword arguments: {', '.join(result.hparams)}" if result.hparams else ""),
      f"  size           {result.output_bytes} bytes ({result.size_ratio:.3f}x the input)",
  ]
  if result.parity is None:
    lines.append("  parity         UNVERIFIED (--noverify)")
  else:
    lines.append(f"  parity         {result.parity.summary()}")
  for note in result.notes:
    lines.append(f"  note           {note}")
  print("\n".join(lines))


def _write_report(report) -> None:
  if _REPORT.value and report is not None:
    with open(_REPORT.value, "w", encoding="utf-8") as f:
      f.write(report.to_json())


def _convert(src: str, dst: str) -> int:
  from migrate import convert  # pylint: disable=g-import-not-at-top
  from migrate import isolation
  try:
    result = isolation.run_isolated(
        convert.convert, src, dst, what=src, timeout=_TIMEOUT.value,
        quiet=not _VERBOSE.value,
        signature=_SIGNATURE.value, output_key=_OUTPUT_KEY.value,
        overwrite=_OVERWRITE.value,
        keep_output_dropout=_KEEP_OUTPUT_DROPOUT.value,
        verify=_VERIFY.value, keep_failed=_KEEP_FAILED.value,
        allow_unsafe_ops=_ALLOW_UNSAFE_OPS.value)
  except MigrationError as e:
    report = getattr(e, "report", None)
    if report is not None:
      print(report.format_table())
      _write_report(report)
    raise
  if result.parity is not None:
    print(result.parity.format_table())
    _write_report(result.parity)
  _print_conversion(result)
  return ExitCode.OK


def _verify(old: str, new: str) -> int:
  from migrate import convert  # pylint: disable=g-import-not-at-top
  from migrate import errors
  from migrate import isolation
  report = isolation.run_isolated(
      convert.verify_existing, old, new, what=old, timeout=_TIMEOUT.value,
      quiet=not _VERBOSE.value, allow_unsafe_ops=_ALLOW_UNSAFE_OPS.value)
  print(report.format_table())
  _write_report(report)
  if not report.passed:
    raise errors.ParityError(f"{new}: parity with {old} fails: "
                             f"{report.first_failure}")
  print(f"verified {new} against {old}: {report.summary()}")
  return ExitCode.OK


def _batch(src_root: str, dst_root: str) -> int:
  from migrate import batch  # pylint: disable=g-import-not-at-top
  return batch.main(src_root, dst_root)


class _UsageError(Exception):
  pass


def main(argv: Sequence[str]) -> int:
  """Runs one command; returns its exit code (never raises for user errors)."""
  args = list(argv[1:])
  try:
    _import_tensorflow_quietly()
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
  except KeyboardInterrupt:
    _print_error("interrupted; nothing was written")
    return 130
  except Exception as e:  # pylint: disable=broad-except
    if _VERBOSE.value:
      raise
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    _print_error(f"internal error ({type(e).__name__}: {text[:300]}); this is a "
                 f"bug in {PROG}: rerun with --verbose and report it")
    return ExitCode.INTERNAL


def _parse_flags(argv: Sequence[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _print_error(f"{e} (see --help)")
    sys.exit(ExitCode.USAGE)


def run() -> None:
  """Console-script entry point."""
  logging.set_verbosity(logging.ERROR)
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
