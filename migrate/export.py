"""EXPORT stage: write the TF2 SavedModel atomically.

The model is saved into a temporary directory beside DST (same file system),
checked, then renamed into place: DST is either absent, the old content, or
the complete new model, never a partial one, even if the process is killed.
Temporary directories carry the owning process id; the next run removes the
ones whose process is gone.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import shutil
import tempfile
from typing import Optional

import tensorflow as tf

from migrate import build as build_lib
from migrate import errors
from migrate import fileutil

MODEL_CARD_FILENAME = "MODEL_CARD.md"
_TMP_MARK = ".migrate-tmp-"
# The TF1-style saver functions (_traced_save/_traced_restore) are only used
# by tf.compat.v1 loaders; TF2 loading (hub.load, tf.saved_model.load,
# hub.KerasLayer) restores through the object graph. Skipping them keeps the
# output no larger than the input.
_SAVE_OPTIONS = tf.saved_model.SaveOptions(save_debug_info=False,
                                           experimental_skip_saver=True)
_OLD_MARK = ".migrate-old-"


def _stale_pattern(dst: str) -> re.Pattern:
  base = re.escape(os.path.basename(dst))
  return re.compile(rf"^\.{base}({re.escape(_TMP_MARK)}|{re.escape(_OLD_MARK)})(\d+)-")


def clean_stale_temporaries(dst: str) -> list[str]:
  """Removes temporary directories (or files: `keras_export`) left for DST by
  killed runs."""
  parent = os.path.dirname(os.path.abspath(dst))
  pattern = _stale_pattern(os.path.abspath(dst))
  removed = []
  try:
    names = os.listdir(parent)
  except OSError:
    return removed
  for name in names:
    match = pattern.match(name)
    if match and not fileutil.pid_alive(int(match.group(2))):
      path = os.path.join(parent, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        try:
          os.unlink(path)
        except OSError:
          continue
      removed.append(name)
  return removed


@dataclasses.dataclass
class StagedOutput:
  """A complete SavedModel in a temporary directory, not yet at DST."""

  dst: str
  path: str  # The temporary directory holding the SavedModel.

  def write_model_card(self, text: str) -> None:
    with open(os.path.join(self.path, MODEL_CARD_FILENAME), "w",
              encoding="utf-8") as f:
      f.write(text)

  def commit(self, *, overwrite: bool) -> None:
    """Moves the model into place (replacing DST only if `overwrite`)."""
    dst = os.path.abspath(self.dst)
    old = None
    if os.path.lexists(dst):
      if not overwrite:
        self.discard()
        raise errors.OutputError(
            f"{self.dst}: expected a new output path, found one created "
            f"meanwhile (pass --overwrite to replace it)")
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}{_OLD_MARK}{os.getpid()}-",
                             dir=os.path.dirname(dst))
      os.rename(dst, os.path.join(old, "previous"))
    os.rename(self.path, dst)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)

  def keep_aside(self, suffix: str) -> str:
    """Moves the model to `<DST><suffix>` for inspection; returns that path."""
    target = os.path.abspath(self.dst) + suffix
    if os.path.lexists(target):
      shutil.rmtree(target, ignore_errors=True)
    os.rename(self.path, target)
    return target

  def discard(self) -> None:
    shutil.rmtree(self.path, ignore_errors=True)


def _io_error(dst: str, error: BaseException) -> errors.OutputError:
  text = str(error)
  if isinstance(error, OSError) and error.errno == errno.ENOSPC or (
      "No space left" in text):
    return errors.OutputError(
        f"{dst}: expected room to write the model, found the disk full (No "
        f"space left on device); nothing was written")
  first = text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__
  return errors.OutputError(
      f"{dst}: expected to write the model, found {type(error).__name__}: "
      f"{first}; nothing was written")


def stage(built: build_lib.BuiltModel, dst: str) -> StagedOutput:
  """Saves `built` into a fresh temporary directory beside `dst`."""
  clean_stale_temporaries(dst)
  dst_abs = os.path.abspath(dst)
  try:
    tmp = tempfile.mkdtemp(
        prefix=f".{os.path.basename(dst_abs)}{_TMP_MARK}{os.getpid()}-",
        dir=os.path.dirname(dst_abs))
  except OSError as e:
    raise _io_error(dst, e) from None
  staged = StagedOutput(dst=dst, path=tmp)
  try:
    tf.saved_model.save(
        built.root, tmp, signatures=dict(built.signatures),
        options=_SAVE_OPTIONS)
  except (OSError, tf.errors.OpError) as e:
    staged.discard()
    raise _io_error(dst, e) from None
  except BaseException:
    staged.discard()
    raise
  return staged


def model_card(built: build_lib.BuiltModel, src: str, sha256: str,
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
      f"# Model card: converted TF1 Hub module",
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
      f"- Serving signatures: {', '.join(sorted(built.signatures))}",
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
