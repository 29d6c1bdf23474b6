"""The public API: convert one TF1 Hub image module, verified, atomically.

    result = convert("old_module/", "new_savedmodel/")

chains the stages READ (legacy_format) -> PLAN (plan) -> SCAN (safety) ->
REWRITE/BUILD (graph_rewrite, build) -> EXPORT (export, into a temporary
directory beside DST, whose parent is held open: staging) -> SCAN of what was
written -> VERIFY (verify) -> commit (rename into place).

Errors TensorFlow raises for a module it cannot run (an op it refuses, an
allocation that fails) are mapped here, at the boundary, to documented exit
codes (`_tensorflow_errors`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Iterator, NoReturn, Optional, Sequence

from migrate import build as build_lib
from migrate import errors
from migrate import export
from migrate import fileutil
from migrate import keras_format
from migrate import legacy_format
from migrate import options as options_lib
from migrate import plan as plan_lib
from migrate import preflight
from migrate import safety
from migrate import staging

FAILED_SUFFIX = ".failed-parity"


@dataclasses.dataclass
class ConversionResult:
  """What `convert` did; `parity` is None when verification was skipped."""

  src: str
  dst: str
  signature: str
  output_key: str
  kind: str
  input_shape: tuple
  output_width: Optional[int]
  default_image_size: Optional[tuple[int, int]]
  hparams: Sequence[str]
  num_variables: int
  num_trainable_variables: int
  num_regularization_losses: int
  has_train_graph: bool
  notes: Sequence[str]
  input_bytes: int
  output_bytes: int
  seconds: dict[str, float]
  parity: Optional[object] = None  # verify.ParityReport

  @property
  def verified(self) -> bool:
    return self.parity is not None and self.parity.passed

  @property
  def size_ratio(self) -> float:
    return self.output_bytes / max(self.input_bytes, 1)

  def to_dict(self) -> dict:
    """Plain data (JSON-able), e.g. to cross a process boundary."""
    result = dataclasses.asdict(
        dataclasses.replace(self, parity=None))
    result["size_ratio"] = self.size_ratio
    result["verified"] = self.verified
    result["parity"] = None if self.parity is None else {
        "passed": self.parity.passed, "summary": self.parity.summary(),
        "table": self.parity.format_table(), "json": self.parity.to_json()}
    return result


def convert(src: str, dst: str,
            options: Optional[options_lib.ConvertOptions] = None,
            **keywords: Any) -> ConversionResult:
  """Converts the TF1 Hub module at `src` into a TF2 SavedModel at `dst`
  (a native Keras 3 model if `dst` ends in `.keras`: `keras_convert`).

  `options` (a `migrate.options.ConvertOptions`; the defaults if None) says
  how; `keywords` are its fields, applied over it:
  `convert(src, dst, signature="image_classification", verify=False)`.

  Raises a `migrate.errors.MigrationError` subclass for anything the user can
  fix; then nothing is left at `dst` (with `keep_failed`, a model that fails
  parity is kept at `dst + ".failed-parity"`) and `src` is unchanged.
  """
  from migrate import consumers as consumers_lib  # pylint: disable=g-import-not-at-top
  options = options_lib.build(options, **keywords)
  keras_format.check_format(dst, options.output_format)
  consumers_lib.check_selection(options.consumers)
  seconds: dict[str, float] = {}
  clock = time.perf_counter()

  def lap(stage: str) -> None:
    nonlocal clock
    now = time.perf_counter()
    seconds[stage] = now - clock
    clock = now

  module = legacy_format.read_module(src)
  preflight.check_destination(src, dst, overwrite=options.overwrite)
  plan = plan_lib.make_plan(module, signature=options.signature,
                            output_key=options.output_key,
                            remove_output_dropout=not options.keep_output_dropout)
  safety.check_module(module, allow_unsafe_ops=options.allow_unsafe_ops)
  lap("read")
  with staging.Destination(dst, src=src) as destination, _tensorflow_errors(src):
    if keras_format.is_keras_path(dst):  # The native Keras 3 output.
      from migrate import keras_convert  # pylint: disable=g-import-not-at-top
      return keras_convert.convert_planned(module, plan, src, destination,
                                           seconds, lap, options)
    return _convert(module, plan, src, destination, seconds, lap, options)


def _convert(module: legacy_format.LegacyModule, plan: plan_lib.MigrationPlan,
             src: str, destination: staging.Destination,
             seconds: dict[str, float], lap,
             options: options_lib.ConvertOptions) -> ConversionResult:
  dst = destination.dst
  reference = None
  if options.verify:
    # The TF1 side of the parity checks needs only the module: it runs in a
    # thread (with 2 CPUs) while this one builds and exports.
    from migrate import verify as verify_lib  # pylint: disable=g-import-not-at-top
    reference = verify_lib.start_reference(
        src, verify_lib.spec_for_plan(module, plan), parallel=options.parallel_verify,
        module=module)
  try:
    built = build_lib.build(module, plan)
    lap("build")
    staged = export.stage(built, destination)
    lap("export")
    # The built model holds a copy of the weights that nothing needs past
    # the export: freed, it is not part of verification's peak.
    written = export.written(built)
    del built
  except BaseException:
    if reference is not None:
      reference.cancel()
    raise
  try:
    report = None
    # What was written is scanned as any model is before it is loaded
    # (verification loads it): an unsafe op must not slip through BUILD.
    safety.check_saved_model(staged.path, allow_unsafe_ops=options.allow_unsafe_ops,
                             shown=f"{dst} (as written)")
    if options.verify:
      with _verification_errors(f"{src}: expected a module whose graphs run "
                                f"on the inputs its signatures declare"):
        report = verify_lib.verify(src, staged.path, reference=reference,
                                   module=module, consumers=options.consumers)
      report.new_path = dst  # It was checked in place of DST, before the rename.
      lap("verify")
      if not report.passed:
        raise_parity_failure(report, staged, options, f"{src}: the converted model")
    staged.write_model_card(export.model_card(
        written, src, module.saved_model_sha256,
        report.summary() if report is not None else None))
    output_bytes = fileutil.directory_size(staged.path)
    staged.commit(overwrite=options.overwrite)
    lap("commit")
  except BaseException:
    staged.discard()
    if reference is not None:
      reference.cancel()  # (Verification's end did, if it ran.)
    raise
  return ConversionResult(
      src=src, dst=dst, signature=plan.signature, output_key=plan.output_key,
      kind=plan.kind, input_shape=plan.input_shape,
      output_width=plan.output_width,
      default_image_size=plan.default_image_size,
      hparams=[h.name for h in plan.hparams],
      num_variables=written.num_variables,
      num_trainable_variables=written.num_trainable_variables,
      num_regularization_losses=written.num_regularization_losses,
      has_train_graph=plan.has_train_graph, notes=list(written.notes),
      input_bytes=module.source_bytes, output_bytes=output_bytes,
      seconds=seconds, parity=report)


def raise_parity_failure(report, staged: staging.StagedOutput,
                         options: options_lib.ConvertOptions, what: str) -> NoReturn:
  """A staged model (`what`) failed parity: kept at DST.failed-parity
  (`keep_failed`) or discarded, and a `ParityError` carrying the report."""
  kept = staged.keep_aside(FAILED_SUFFIX) if options.keep_failed else None
  if kept is None:
    staged.discard()
  where = f"; the failing model was kept at {kept}" if kept else ""
  raise errors.ParityError(
      f"{what} does not compute what the TF1 module did: "
      f"{report.first_failure}{where}",
      table=report.format_table(), report_json=report.to_json())


def verify_existing(old: str, new: str,
                    options: Optional[options_lib.ConvertOptions] = None,
                    **keywords: Any):
  """Verifies an existing pair (made earlier or by other means) -> ParityReport.

  Both are scanned before anything loads them: OLD as a module, NEW (which
  may come from anywhere) as a SavedModel. Of the options (as for `convert`)
  those of what is proven apply: `allow_unsafe_ops`, `keras_backends`,
  `consumers` (a SavedModel NEW).
  """
  from migrate import consumers as consumers_lib  # pylint: disable=g-import-not-at-top
  from migrate import verify as verify_lib  # pylint: disable=g-import-not-at-top
  options = options_lib.build(options, **keywords)
  consumers_lib.check_selection(options.consumers)
  module = legacy_format.read_module(old)
  safety.check_module(module, allow_unsafe_ops=options.allow_unsafe_ops)
  if keras_format.is_keras_path(new):  # A native Keras 3 model.
    from migrate import keras_verify  # pylint: disable=g-import-not-at-top
    with _tensorflow_errors(old):
      return keras_verify.verify_existing(old, new, backends=options.keras_backends)
  preflight.check_converted(new)
  safety.check_saved_model(new, allow_unsafe_ops=options.allow_unsafe_ops)
  _check_made_by_this_tool(new)
  with _tensorflow_errors(old), _verification_errors(
      f"{new}: expected a converted SavedModel (a Reusable SavedModel with "
      f"__call__, variables and the serving signatures of {old})",
      errors.NotAHubModuleError):
    return verify_lib.verify(old, new, module=module, consumers=options.consumers)


# What the root object of every model this tool writes holds (build.py).
_ROOT_CHILDREN = ("__call__", "metadata", "variables", "trainable_variables")


def _check_made_by_this_tool(new: str) -> None:
  """Refuses a SavedModel whose root object lacks what `build` gives it (a
  plain TF2 SavedModel, made by other means): its checks would not apply."""
  saved_model = legacy_format.parse_saved_model(new)
  graphs = [mg for mg in saved_model.meta_graphs
            if mg.HasField("object_graph_def") and mg.object_graph_def.nodes]
  children = ({c.local_name for c in graphs[0].object_graph_def.nodes[0].children}
              if graphs else set())
  missing = [c for c in _ROOT_CHILDREN if c not in children]
  if missing:
    raise errors.NotAHubModuleError(
        f"{new}: expected a SavedModel converted by migrate-hub-module (a root "
        f"object with {', '.join(_ROOT_CHILDREN)}), found a SavedModel "
        f"without {', '.join(missing)} (made by other means?)")


@contextlib.contextmanager
def _verification_errors(expected: str,
                         error_type: type = errors.CorruptModuleError
                         ) -> Iterator[None]:
  """Verification feeds the model the inputs its signatures declare and calls
  what it exposes; a model or module that does not fit (a fixed batch size,
  a NEW without `variables`) surfaces there as a Python error, mapped here
  to `error_type` with the line `expected`, found <error>."""
  try:
    yield
  except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
    raise error_type(f"{expected}, found {type(e).__name__}: "
                     f"{errors.first_line(e)}; nothing was written") from None


@contextlib.contextmanager
def _tensorflow_errors(src: str) -> Iterator[None]:
  """Maps what TensorFlow raises on a module it cannot run to documented codes.

  The stages map what they expect; this catches the rest at the boundary:
  out of memory (TensorFlow's ResourceExhausted, Python's MemoryError: the
  worker's memory limit) -> ResourceLimitError; an op TensorFlow does not
  implement -> UnsupportedModuleError; any other error of a TensorFlow op
  (invalid arguments, shapes, a graph it refuses) -> CorruptModuleError.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    yield
  except errors.MigrationError:
    raise
  except (MemoryError, tf.errors.ResourceExhaustedError) as e:
    raise errors.ResourceLimitError(
        f"{src}: expected the module to fit in memory, found TensorFlow out of "
        f"memory ({type(e).__name__}: {errors.first_line(e)}); nothing was written"
    ) from None
  except tf.errors.UnimplementedError as e:
    raise errors.UnsupportedModuleError(
        f"{src}: expected ops TensorFlow can run on this machine, found "
        f"{type(e).__name__}: {errors.first_line(e)}; nothing was written") from None
  except tf.errors.OpError as e:
    raise errors.CorruptModuleError(
        f"{src}: expected a graph TensorFlow can run, found "
        f"{type(e).__name__}: {errors.first_line(e)}; nothing was written") from None


def convert_to_dict(src: str, dst: str,
                    options: Optional[options_lib.ConvertOptions] = None,
                    **keywords: Any) -> dict:
  """`convert(...).to_dict()`: for callers in another process (the CLI)."""
  return convert(src, dst, options, **keywords).to_dict()


def verify_to_dict(old: str, new: str,
                   options: Optional[options_lib.ConvertOptions] = None,
                   **keywords: Any) -> dict:
  """`verify_existing` as plain data: passed, summary, table, json."""
  report = verify_existing(old, new, options, **keywords)
  return {"passed": report.passed, "summary": report.summary(),
          "table": report.format_table(), "json": report.to_json(),
          "first_failure": str(report.first_failure)}
