"""EXPORT stage (`.keras` output): write the model file atomically.

The model is saved (`keras.saving.save_model`) into a temporary file beside
DST, `.<name>.migrate-tmp-<pid>-*.keras` (the names `export` and `batch`
clean up after killed runs), with one more member in the zip,
`keras_format.METADATA_MEMBER`: where the model came from and how it was
converted (Keras ignores it when loading). It is then renamed into place:
DST is absent, the old file, or the complete new model, never a partial one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import zipfile
from typing import Any, Mapping

from migrate import errors
from migrate import export as export_lib
from migrate import fileutil
from migrate import keras_format

_TMP_MARK = ".migrate-tmp-"  # As export's staging directories.
_OLD_MARK = ".migrate-old-"


def clean_stale_temporaries(dst: str) -> list[str]:
  """Removes the temporary files (and directories) killed runs left for DST."""
  parent = os.path.dirname(os.path.abspath(dst))
  base = re.escape(os.path.basename(os.path.abspath(dst)))
  pattern = re.compile(rf"^\.{base}({re.escape(_TMP_MARK)}|{re.escape(_OLD_MARK)})(\d+)-")
  removed = []
  try:
    names = os.listdir(parent)
  except OSError:
    return removed
  for name in names:
    match = pattern.match(name)
    if not match or fileutil.pid_alive(int(match.group(2))):
      continue
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
class StagedKerasFile:
  """A complete `.keras` file at a temporary path beside DST."""

  dst: str
  path: str

  def commit(self, *, overwrite: bool) -> None:
    """Moves the file into place (replacing DST only if `overwrite`)."""
    dst = os.path.abspath(self.dst)
    old = None
    if os.path.lexists(dst):
      if not overwrite:
        self.discard()
        raise errors.OutputError(
            f"{self.dst}: expected a new output path, found one created "
            f"meanwhile (pass --overwrite to replace it)")
      if os.path.isdir(dst) and not os.path.islink(dst):
        old = tempfile.mkdtemp(
            prefix=f".{os.path.basename(dst)}{_OLD_MARK}{os.getpid()}-",
            dir=os.path.dirname(dst))
        os.rename(dst, os.path.join(old, "previous"))
    os.replace(self.path, dst)  # Atomic, also over an existing file.
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)

  def keep_aside(self, suffix: str) -> str:
    """Moves the file to `<DST><suffix>` for inspection; returns that path."""
    target = os.path.abspath(self.dst) + suffix
    if os.path.isdir(target) and not os.path.islink(target):
      shutil.rmtree(target, ignore_errors=True)
    os.replace(self.path, target)
    return target

  def discard(self) -> None:
    try:
      os.unlink(self.path)
    except OSError:
      pass


def stage(model, dst: str, metadata: Mapping[str, Any]) -> StagedKerasFile:
  """Saves `model` (a `keras.Model`) and `metadata` to a temporary file beside `dst`."""
  import keras  # pylint: disable=g-import-not-at-top
  clean_stale_temporaries(dst)
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
