"""EXPORT stage (`.keras` output): write the model file atomically.

The model is saved (`keras.saving.save_model`) into a temporary file beside
DST, in a staging directory `.<name>.migrate-tmp-<pid>-*` that
`migrate/staging.py` holds and cleans up after killed runs, with one more member in the zip,
`keras_format.METADATA_MEMBER`: where the model came from and how it was
converted (Keras ignores it when loading). It is then renamed into place:
DST is absent, the old file, or the complete new model, never a partial one.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Mapping, Union

from migrate import export as export_lib
from migrate import fileutil
from migrate import keras_format
from migrate import staging

MEMBER = "model" + keras_format.SUFFIX


def stage(model, dst: Union[str, staging.Destination],
          metadata: Mapping[str, Any]) -> staging.StagedOutput:
  """Saves `model` (a `keras.Model`) and `metadata` into a temporary
  directory beside `dst` (DST's parent held open, as for a SavedModel); the
  staged output is that one file, which `commit` renames to DST."""
  import keras  # pylint: disable=g-import-not-at-top
  destination = (dst if isinstance(dst, staging.Destination)
                 else staging.Destination(dst))
  try:
    staged = destination.stage(member=MEMBER)
  except OSError as e:
    raise export_lib._io_error(destination.dst, e) from None  # pylint: disable=protected-access
  try:
    keras.saving.save_model(model, staged.path, zipped=True)
    with zipfile.ZipFile(staged.path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
      zf.writestr(keras_format.METADATA_MEMBER, json.dumps(metadata, indent=1, sort_keys=True))
    os.chmod(staged.path, 0o666 & ~fileutil.current_umask())
    with open(staged.path, "rb") as f:  # On disk before the rename makes it visible.
      os.fsync(f.fileno())
  except OSError as e:
    staged.discard()
    raise export_lib._io_error(destination.dst, e) from None  # pylint: disable=protected-access
  except BaseException:
    staged.discard()
    raise
  return staged
