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

# TensorFlow runs only in child processes (migrate.isolation); this process
# never imports it, so it starts fast and prints only its own lines.
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


def _print_error(message: str) -> None:
  print(f"{PROG}: error: {message}", file=sys.stderr)


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
  print("\n".join(lines))


def _write_report(report_json: str) -> None:
  if _REPORT.value and report_json:
    with open(_REPORT.value, "w", encoding="utf-8") as f:
      f.write(report_json)


def _convert(src: str, dst: str) -> int:
  from migrate import errors  # pylint: disable=g-import-not-at-top
  from migrate import isolation
  try:
    result = isolation.run_isolated(
        "migrate.convert:convert_to_dict", src, dst, what=src,
        timeout=_TIMEOUT.value, quiet=not _VERBOSE.value,
        signature=_SIGNATURE.value, output_key=_OUTPUT_KEY.value,
        overwrite=_OVERWRITE.value,
        keep_output_dropout=_KEEP_OUTPUT_DROPOUT.value,
        verify=_VERIFY.value, keep_failed=_KEEP_FAILED.value,
        allow_unsafe_ops=_ALLOW_UNSAFE_OPS.value)
  except errors.ParityError as e:
    if e.table:
      print(e.table)
    _write_report(e.report_json)
    raise
  if result["parity"]:
    print(result["parity"]["table"])
    _write_report(result["parity"]["json"])
  _print_conversion(result)
  return ExitCode.OK


def _verify(old: str, new: str) -> int:
  from migrate import errors  # pylint: disable=g-import-not-at-top
  from migrate import isolation
  report = isolation.run_isolated(
      "migrate.convert:verify_to_dict", old, new, what=old,
      timeout=_TIMEOUT.value, quiet=not _VERBOSE.value,
      allow_unsafe_ops=_ALLOW_UNSAFE_OPS.value)
  print(report["table"])
  _write_report(report["json"])
  if not report["passed"]:
    raise errors.ParityError(f"{new}: parity with {old} fails: "
                             f"{report['first_failure']}")
  print(f"verified {new} against {old}: {report['summary']}")
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
