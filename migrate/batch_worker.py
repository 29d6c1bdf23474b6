"""BATCH, the worker: one module converted in a spawned child process.

`convert_in_worker(WorkItem)` runs in the child that `isolation.run_isolated`
starts for each module (a TensorFlow crash, abort, memory blow-up or hang
costs only that module): it extracts an archive into its scratch directory
or fetches a URL, converts and verifies with `convert.convert`, and returns
plain data. Nothing here runs in the batch's own process but the
definitions (no TensorFlow at import).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from migrate import batch_sources as sources_lib
from migrate import fileutil
from migrate import keras_format
from migrate import options as options_lib
from migrate import staging


@dataclasses.dataclass(frozen=True)
class WorkItem:
  """What a worker process needs: picklable, no TensorFlow objects."""

  location: str
  kind: str
  destination: str
  options: options_lib.ConvertOptions  # This module's (overrides applied).
  scratch: Optional[str] = None  # Temporary directory (archive extraction).
  tfhub_cache: Optional[str] = None  # TFHUB_CACHE_DIR for URLs.
  skip_if_sha256: Optional[str] = None  # URL: skip if resolved to this content.
  threads: Optional[int] = None  # TensorFlow intra/inter-op threads.
  quiet: bool = True
  max_archive_bytes: int = sources_lib.MAX_ARCHIVE_BYTES


def _silence_native_stderr() -> None:
  """Points this process's fd 2 at /dev/null (TensorFlow's C++ chatter).

  Done in the child rather than around `process.start()` in the parent,
  which would race between the parent's worker threads.
  """
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  os.close(devnull)


def _fix_model_card_source(dst: str, shown_src: str, real_src: str) -> None:
  """The card names the archive/URL, not the temporary extraction directory."""
  path = os.path.join(dst, staging.MODEL_CARD_FILENAME)
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError:
    return
  fixed = text.replace(f"`{shown_src}`", f"`{real_src}`")
  if fixed != text:
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(fixed)
    os.replace(tmp, path)


def convert_in_worker(item: WorkItem) -> dict[str, Any]:
  """Fetches/extracts the source, converts and verifies it; returns plain data."""
  if item.quiet:
    _silence_native_stderr()
  if item.threads:
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(item.threads))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", str(item.threads))
  src = item.location
  sha = None
  if item.kind == sources_lib.KIND_ARCHIVE:
    name = sources_lib.archive_stem(os.path.basename(item.location))
    src = sources_lib.extract_archive(
        item.location, os.path.join(item.scratch, name),
        max_bytes=item.max_archive_bytes)
  elif item.kind == sources_lib.KIND_URL:
    src = sources_lib.resolve_url(item.location, item.tfhub_cache)
    sha = fileutil.tree_sha256(src)
    if sha == item.skip_if_sha256 and keras_format.output_exists(item.destination):
      return {"skipped": True, "source_sha256": sha}
  from migrate import convert  # pylint: disable=g-import-not-at-top
  result = convert.convert(src, item.destination, item.options).to_dict()
  if src != item.location:
    _fix_model_card_source(item.destination, src, item.location)
  result["source_sha256"] = sha
  result["skipped"] = False
  return result
