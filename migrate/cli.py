"""`migrate-hub-module`: the command line. The only module with flags and prints.

    migrate-hub-module [flags] SRC DST                  convert one module
    migrate-hub-module [flags] SRC DST.keras            ... into a native Keras 3 model
    migrate-hub-module verify [flags] OLD NEW           check a pair made earlier
    migrate-hub-module batch [flags] SRC_ROOT DST_ROOT  convert every module in a tree

`-h`/`--help` on each command lists its arguments and flags. The flags of a
conversion are the fields of `migrate.options.ConvertOptions` (same names):
this module builds one `ConvertOptions` from them and passes it on. Flags
may stand before, between or after the arguments; a boolean flag `--x` also
takes `--nox` and `--x=true|false`. Exit codes: `migrate/errors.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import textwrap
from typing import Callable, Optional, Sequence

# TensorFlow runs only in child processes (migrate.isolation); this process
# never imports it, so it starts fast and prints only its own lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import migrate  # pylint: disable=g-import-not-at-top
from migrate import options as options_lib
from migrate.errors import ExitCode, MigrationError, first_line, printable

PROG = "migrate-hub-module"

_EXIT_CODES = """\
exit codes:
  0 ok, 1 internal error (a bug: rerun with --verbose), 2 usage, 3 input not
  found, 4 not a TF1 Hub module, 5 unsupported module, 6 corrupt module,
  7 output problem, 8 unsafe ops, 9 parity failure, 10 batch with failures,
  11 TensorFlow crashed on the module, 12 timeout, 13 out of memory,
  130 interrupted (Ctrl-C), 143 terminated (SIGTERM; 129 SIGHUP, 131 SIGQUIT)"""


# -- the flags -----------------------------------------------------------------
# A flag whose name is a field of ConvertOptions sets that field (see
# `_options`); the others are the CLI's own. Unset flags are absent from the
# parsed arguments (argparse.SUPPRESS): the dataclass's defaults apply.


class _Bool(argparse.Action):
  """A boolean flag `--x`, with `--nox` (as absl spells it) to turn it off."""

  def __init__(self, option_strings, dest, **kwargs):
    name = option_strings[0][2:]
    super().__init__([f"--{name}", f"--no{name}"], dest, nargs=0, **kwargs)

  def __call__(self, parser, namespace, values, option_string=None):
    setattr(namespace, self.dest, not option_string.startswith("--no"))

  def format_usage(self) -> str:
    return " | ".join(self.option_strings)


def _non_negative(text: str) -> float:
  value = float(text)
  if not 0 <= value < float("inf"):
    raise ValueError(text)
  return value


def _gib(text: str) -> float:
  """GiB: non-negative, at most `options.MAX_MEMORY_LIMIT_GIB`."""
  value = _non_negative(text)
  if value > options_lib.MAX_MEMORY_LIMIT_GIB:
    raise ValueError(text)
  return value


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise ValueError(text)
  return value


_non_negative.__name__ = "non-negative number"  # What argparse's error names.
_gib.__name__ = "number of GiB (0 to 1048576)"
_positive_int.__name__ = "positive integer"


def _conversion_flags(parser: argparse.ArgumentParser) -> None:
  """The flags that say what to convert and how (convert and batch)."""
  g = parser.add_argument_group("conversion")
  g.add_argument("--signature", metavar="NAME", help=(
      "TF1 signature behind __call__ (default: the one that 'default' "
      "duplicates, else image_feature_vector, else image_classification)"))
  g.add_argument("--output_key", metavar="KEY", help=(
      "output of that signature (default: 'default', or the only output)"))
  g.add_argument("--overwrite", action=_Bool, help="replace an existing DST")
  g.add_argument("--keep_output_dropout", action=_Bool, help=(
      "keep dropout that the train graph applies to the output features "
      "(against the image feature vector API)"))
  g.add_argument("--verify", action=_Bool, help=(
      "check parity with the TF1 module before the output is moved into "
      "place (default; --noverify skips it: the output is then unverified)"))
  g.add_argument("--keep_failed", action=_Bool, help=(
      "keep a model that fails parity at DST.failed-parity for inspection"))
  g.add_argument("--format", dest="output_format", choices=options_lib.FORMATS,
                 help=("output format: a TF2 SavedModel directory, or a native "
                       "Keras 3 model file (.keras). Default: keras for a DST "
                       "ending in .keras, else savedmodel; batch: savedmodel, "
                       "keras writes DST_ROOT/<module>.keras"))


def _scan_flags(parser: argparse.ArgumentParser) -> None:
  """The flags of what is proven (convert, verify and batch)."""
  g = parser.add_argument_group("safety")
  g.add_argument("--allow_unsafe_ops", action=_Bool, help=(
      "accept modules whose graphs contain ops that reach the file system, "
      "the network or the Python process (exit 8 otherwise)"))
  g.add_argument("--consumers", choices=("default", "all"), help=(
      "which consumers of the converted SavedModel verification loads it "
      "through, each compared with the TF1 module: default the TF1 loader "
      "(saved_model_cli; the saver's restore, as TF Serving and TFLite do); "
      "all also the C API loader (TF Serving's), TFLite, Keras 3's TFSMLayer "
      "and tf_keras' hub.KerasLayer, each with a fit step (slower)"))


def _run_flags(parser: argparse.ArgumentParser, *, batch: bool = False) -> None:
  """Limits, reports and diagnostics (every command)."""
  g = parser.add_argument_group("run")
  g.add_argument("--timeout", metavar="SECONDS", type=_non_negative, help=(
      f"stop the work on a module after this many seconds{' (per module)' if batch else ''}; "
      f"default: 600 s plus 6 s per MiB of the module; 0: no limit"))
  g.add_argument("--memory_limit", metavar="GIB", type=_gib, help=(
      "GiB of memory (data segment) each TensorFlow process may use; beyond "
      "it the module fails with exit code 13. Default: 3/4 of the machine's "
      "memory shared by the processes that run at once (1 per conversion or "
      "batch worker, 2 per conversion to .keras), at least 2 GiB; 0: no limit"))
  g.add_argument("--report",
                 metavar="FILE.json,FILE.csv,FILE.html" if batch else "FILE.json",
                 help=("write the batch report to these files (JSON, CSV or a "
                       "sortable HTML page, by extension)" if batch else
                       "write the parity report as JSON to this file"))
  g.add_argument("--verbose", action=_Bool,
                 help="on an internal error, print the traceback")


def _batch_flags(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("batch")
  g.add_argument("--manifest", metavar="FILE.csv", help=(
      "convert the modules listed in this CSV (columns source, destination[, "
      "signature, output_key]; relative sources resolve under SRC_ROOT, "
      "relative destinations under DST_ROOT) instead of scanning SRC_ROOT"))
  g.add_argument("--jobs", metavar="N", type=_positive_int, help=(
      "modules converted at a time, each in its own worker process (default: "
      "the number of cores)"))
  g.add_argument("--beam_args", metavar="ARGS", help=(
      "run the batch as an Apache Beam pipeline with these pipeline options "
      "(a quoted string, as for the DirectRunner: \"--runner=DirectRunner "
      "--direct_num_workers=2\"; needs the [beam] extra)"))


class _Formatter(argparse.RawDescriptionHelpFormatter):
  """Shows a boolean flag as `--[no]x`, as absl did."""

  def _format_action_invocation(self, action):
    if isinstance(action, _Bool):
      return f"--[no]{action.option_strings[0][2:]}"
    return super()._format_action_invocation(action)


class _Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one line and exit code 2 (`_UsageError`)."""

  def error(self, message: str):
    raise _UsageError(message)


@dataclasses.dataclass(frozen=True)
class _Command:
  """A command: its arguments (names, what each is) and its parser."""

  name: Optional[str]  # None: the conversion (no command word).
  arguments: tuple[tuple[str, str], ...]
  summary: str  # In the list of commands.
  description: str  # At the top of its help.
  add_flags: Callable[[argparse.ArgumentParser], None]

  @property
  def words(self) -> str:
    return " ".join(([self.name] if self.name else []) +
                    [a for a, _ in self.arguments])

  def usage(self) -> str:
    return f"{PROG} {(self.name + ' ') if self.name else ''}[flags] " + " ".join(
        a for a, _ in self.arguments)

  def flag_fields(self) -> set[str]:
    """The names of the fields its flags set."""
    return {a.dest for a in self.parser()._actions}  # pylint: disable=protected-access

  def parser(self) -> _Parser:
    def item(name: str, text: str, width: int) -> list[str]:
      return textwrap.wrap(text, 79, initial_indent=f"  {name:<{width}} ",
                           subsequent_indent=" " * (width + 3))
    lines = textwrap.wrap(self.description, 79) + ["", "arguments:"]
    for a, what in self.arguments:
      lines += item(a, what, 9)
    if self.name is None:
      lines += ["", "commands:"]
      for c in COMMANDS:
        lines += item(c.words, c.summary, 24)
      lines += [f"  ({PROG} COMMAND --help describes each)"]
    parser = _Parser(
        prog=PROG if self.name is None else f"{PROG} {self.name}",
        usage="\n       ".join([self.usage()] + (
            [c.usage() for c in COMMANDS[1:]] if self.name is None else [])),
        description="\n".join(lines), epilog=_EXIT_CODES,
        formatter_class=_Formatter,
        argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version",
                        version=f"{PROG} {migrate.__version__}")
    self.add_flags(parser)
    return parser


def _convert_flags(parser: argparse.ArgumentParser) -> None:
  _conversion_flags(parser)
  _scan_flags(parser)
  _run_flags(parser)


def _verify_flags(parser: argparse.ArgumentParser) -> None:
  _scan_flags(parser)
  _run_flags(parser)


def _all_batch_flags(parser: argparse.ArgumentParser) -> None:
  _batch_flags(parser)
  _conversion_flags(parser)
  _scan_flags(parser)
  _run_flags(parser, batch=True)


COMMANDS = (
    _Command(None, (("SRC", "a TF1 Hub module directory (hub.Module format)"),
                    ("DST", "the output: a TF2 SavedModel directory, or a "
                            "native Keras 3 model if it ends in .keras")),
             "convert one module (no command word)",
             "Convert a TF1 Hub image module (hub.Module format) into a TF2 "
             "Reusable SavedModel, or a native Keras 3 model, and prove that "
             "it computes what the module did before it appears at DST.",
             _convert_flags),
    _Command("verify", (("OLD", "the TF1 Hub module"),
                        ("NEW", "a model converted from it (a SavedModel "
                                "directory or a .keras file)")),
             "check a converted model against its module",
             "Check that NEW, converted earlier (or by other means), computes "
             "what the TF1 module OLD did: the same parity checks as a "
             "conversion.", _verify_flags),
    _Command("batch", (("SRC_ROOT", "a tree of TF1 Hub modules and .tar.gz "
                                    "module archives (or see --manifest)"),
                       ("DST_ROOT", "where the converted tree goes (and the "
                                    "batch's state, for resuming)")),
             "convert every module of a tree, resumably",
             "Convert and verify every module under SRC_ROOT (or listed in "
             "--manifest), each in its own worker process, into the same tree "
             "under DST_ROOT. A rerun skips what is up to date. The conversion "
             "flags apply to every module.", _all_batch_flags),
)


# -- parsing ---------------------------------------------------------------------

_BOOLEANS = {"true": True, "t": True, "1": True, "false": False, "f": False, "0": False}


def _command(args: Sequence[str]) -> tuple[_Command, list[str]]:
  """The command (the first argument that is not a flag or a flag's value)
  and the arguments without its word."""
  takes_value = {s for p in [COMMANDS[0].parser(), COMMANDS[2].parser()]
                 for a in p._actions if a.nargs is None  # pylint: disable=protected-access
                 for s in a.option_strings}
  skip = False
  for i, arg in enumerate(args):
    if skip:
      skip = False
    elif arg == "--":
      break
    elif arg.startswith("-"):
      skip = arg in takes_value
    else:
      for command in COMMANDS[1:]:
        if command.name == arg:
          return command, [*args[:i], *args[i + 1:]]
      break
  return COMMANDS[0], list(args)


def _parse(command: _Command, args: Sequence[str]) -> argparse.Namespace:
  """Parses `args` (without the command word); `_UsageError` for a wrong
  command line. `--help` and `--version` print and exit 0 (SystemExit)."""
  parser = command.parser()
  booleans = {s for a in parser._actions if isinstance(a, _Bool)  # pylint: disable=protected-access
              for s in a.option_strings}
  normal = []
  for arg in args:
    flag, eq, value = arg.partition("=")
    if eq and flag in booleans and value.lower() in _BOOLEANS:
      # absl's spelling `--x=false`: argparse takes `--x` / `--nox`.
      on = _BOOLEANS[value.lower()] != flag.startswith("--no")
      flag = "--" + flag[len("--no") if flag.startswith("--no") else 2:]
      arg = flag if on else "--no" + flag[2:]
    normal.append(arg)
  parsed, unknown = parser.parse_known_intermixed_args(normal)
  flags = [a for a in unknown if a.startswith("-")]
  if flags:
    raise _UsageError(f"Unknown command line flag "
                      f"'{flags[0].lstrip('-').split('=', 1)[0]}'")
  paths = getattr(parsed, "paths", []) + unknown
  if len(paths) != len(command.arguments):
    words = " ".join(a for a, _ in command.arguments)
    raise _UsageError(
        f"expected {words}, found {len(paths)} argument(s)" if command.name is None
        else f"{command.name} takes {words}, found {len(paths)} argument(s)")
  parsed.paths = paths
  return parsed


def parse(args: Sequence[str]) -> argparse.Namespace:
  """A command line without the program name, parsed: `command` (None for
  a conversion, "verify" or "batch"), `paths`, and a field per flag
  (`convert_options()` makes the ConvertOptions of them). `_UsageError` for a wrong
  command line; `--help` and `--version` print and exit 0 (SystemExit)."""
  command, given = _command(args)
  parsed = _parse(command, given)
  parsed.command = command.name
  return parsed


def convert_options(args: argparse.Namespace) -> options_lib.ConvertOptions:
  """The ConvertOptions of the flags given (a flag sets the field of its name)."""
  return options_lib.ConvertOptions(**{
      f.name: getattr(args, f.name) for f in dataclasses.fields(
          options_lib.ConvertOptions) if hasattr(args, f.name)})


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
  """Raised in the main thread by SIGTERM, SIGHUP or SIGQUIT, like
  KeyboardInterrupt by SIGINT; `args[0]` is the signal."""


_SIGNALLED: list[int] = []


def _on_signal(signum, frame) -> None:  # pylint: disable=unused-argument
  """The first signal stops the work; later ones are ignored, so the
  cleanup and its one line are not cut short."""
  if _SIGNALLED:
    return
  _SIGNALLED.append(signum)
  if signum == signal.SIGINT:
    raise KeyboardInterrupt
  raise _Terminated(signum)


def _install_signal_handlers() -> None:
  for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
    if signal.getsignal(signum) is signal.SIG_IGN:
      continue  # Ignored by who started us (nohup: SIGHUP), as Python does.
    signal.signal(signum, _on_signal)


def _interruption(signalled: BaseException, what: str) -> MigrationError:
  """The error for an interruption of the work on `what`, without the ending."""
  from migrate import errors  # pylint: disable=g-import-not-at-top
  if isinstance(signalled, _Terminated):
    signum = signalled.args[0] if signalled.args else signal.SIGTERM
    kind = {signal.SIGHUP: errors.HungUp,
            signal.SIGQUIT: errors.Quit}.get(signum, errors.TerminatedBySignal)
    return kind(f"{what}: terminated ({signal.Signals(signum).name})")
  return errors.InterruptedByUser(f"{what}: interrupted (Ctrl-C)")


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


def _report_paths(args: argparse.Namespace) -> list[str]:
  return [p.strip() for p in getattr(args, "report", "").split(",") if p.strip()]


def _open_reports(args: argparse.Namespace, *protected: str) -> list:
  """The --report files, checked before the run (`staging.ReportFile`): no
  input or output is written by them, and a wrong path costs no conversion."""
  from migrate import staging  # pylint: disable=g-import-not-at-top
  reports: list = []
  try:
    for path in _report_paths(args):
      reports.append(staging.ReportFile(path, protected=protected))
  except BaseException:
    for report in reports:
      report.close()
    raise
  return reports


def _write_reports(reports: list, render: Callable[[str], str]) -> Optional[str]:
  """Writes `render(path)` to each report and closes them; the first
  failure's line, or None. A report that cannot be written must not hide
  what happened to the model, so the caller says both."""
  failed = None
  for report in reports:
    try:
      report.write(render(report.path))
    except MigrationError as e:
      failed = failed or str(e)
    finally:
      report.close()
  return failed


def _reference_child(src: str, dst: str) -> bool:
  """Whether a verified conversion gives the reference side a child process:
  one to a Keras 3 model does (`keras_convert`) for big modules; one to a
  SavedModel runs it in a thread of the worker (`verify.start_reference`)."""
  from migrate import keras_format  # pylint: disable=g-import-not-at-top
  from migrate import preflight
  prefix = os.path.join(src, preflight.CHECKPOINT_PREFIX)
  return keras_format.is_keras_path(dst) and preflight.reference_child_pays(prefix)


def _worker_limits(src: str, dst: str, options: options_lib.ConvertOptions
                   ) -> dict:
  """`run_isolated`'s memory limit and prestart for a conversion: the
  reference side's child is prestarted, if there is one, so that its
  TensorFlow import overlaps the worker's."""
  child = options.verify and _reference_child(src, dst)
  return {"memory_limit": options.memory_limit_bytes(2 if child else 1),
          "prestart": ("migrate.verify",) if child else ()}


def _timeout_for(src: str, options: options_lib.ConvertOptions) -> Optional[float]:
  """--timeout, or the default for a module of this size (None: no limit)."""
  from migrate import fileutil  # pylint: disable=g-import-not-at-top
  from migrate import preflight
  if options.timeout is not None:
    return options.timeout or None
  return preflight.default_timeout(
      sum(f.size for f in fileutil.source_files(src)))


def _convert(args: argparse.Namespace, src: str, dst: str) -> int:
  from migrate import errors  # pylint: disable=g-import-not-at-top
  from migrate import isolation
  from migrate import keras_format
  from migrate import preflight
  from migrate import staging
  options = convert_options(args)
  try:
    keras_format.check_format(dst, options.output_format)
  except errors.UsageError as e:
    raise _UsageError(str(e)) from None
  # What the file system alone shows is wrong is said at once, before a
  # worker imports TensorFlow; the worker checks again and goes deeper.
  preflight.check_source(src)
  preflight.check_destination(src, dst, overwrite=options.overwrite)
  reports = _open_reports(args, src, dst)
  before = staging.path_identity(dst)
  try:
    try:
      result = isolation.run_isolated(
          "migrate.convert:convert_to_dict", src, dst, options, what=src,
          timeout=_timeout_for(src, options), quiet=not args.verbose,
          **_worker_limits(src, dst, options))
    except errors.ParityError as e:
      if e.table:
        _print_out(e.table)
      failed = _write_reports(reports, lambda _: e.report_json)
      if failed:
        raise errors.ParityError(f"{e}; and {failed}") from None
      raise
    except (errors.WorkerCrashedError, errors.WorkerTimeoutError,
            errors.ResourceLimitError) as e:
      # The worker renames the finished model into place, then sends its
      # summary: dying between the two leaves DST complete.
      raise staging.settled(e, dst, before, verified=options.verify) from None
    failed = None
    if result["parity"]:
      _print_out(result["parity"]["table"])
      failed = _write_reports(reports, lambda _: result["parity"]["json"])
    _print_conversion(result)
    if failed:
      raise errors.OutputError(
          f"{failed}; {dst} is complete"
          f"{' and verified' if options.verify else ''}")
  except (KeyboardInterrupt, _Terminated) as e:
    raise staging.settled(_interruption(e, src), dst, before,
                          verified=options.verify) from None
  return ExitCode.OK


def _verify(args: argparse.Namespace, old: str, new: str) -> int:
  from migrate import errors  # pylint: disable=g-import-not-at-top
  from migrate import isolation
  from migrate import keras_format
  from migrate import preflight
  options = convert_options(args)
  preflight.check_source(old)
  if keras_format.is_keras_path(new):
    keras_format.check_converted(new)
  else:
    preflight.check_converted(new)
  reports = _open_reports(args, old, new)
  try:
    report = isolation.run_isolated(
        "migrate.convert:verify_to_dict", old, new, options, what=old,
        timeout=_timeout_for(old, options), quiet=not args.verbose,
        memory_limit=options.memory_limit_bytes(1))  # Verification: one process.
  except (KeyboardInterrupt, _Terminated) as e:
    raise _interruption(e, old) from None
  _print_out(report["table"])
  failed = _write_reports(reports, lambda _: report["json"])
  if not report["passed"]:
    raise errors.ParityError(f"{new}: parity with {old} fails: "
                             f"{report['first_failure']}"
                             + (f"; and {failed}" if failed else ""))
  _print_out(f"verified {new} against {old}: {report['summary']}")
  if failed:
    raise errors.OutputError(f"{failed}; {new} passed verification")
  return ExitCode.OK


def _batch(args: argparse.Namespace, src_root: str, dst_root: str) -> int:
  """Converts every module under SRC_ROOT (or in --manifest); 0 or 10."""
  import functools  # pylint: disable=g-import-not-at-top
  import time
  from migrate import batch
  from migrate import batch_report
  from migrate import errors
  options = convert_options(args)
  try:
    for path in _report_paths(args):
      batch_report.report_format(path)
  except errors.UsageError as e:
    raise _UsageError(str(e)) from None
  manifest = getattr(args, "manifest", None)
  if manifest:
    sources = batch.read_manifest(manifest, src_root, dst_root)
  else:
    sources = batch.discover(src_root, dst_root)
  if not sources:
    raise errors.InputNotFoundError(
        f"{src_root}: expected TF1 Hub modules (directories with "
        f"tfhub_module.pb, or .tar.gz module archives), found none")
  from migrate import batch_sources  # pylint: disable=g-import-not-at-top
  reports = _open_reports(args, src_root, *(
      s.location for s in sources if not batch_sources.is_url(s.location)))

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

  jobs = getattr(args, "jobs", None) or batch.default_jobs()
  beam_args = getattr(args, "beam_args", None)
  if beam_args is not None:
    import shlex  # pylint: disable=g-import-not-at-top
    try:
      from migrate import beam_pipeline  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise _UsageError(f"--beam_args needs apache_beam ({e}): pip install "
                        f"'migrate-hub-module[beam]'") from None
    print(f"batch: {len(sources)} modules, as a Beam pipeline", file=sys.stderr)
    run = functools.partial(beam_pipeline.run_pipeline,
                            pipeline_args=shlex.split(beam_args) or None)
  else:
    run = functools.partial(batch.run_batch, jobs=jobs, on_progress=on_progress,
                            quiet=not args.verbose)
  try:
    report = run(sources, dst_root, options)
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
  _print_out(report.format_summary())
  failed = _write_reports(reports, report.render)
  if failed:
    raise errors.OutputError(
        f"{failed}; the batch itself finished: {report.summary()}")
  return report.exit_code


class _UsageError(Exception):
  pass


def main(argv: Sequence[str]) -> int:
  """Runs one command; returns its exit code (never raises for user errors)."""
  args = argparse.Namespace(verbose=False)
  try:
    try:
      args = parse(argv[1:])
    except SystemExit as e:  # --help, --version: printed.
      return e.code or ExitCode.OK
    args.verbose = getattr(args, "verbose", False)
    run = {None: _convert, "verify": _verify, "batch": _batch}[args.command]
    return run(args, *args.paths)
  except _UsageError as e:
    _print_error(f"{e} (see --help)")
    return ExitCode.USAGE
  except MigrationError as e:
    _print_error(str(e))
    if args.verbose and getattr(e, "traceback_text", ""):
      print(e.traceback_text, file=sys.stderr)
    return e.exit_code
  except (KeyboardInterrupt, _Terminated) as e:  # Before any work began.
    error = _interruption(e, PROG)
    _print_error(f"{error}; nothing was written")
    return error.exit_code
  except Exception as e:  # pylint: disable=broad-except
    if args.verbose:
      raise
    _print_error(f"internal error ({type(e).__name__}: {first_line(e)}); this "
                 f"is a bug in {PROG}: rerun with --verbose and report it")
    return ExitCode.INTERNAL


def run() -> None:
  """Console-script entry point."""
  _install_signal_handlers()
  sys.exit(main(sys.argv))


if __name__ == "__main__":
  run()
