"""BATCH, what to convert: discovery, manifests, content hashes, archives, URLs.

    sources = discover("old_modules/", "new_models/")       # a mirrored tree
    sources = read_manifest("modules.csv", "old_modules/", "new_models/")

A `Source` is a module directory, a `.tar.gz` module archive (as tfhub.dev
served them: the module files at the archive root) or an http(s) URL that
`hub.resolve` accepts, with the path of its output. Planning (sizes, hashes)
reads local sources as regular files inside them (`fileutil`): a FIFO, a
device or a symlink out of SRC_ROOT is refused before anything opens it.
Archives are extracted and URLs fetched in the worker process
(`batch_worker`), with the helpers here. No TensorFlow at import.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import io
import os
import tarfile
import urllib.parse
import zlib
from typing import Optional, Sequence

from migrate import errors
from migrate import fileutil
from migrate import keras_format
from migrate import preflight

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")

KIND_DIRECTORY = "directory"
KIND_ARCHIVE = "archive"
KIND_URL = "url"

# Safety limits for extracting a module archive: those of a module directory.
MAX_ARCHIVE_BYTES = fileutil.MAX_SOURCE_BYTES
MAX_ARCHIVE_MEMBERS = fileutil.MAX_SOURCE_ENTRIES
MAX_MANIFEST_BYTES = 64 << 20  # Hundreds of thousands of rows.


class ManifestError(errors.UsageError):
  """The manifest CSV is malformed (a usage error)."""


@dataclasses.dataclass(frozen=True)
class Source:
  """One module to convert: where it is, where its output goes."""

  location: str  # Absolute path (directory or archive) or URL.
  kind: str  # KIND_DIRECTORY, KIND_ARCHIVE or KIND_URL.
  destination: str  # Absolute path of the converted model.
  signature: Optional[str] = None  # Per-module overrides of the options.
  output_key: Optional[str] = None
  # What a discovered source must stay inside (SRC_ROOT): a symlink out of it
  # is refused. None: the source itself is the boundary (manifest rows).
  root: Optional[str] = None

  @property
  def name(self) -> str:
    return self.location


def is_url(location: str) -> bool:
  return urllib.parse.urlparse(location).scheme in ("http", "https")


def _is_archive(path: str) -> bool:
  return path.endswith(ARCHIVE_SUFFIXES)


def archive_stem(name: str) -> str:
  for suffix in ARCHIVE_SUFFIXES:
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


def _kind(location: str) -> str:
  if is_url(location):
    return KIND_URL
  if os.path.isfile(location) and _is_archive(location):
    return KIND_ARCHIVE
  return KIND_DIRECTORY


def discover(src_root: str, dst_root: str) -> list[Source]:
  """Finds TF1 Hub modules under `src_root`: a mirrored tree under `dst_root`.

  A directory holding `tfhub_module.pb` is a module (its subdirectories are
  not searched); `*.tar.gz` / `*.tgz` files are module archives
  (`x/foo.tar.gz` -> `DST_ROOT/x/foo`). Hidden directories and `dst_root`
  itself (unless it is a module) are skipped. If `src_root` is itself a
  module or an archive, its output is `DST_ROOT/<its name>`.
  """
  src_root = os.path.abspath(src_root)
  dst_root = os.path.abspath(dst_root)
  if not os.path.exists(src_root):
    raise errors.InputNotFoundError(f"{src_root}: no such file or directory")
  if os.path.isfile(src_root):
    if not _is_archive(src_root):
      raise errors.InputNotFoundError(
          f"{src_root}: expected a directory of TF1 Hub modules or a .tar.gz "
          f"module archive, found another file")
    name = archive_stem(os.path.basename(src_root))
    return [Source(src_root, KIND_ARCHIVE, os.path.join(dst_root, name))]
  if os.path.isfile(os.path.join(src_root, preflight.MODULE_DEF_FILENAME)):
    return [Source(src_root, KIND_DIRECTORY,
                   os.path.join(dst_root, os.path.basename(src_root)))]
  # The walk lists symlinks without following them; a module reached through
  # one is checked against SRC_ROOT when it is planned (`Source.root`).
  sources = []
  for root, dirs, files in os.walk(src_root):
    dirs.sort()
    files.sort()
    keep = []
    for d in dirs:
      full = os.path.join(root, d)
      is_module = os.path.isfile(os.path.join(full, preflight.MODULE_DEF_FILENAME))
      # DST_ROOT is skipped, unless it is a module (which the batch then
      # refuses to write into: `BatchRunner.check_outside_sources`).
      if d.startswith(".") or (full == dst_root and not is_module):
        continue
      if is_module:
        rel = os.path.relpath(full, src_root)
        sources.append(Source(full, KIND_DIRECTORY, os.path.join(dst_root, rel),
                              root=src_root))
      else:
        keep.append(d)
    dirs[:] = keep
    for f in files:
      if _is_archive(f) and not f.startswith("."):
        full = os.path.join(root, f)
        rel = os.path.relpath(os.path.join(root, archive_stem(f)), src_root)
        sources.append(Source(full, KIND_ARCHIVE, os.path.join(dst_root, rel),
                              root=src_root))
  return sorted(sources, key=lambda s: s.destination)


def _default_destination_name(location: str) -> str:
  if is_url(location):
    path = urllib.parse.urlparse(location).path.rstrip("/")
    parts = [p for p in path.split("/") if p]
    if not parts:
      raise ManifestError(f"{location}: expected a URL with a path, found none "
                          f"(give a destination)")
    name = archive_stem(parts[-1])
    # tfhub.dev handles end in a version number: publisher/model/1 -> model_1.
    if name.isdigit() and len(parts) > 1:
      name = f"{archive_stem(parts[-2])}_{name}"
    return name
  return archive_stem(os.path.basename(os.path.normpath(location)))


def read_manifest(manifest: str, src_root: str, dst_root: str) -> list[Source]:
  """Reads a CSV with columns source, destination[, signature, output_key].

  Relative sources resolve under `src_root`, relative destinations under
  `dst_root`; an empty destination is the source's name. A destination may
  not leave `dst_root` through `..`, and two rows may not share one.
  """
  src_root = os.path.abspath(src_root)
  dst_root = os.path.abspath(dst_root)
  try:
    # A regular file of sane size: a FIFO or /dev/zero must not block.
    text = fileutil.read_regular_file(manifest, max_bytes=MAX_MANIFEST_BYTES)
    rows = list(csv.DictReader(io.StringIO(text.decode("utf-8-sig"), newline="")))
    header = [h.strip() for h in (rows[0].keys() if rows else [])]
  except FileNotFoundError:
    raise errors.InputNotFoundError(f"{manifest}: no such manifest file") from None
  except errors.MigrationError as e:
    raise ManifestError(str(e)) from None
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise ManifestError(f"{manifest}: expected a UTF-8 CSV file, found "
                        f"{type(e).__name__}: {e}") from None
  if not rows:
    raise ManifestError(f"{manifest}: expected a header (source, destination"
                        f"[, signature, output_key]) and rows, found none")
  known = {"source", "destination", "signature", "output_key"}
  unknown = sorted(set(header) - known)
  if "source" not in header or unknown:
    raise ManifestError(
        f"{manifest}: expected columns source, destination[, signature, "
        f"output_key], found {', '.join(header)}")
  sources = []
  seen: dict[str, int] = {}
  for line, row in enumerate(rows, start=2):
    row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
    location = row.get("source", "")
    if not location:
      raise ManifestError(f"{manifest}:{line}: expected a source, found none")
    if not is_url(location):
      location = os.path.normpath(os.path.join(src_root, location))
    dest = row.get("destination") or _default_destination_name(location)
    if not os.path.isabs(dest):
      dest = os.path.normpath(os.path.join(dst_root, dest))
      if dest == dst_root or not dest.startswith(dst_root + os.sep):
        raise ManifestError(
            f"{manifest}:{line}: expected a destination inside {dst_root}, "
            f"found {row.get('destination')!r}")
    if dest in seen:
      raise ManifestError(
          f"{manifest}:{line}: expected a destination of its own, found "
          f"{dest} also on line {seen[dest]}")
    seen[dest] = line
    sources.append(Source(location, _kind(location), dest,
                          signature=row.get("signature") or None,
                          output_key=row.get("output_key") or None))
  return sources


def output_destinations(sources: Sequence[Source], output_format: Optional[str]
                        ) -> list[Source]:
  """`sources` with the destinations of `output_format`: `.keras` files for
  FORMAT_KERAS (a destination already ending in `.keras` is kept)."""
  if output_format != keras_format.FORMAT_KERAS:
    return list(sources)
  return [s if keras_format.is_keras_path(s.destination) else
          dataclasses.replace(s, destination=s.destination + keras_format.SUFFIX)
          for s in sources]


# -- content hashes --------------------------------------------------------------

def source_sha256(location: str, kind: str) -> str:
  """The content hash of a local source (archive file or module directory):
  every byte that conversion reads (files reached through symlinks inside the
  module included). FIFOs, devices and links out of it are refused before
  anything opens them, so planning cannot block."""
  if kind == KIND_ARCHIVE:
    return fileutil.file_sha256(location)
  return fileutil.tree_sha256(location)


def source_size(source: Source) -> int:
  """Bytes of a local source; refuses what `source_sha256` refuses."""
  if source.kind == KIND_ARCHIVE:
    os.close(fileutil.open_regular(source.location))
    size = os.path.getsize(source.location)
    if size > MAX_ARCHIVE_BYTES:
      raise errors.CorruptModuleError(
          f"{source.location}: expected an archive of at most "
          f"{MAX_ARCHIVE_BYTES} bytes, found {size}")
    return size
  if source.kind == KIND_DIRECTORY:
    return sum(f.size for f in fileutil.source_files(source.location))
  return 0


# -- archives and URLs -----------------------------------------------------------

def extract_archive(archive: str, dest: str, *,
                    max_bytes: int = MAX_ARCHIVE_BYTES,
                    max_members: int = MAX_ARCHIVE_MEMBERS) -> str:
  """Extracts a module archive safely into the new directory `dest`.

  Only regular files and directories, no absolute paths or `..` (tarfile's
  'data' filter as well), at most `max_members` entries and `max_bytes`
  bytes. Returns the module directory: `dest`, or its only subdirectory if
  the files sit one level down.
  """
  def corrupt(found: str) -> errors.MigrationError:
    return errors.CorruptModuleError(
        f"{archive}: expected a gzipped tar archive of a TF1 Hub module, "
        f"found {found}")

  os.makedirs(dest)
  try:
    with os.fdopen(fileutil.open_regular(archive), "rb") as raw, \
         tarfile.open(fileobj=raw, mode="r:*") as tar:
      members = []
      total = 0
      for member in tar:
        if len(members) >= max_members:
          raise corrupt(f"more than {max_members} entries")
        name = member.name
        parts = name.replace("\\", "/").split("/")
        if os.path.isabs(name) or ".." in parts:
          raise corrupt(f"an entry outside the archive root ({name!r})")
        if not (member.isfile() or member.isdir()):
          raise corrupt(f"an entry that is not a file or directory ({name!r})")
        total += member.size
        if total > max_bytes:
          raise corrupt(f"more than {max_bytes} bytes of content")
        members.append(member)
      tar.extractall(dest, members=members, filter="data")
  except errors.MigrationError:
    raise
  except PermissionError as e:
    raise errors.InputNotFoundError(f"{archive}: expected a readable archive, "
                                    f"found {e.strerror}") from None
  except OSError as e:
    if e.errno == errno.ENOSPC:
      raise errors.OutputError(f"{dest}: expected room to extract {archive}, "
                               f"found the disk full") from None
    raise corrupt(f"{type(e).__name__}: {e}") from None
  except (tarfile.TarError, EOFError, zlib.error, ValueError) as e:
    raise corrupt(f"{type(e).__name__}: {e}") from None
  return module_root(dest)


def module_root(extracted: str) -> str:
  """The module directory of an extracted archive: `extracted`, or its only
  subdirectory if the module's files sit one level down."""
  if not os.path.isfile(os.path.join(extracted, preflight.MODULE_DEF_FILENAME)):
    try:
      entries = os.listdir(extracted)
    except OSError:
      return extracted
    if len(entries) == 1 and os.path.isfile(
        os.path.join(extracted, entries[0], preflight.MODULE_DEF_FILENAME)):
      return os.path.join(extracted, entries[0])
  return extracted


def resolve_url(url: str, cache_dir: str) -> str:
  """Downloads (or finds in `cache_dir`) the module at `url`; -> its directory.
  Imports tensorflow_hub: for the worker process."""
  os.environ["TFHUB_CACHE_DIR"] = cache_dir
  os.environ["TFHUB_MODEL_LOAD_FORMAT"] = "COMPRESSED"
  import tensorflow_hub as hub  # pylint: disable=g-import-not-at-top
  import urllib.error  # pylint: disable=g-import-not-at-top
  try:
    return hub.resolve(url)
  except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
    reason = getattr(e, "reason", None) or e
    if isinstance(e, urllib.error.HTTPError):
      reason = f"HTTP {e.code} {e.reason}"
    raise errors.InputNotFoundError(
        f"{url}: expected a downloadable TF1 Hub module archive, found "
        f"{type(e).__name__}: {reason}") from None
  except (OSError, ValueError, tarfile.TarError, EOFError, zlib.error) as e:
    raise errors.CorruptModuleError(
        f"{url}: expected a gzipped tar archive of a TF1 Hub module, found "
        f"{type(e).__name__}: {e}") from None
