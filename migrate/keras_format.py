"""The `.keras` output format: what tells it apart, without TensorFlow or Keras.

A DST ending in `.keras` asks for a native Keras 3 model (`keras_convert`)
instead of a SavedModel directory. The file is Keras's own zip
(`config.json`, `metadata.json`, `model.weights.h5`) plus the member
`migrate_hub_module.json`: where the model came from and how it was
converted. The CLI and `batch` use these helpers before any worker imports
TensorFlow.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Optional

from migrate import errors

SUFFIX = ".keras"
METADATA_MEMBER = "migrate_hub_module.json"
FORMAT_SAVEDMODEL = "savedmodel"
FORMAT_KERAS = "keras"
FORMATS = (FORMAT_SAVEDMODEL, FORMAT_KERAS)


def is_keras_path(path: str) -> bool:
  """Whether `path` names a `.keras` file (the native Keras output)."""
  return os.fspath(path).endswith(SUFFIX)


def read_metadata(path: str) -> Optional[dict[str, Any]]:
  """The conversion metadata of a `.keras` file made by this tool, or None."""
  try:
    with zipfile.ZipFile(path) as zf:
      if METADATA_MEMBER not in zf.namelist():
        return None
      return json.loads(zf.read(METADATA_MEMBER).decode("utf-8"))
  except (OSError, zipfile.BadZipFile, ValueError, UnicodeDecodeError):
    return None


def check_converted(new: str) -> dict[str, Any]:
  """Refuses a NEW (for `verify OLD NEW.keras`) that is not a `.keras` file
  made by this tool; returns its metadata."""
  if not os.path.isfile(new):
    raise errors.InputNotFoundError(
        f"{new}: expected a converted .keras file, found "
        f"{'a directory' if os.path.isdir(new) else 'nothing'}")
  if not zipfile.is_zipfile(new):
    raise errors.NotAHubModuleError(
        f"{new}: expected a .keras file (a zip archive), found other bytes")
  metadata = read_metadata(new)
  if metadata is None:
    raise errors.NotAHubModuleError(
        f"{new}: expected a .keras file made by migrate-hub-module (with "
        f"{METADATA_MEMBER}), found none: it cannot be matched to a module")
  return metadata


def output_exists(destination: str) -> bool:
  """Whether a converted model is at `destination` (a file or a SavedModel)."""
  if is_keras_path(destination):
    return os.path.isfile(destination)
  return os.path.isfile(os.path.join(destination, "saved_model.pb"))
