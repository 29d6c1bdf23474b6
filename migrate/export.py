"""EXPORT stage: write the TF2 SavedModel atomically.

The model is saved into a temporary directory beside DST (same file system),
checked, then renamed into place: DST is either absent, the old content, or
the complete new model, never a partial one, even if the process is killed.
The file-system side (DST's parent held open, the staging directory, the
rename, cleaning up after killed runs) is `migrate/staging.py`.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import Optional, Union

import tensorflow as tf

from migrate import build as build_lib
from migrate import errors
from migrate import export_saver
from migrate import fileutil
from migrate import plan as plan_lib
from migrate import staging

# With the saver (the MetaGraph's `saver_def` and its save/restore ops),
# every loader restores the variables: the TF2 object-graph loaders, the TF1
# loader in a Session (`saved_model_cli run`), the C++ `LoadSavedModel`
# (TensorFlow Serving) and the TFLite converter. Without it the last three
# run with uninitialized variables. The model is saved without TensorFlow's
# saver (`build.SAVE_OPTIONS`, `experimental_skip_saver=True`), which costs
# ~3 ms per variable to trace, and `export_saver` writes the same restore as
# plain nodes; where it cannot pair the variables up, the model is saved
# again with TensorFlow's (`_WITH_TF_SAVER`). Size and time:
# docs/PERFORMANCE.md. `build` traces `__call__` in these options' context.
_SAVE_OPTIONS = build_lib.SAVE_OPTIONS
_WITH_TF_SAVER = tf.saved_model.SaveOptions(
    save_debug_info=_SAVE_OPTIONS.save_debug_info,
    experimental_variable_policy=_SAVE_OPTIONS.experimental_variable_policy)
StagedOutput = staging.StagedOutput


def clean_stale_temporaries(dst: str) -> list[str]:
  """Removes temporary directories (or files) left for DST by killed runs."""
  return staging.clean_stale(dst)


def _io_error(dst: str, error: BaseException) -> errors.OutputError:
  text = str(error)
  if isinstance(error, OSError) and error.errno == errno.ENOSPC or (
      "No space left" in text):
    return errors.OutputError(
        f"{dst}: expected room to write the model, found the disk full (No "
        f"space left on device); nothing was written")
  return errors.OutputError(
      f"{dst}: expected to write the model, found {type(error).__name__}: "
      f"{errors.first_line(error)}; nothing was written")


def stage(built: build_lib.BuiltModel,
          dst: Union[str, staging.Destination]) -> StagedOutput:
  """Saves `built` into a fresh temporary directory beside `dst`."""
  destination = dst if isinstance(dst, staging.Destination) else staging.Destination(dst)
  dst = destination.dst
  try:
    staged = destination.stage()
  except OSError as e:
    raise _io_error(dst, e) from None
  try:
    # mkdtemp makes it 0700; the model gets the mode a directory made by
    # tf.saved_model.save (or mkdir) would: readable by others under umask 022.
    os.chmod(staged.path, 0o777 & ~fileutil.current_umask())
    tf.saved_model.save(
        built.root, staged.path, signatures=dict(built.signatures),
        options=_SAVE_OPTIONS)
    if not export_saver.add_saver(staged.path):
      tf.saved_model.save(
          built.root, staged.path, signatures=dict(built.signatures),
          options=_WITH_TF_SAVER)
    _umask_modes(os.path.join(staged.path, "assets"))
  except (OSError, tf.errors.OpError) as e:
    staged.discard()
    raise _io_error(dst, e) from None
  except BaseException:
    staged.discard()
    raise
  return staged


def _umask_modes(assets: str) -> None:
  """The save copies asset files with their source's mode (a private SRC's
  0600): they get the umask's, as the rest of the model, so that another
  account (a serving user) can read them."""
  mask = fileutil.current_umask()
  for root, dirs, files in os.walk(assets):
    for name in dirs:
      os.chmod(os.path.join(root, name), 0o777 & ~mask)
    for name in files:
      os.chmod(os.path.join(root, name), 0o666 & ~mask)


@dataclasses.dataclass(frozen=True)
class Written:
  """What the model card and the conversion's result say of a staged model:
  plain data, so that the built model (a copy of the weights) can be freed
  before verification loads the saved one."""

  plan: plan_lib.MigrationPlan
  signatures: tuple[str, ...]
  notes: tuple[str, ...]
  num_variables: int
  num_trainable_variables: int
  num_regularization_losses: int


def written(built: build_lib.BuiltModel) -> Written:
  root = built.root
  return Written(plan=built.plan, signatures=tuple(sorted(built.signatures)),
                 notes=tuple(built.notes), num_variables=len(root.variables),
                 num_trainable_variables=len(root.trainable_variables),
                 num_regularization_losses=len(root.regularization_losses))


def model_card(built: Written, src: str, sha256: str,
               parity_summary: Optional[str]) -> str:
  """The human-readable card saved beside the model."""
  plan = built.plan
  width_name = "num_features" if plan.kind == "image_feature_vector" else "num_classes"
  size = (f"{plan.default_image_size[0]}x{plan.default_image_size[1]}"
          if plan.default_image_size else "not recorded")
  hparams = ", ".join(f"`{h.name}` (default {h.default})" for h in plan.hparams) or "none"
  training = ("runs the module's train graph (batch norm in training mode, "
              "moving averages updated on every call)"
              if plan.has_train_graph else
              "changes nothing: the module has no train graph")
  lines = [
      staging.MODEL_CARD_TITLE,
      "",
      f"- Source: `{src}` (saved_model.pb sha256 `{sha256}`)",
      f"- Converted by migrate-hub-module {build_lib.TOOL_VERSION}, TensorFlow {tf.__version__}",
      f"- API: Reusable SavedModel, {plan.kind.replace('_', ' ')}",
      f"- `__call__(images, training=False, ...)` computes signature "
      f"`{plan.signature}`, output `{plan.output_key}`",
      f"- Input: float32 {list(plan.input_shape)}, RGB in [0, 1]; default "
      f"image size {size}",
      f"- Output: float32 [batch, {plan.output_width}] ({width_name})",
      f"- Keyword arguments: {hparams}",
      f"- `training=True` {training}",
      f"- Serving signatures: {', '.join(built.signatures)}",
      f"- Parity with the TF1 module: {parity_summary or 'not verified'}",
      "",
      "## Notes",
      "",
  ]
  lines += [f"- {note}" for note in built.notes] or ["- none"]
  lines += ["", "Metadata is also readable from the loaded object: "
            "`obj.metadata.default_image_size`, `.num_features`, `.num_classes`, "
            "`.source_sha256`, `.tool_version`, `.notes`.", ""]
  return "\n".join(lines)
