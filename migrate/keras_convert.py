"""The `.keras` output: convert one TF1 Hub image module into a native Keras 3 model.

    result = convert("old_module/", "model.keras")   # convert.convert

chains READ (legacy_format) -> SCAN (safety) -> PLAN (plan) -> TRANSLATE
(keras_translate: refuses what has no built-in Keras layer, before anything
is written) -> BUILD (keras_build) -> EXPORT (keras_export, a temporary file
beside DST) -> VERIFY (keras_verify, on every installed Keras backend) ->
commit (rename into place). `convert.convert` comes here for a DST ending in
`.keras`; the result is the same `ConversionResult`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional, Sequence

from migrate import build as build_lib
from migrate import convert as convert_lib
from migrate import errors
from migrate import isolation
from migrate import keras_format
from migrate import keras_translate
from migrate import legacy_format
from migrate import plan as plan_lib
from migrate import preflight
from migrate import staging


def _metadata(module: legacy_format.LegacyModule, plan: plan_lib.MigrationPlan,
              kplan: keras_translate.KerasPlan, src: str) -> dict[str, Any]:
  match = plan_lib.output_dropout(module, plan)
  return {
      "tool": "migrate-hub-module", "tool_version": build_lib.TOOL_VERSION,
      "source_path": os.path.abspath(src),
      "source_sha256": module.saved_model_sha256,
      "signature": plan.signature, "output_key": plan.output_key,
      "kind": plan.kind, "output_width": plan.output_width,
      "default_image_size": list(plan.default_image_size or []),
      "input_shape": list(plan.input_shape),
      "keep_output_dropout": not plan.remove_output_dropout,
      "output_dropout_removed": (match.output_node if match is not None and
                                 plan.remove_output_dropout else ""),
      "frozen_batch_norm": kplan.frozen_batch_norm,
      "translated_graph_tags": sorted(kplan.graph_tags),
      "patterns": kplan.pattern_counts,
      "notes": list(kplan.notes),
  }


def convert_keras(src: str, dst: str, *,
                  backends: Optional[Sequence[str]] = None,
                  **options: Any) -> convert_lib.ConversionResult:
  """Converts the TF1 Hub module at `src` into the `.keras` file `dst`: the
  same as `convert.convert(src, dst, keras_backends=backends, **options)`."""
  if not keras_format.is_keras_path(dst):
    raise errors.OutputError(f"{dst}: expected a path ending in "
                             f"{keras_format.SUFFIX}, found another")
  return convert_lib.convert(src, dst, keras_backends=backends, **options)


def convert_planned(module: legacy_format.LegacyModule,
                    plan: plan_lib.MigrationPlan, src: str,
                    destination: staging.Destination,
                    seconds: dict[str, float], lap: Callable[[str], None], *,
                    overwrite: bool, verify: bool, keep_failed: bool,
                    parallel_verify: Optional[bool],
                    backends: Optional[Sequence[str]] = None
                    ) -> convert_lib.ConversionResult:
  """The `.keras` half of `convert.convert`, after READ, SCAN and PLAN: the
  options are its own; `backends` picks the Keras backends verification runs
  on (default: every installed one). Raises a `MigrationError` for anything
  the user can fix (a module with an op that no built-in Keras layer
  computes: `UnsupportedModuleError`, exit code 5); then nothing is left at
  DST and `src` is unchanged.
  """
  dst = destination.dst
  kplan = keras_translate.translate(module, plan)
  lap("translate")
  # Imported here: Keras (and its backend) only once the module translates.
  from migrate import keras_build  # pylint: disable=g-import-not-at-top
  from migrate import keras_export
  from migrate import keras_verify
  pending = None
  spec = keras_verify.spec_for_keras(module, plan)
  if verify and (parallel_verify if parallel_verify is not None else
                 preflight.reference_child_pays(module.checkpoint_prefix)):
    # The TF1 side needs only the module: it runs while the model is built.
    pending = isolation.start_isolated(
        "migrate.verify:reference_side", src, spec,
        what=f"{src} (reference side of the parity checks)")
  try:
    built = keras_build.build(module, kplan)
    lap("build")
    staged = keras_export.stage(built.model, destination,
                                _metadata(module, plan, kplan, src))
    lap("export")
  except BaseException:
    if pending is not None:
      pending.cancel()
    raise
  report = kept = None
  try:
    if verify:
      expected = pending.result() if pending is not None else None
      report = keras_verify.verify_keras(src, staged.path, kplan, spec,
                                         module=module, expected=expected,
                                         backends=backends)
      if pending is not None:
        report.processes["module (TF1 Session)"] = "child process"
      report.new_path = dst
      lap("verify")
      if not report.passed:
        if keep_failed:
          kept = staged.keep_aside(convert_lib.FAILED_SUFFIX)
        else:
          staged.discard()
        where = f"; the failing model was kept at {kept}" if kept else ""
        raise errors.ParityError(
            f"{src}: the Keras model does not compute what the TF1 module "
            f"did: {report.first_failure}{where}",
            table=report.format_table(), report_json=report.to_json())
    output_bytes = os.path.getsize(staged.path)
    staged.commit(overwrite=overwrite)
    lap("commit")
  except BaseException:
    if pending is not None:
      pending.cancel()
    staged.discard()
    raise
  model = built.model
  notes = list(kplan.notes)
  return convert_lib.ConversionResult(
      src=src, dst=dst, signature=plan.signature, output_key=plan.output_key,
      kind=plan.kind, input_shape=plan.input_shape,
      output_width=plan.output_width,
      default_image_size=plan.default_image_size, hparams=[],
      num_variables=len(model.weights),
      num_trainable_variables=len(model.trainable_weights),
      num_regularization_losses=len(model.losses),
      has_train_graph=plan.has_train_graph, notes=notes,
      input_bytes=module.source_bytes, output_bytes=output_bytes,
      seconds=seconds, parity=report, kept_aside=kept)
