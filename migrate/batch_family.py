"""BATCH, the family of a module: what a person groups a registry's models by.

    family("old_modules/mobilenet_v2_100_224")  # -> "mobilenet_v2"

Read from the module itself, cheaply and without TensorFlow: the variable
names in its checkpoint index (`variables/variables.index`, a few KB even for
the largest modules), grouped by their root variable scope. The scope that
holds most variables, heads left aside (`Logits`, a projection), names the
family: `MobilenetV1/...` -> mobilenet_v1, `resnet_v2_50/...` -> resnet_v2,
`InceptionResnetV2/...` -> inception_resnet_v2, `efficientnet-b0/...` ->
efficientnet; NASNet-style cells at the root (`cell_0`, `reduction_cell_0`)
-> nasnet, or pnasnet when no cell is a `reduction_cell` (PNASNet numbers
its reduction cells as normal ones). Any other scope is its own family, in
lower case. A module whose index cannot be read is `unknown`.

The index is a TensorFlow table (the LevelDB format: data blocks of
prefix-compressed keys, an index block, a fixed footer), read here with
bounds checks on every field; anything unexpected -> `unknown`.
"""

from __future__ import annotations

import collections
import os
import re
import struct
from typing import Iterable, Iterator, Optional

from migrate import errors
from migrate import fileutil
from migrate import preflight

UNKNOWN = "unknown"

# An index holds one entry per variable (name, dtype, shape, offset): a few
# hundred bytes each. 64 MiB is hundreds of thousands of variables.
MAX_INDEX_BYTES = 64 << 20

_FOOTER_BYTES = 48
_TABLE_MAGIC = 0xDB4775248B80FB57
_BLOCK_TRAILER_BYTES = 5  # Compression type (1 byte) and crc32c (4 bytes).
_NO_COMPRESSION = 0

# Root scopes of a classifier's head or a projection: not the family.
_HEADS = frozenset({"logits", "auxlogits", "projection", "predictions",
                    "final_layer", "global_step"})
_CELL = re.compile(r"^(cell_stem|cell|reduction_cell)_\d+$")
_CELLS = "cells"  # NASNet-style cells at the root, counted as one scope.
# (pattern over the root scope in lower case without punctuation, family)
_FAMILIES = (
    (re.compile(r"^inceptionresnetv(\d)"), r"inception_resnet_v\1"),
    (re.compile(r"^mobilenetv(\d)"), r"mobilenet_v\1"),
    (re.compile(r"^resnetv(\d)"), r"resnet_v\1"),
    (re.compile(r"^inceptionv(\d)"), r"inception_v\1"),
    (re.compile(r"^efficientnet"), "efficientnet"),
    (re.compile(r"^pnasnet"), "pnasnet"),
    (re.compile(r"^nasnet"), "nasnet"),
    (re.compile(r"^amoeba"), "amoebanet"),
)


class _BadTable(Exception):
  pass


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
  """(value, next position) of the varint64 at `pos`."""
  value = shift = 0
  while pos < end and shift < 64:
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return value, pos
    shift += 7
  raise _BadTable("truncated varint")


def _block(data: bytes, handle: bytes, pos: int = 0) -> tuple[bytes, int]:
  """(contents of the block whose handle is at `handle[pos:]`, next position)."""
  offset, pos = _varint(handle, pos, len(handle))
  size, pos = _varint(handle, pos, len(handle))
  if offset + size + _BLOCK_TRAILER_BYTES > len(data) - _FOOTER_BYTES:
    raise _BadTable("block out of the file")
  if data[offset + size] != _NO_COMPRESSION:
    raise _BadTable("compressed block")
  return data[offset:offset + size], pos


def _entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
  """The (key, value) entries of a block (keys prefix-compressed)."""
  if len(block) < 4:
    raise _BadTable("block too short")
  restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
  end = len(block) - 4 * (restarts + 1)
  if end < 0:
    raise _BadTable("bad restart count")
  pos, key = 0, b""
  while pos < end:
    shared, pos = _varint(block, pos, end)
    unshared, pos = _varint(block, pos, end)
    value_size, pos = _varint(block, pos, end)
    if shared > len(key) or pos + unshared + value_size > end:
      raise _BadTable("entry out of the block")
    key = key[:shared] + block[pos:pos + unshared]
    pos += unshared
    yield key, block[pos:pos + value_size]
    pos += value_size


def index_keys(data: bytes) -> list[str]:
  """The keys of a checkpoint index (the tensor names; the header's empty key
  left out). Raises ValueError if `data` is not an uncompressed table."""
  try:
    if len(data) < _FOOTER_BYTES:
      raise _BadTable("shorter than a footer")
    if struct.unpack_from("<Q", data, len(data) - 8)[0] != _TABLE_MAGIC:
      raise _BadTable("no table magic")
    _, pos = _varint(data, len(data) - _FOOTER_BYTES, len(data))  # The metaindex handle.
    _, pos = _varint(data, pos, len(data))
    index, _ = _block(data, data, pos)
    keys = []
    for _, handle in _entries(index):
      block, _ = _block(data, handle)
      keys += [key.decode("utf-8", "replace") for key, _ in _entries(block) if key]
    return keys
  except (_BadTable, struct.error, IndexError) as e:
    raise ValueError(str(e)) from None


def family_of_names(names: Iterable[str]) -> str:
  """The family of a module whose variables have these names."""
  counts: collections.Counter = collections.Counter()
  reduction_cells = False
  for name in names:
    root = name.split("/", 1)[0]
    counts[_CELLS if _CELL.match(root) else root] += 1
    reduction_cells = reduction_cells or root.startswith("reduction_cell_")
  body = {r: n for r, n in counts.items() if r.lower() not in _HEADS} or counts
  if not body:
    return UNKNOWN
  root = min(body, key=lambda r: (-body[r], r))  # Most variables, then by name.
  if root == _CELLS:
    return "nasnet" if reduction_cells else "pnasnet"
  key = re.sub(r"[^a-z0-9]", "", root.lower())
  for pattern, family in _FAMILIES:
    match = pattern.match(key)
    if match:
      return match.expand(family)
  return root.lower()


def family(module_dir: Optional[str]) -> str:
  """The family of the TF1 Hub module in `module_dir` (`unknown` if its
  checkpoint index is missing, unreadable or not an index)."""
  if not module_dir:
    return UNKNOWN
  path = os.path.join(module_dir, preflight.CHECKPOINT_PREFIX + ".index")
  try:
    return family_of_names(index_keys(
        fileutil.read_regular_file(path, max_bytes=MAX_INDEX_BYTES)))
  except (OSError, ValueError, errors.MigrationError):
    return UNKNOWN
