"""EXPORT stage (`.keras` output): write the model file atomically.

The model is saved (`keras.saving.save_model`) into a temporary file beside
DST, `.<name>.migrate-tmp-<pid>-*.keras` (the names `export` and `batch`
clean up after killed runs), with one more member in the zip,
`keras_format.METADATA_MEMBER`: where the model came from and how it was
converted (Keras ignores it when loading). It is then renamed into place:
DST is absent, the old file, or the complete new model, never a partial one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from typing import Any, Mapping

from migrate import export as export_lib
from migrate import keras_format

_TMP_MARK = export_lib._TMP_MARK  # pylint: disable=protected-access


class StagedKerasFile(export_lib.StagedOutput):
  """A complete `.keras` file at a temporary path beside DST (`commit` is
  `StagedOutput`'s: renames work alike on files)."""

  def keep_aside(self, suffix: str) -> str:
    target = os.path.abspath(self.dst) + suffix
    if os.path.isdir(target) and not os.path.islink(target):
      shutil.rmtree(target, ignore_errors=True)
    os.replace(self.path, target)
    return target

  def write_model_card(self, text: str) -> None:
    raise NotImplementedError("a .keras file has no model card beside it")

  def discard(self) -> None:
    try:
      os.unlink(self.path)
    except OSError:
      pass


def stage(model, dst: str, metadata: Mapping[str, Any]) -> StagedKerasFile:
  """Saves `model` (a `keras.Model`) and `metadata` to a temporary file beside `dst`."""
  import keras  # pylint: disable=g-import-not-at-top
  export_lib.clean_stale_temporaries(dst)
  dst_abs = os.path.abspath(dst)
  try:
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(dst_abs)}{_TMP_MARK}{os.getpid()}-",
        suffix=keras_format.SUFFIX, dir=os.path.dirname(dst_abs))
    os.close(fd)
  except OSError as e:
    raise export_lib._io_error(dst, e) from None  # pylint: disable=protected-access
  staged = StagedKerasFile(dst=dst, path=tmp)
  try:
    keras.saving.save_model(model, tmp, zipped=True)
    with zipfile.ZipFile(tmp, "a", compression=zipfile.ZIP_DEFLATED) as zf:
      zf.writestr(keras_format.METADATA_MEMBER, json.dumps(metadata, indent=1, sort_keys=True))
    with open(tmp, "rb") as f:  # On disk before the rename makes it visible.
      os.fsync(f.fileno())
  except OSError as e:
    staged.discard()
    raise export_lib._io_error(dst, e) from None  # pylint: disable=protected-access
  except BaseException:
    staged.discard()
    raise
  return staged
