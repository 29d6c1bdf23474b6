"""Small file-system helpers shared by the stages (no TensorFlow import).

`migrate.batch` and the CLI run without TensorFlow in their process, so what
they share with the TensorFlow-side stages lives here.

A module directory is read as regular files and directories that stay inside
it (`source_files`): a symlink whose target leaves it, a dangling one, a
FIFO, a device or a socket is refused with one line naming the path, before
anything opens it; files are opened with `O_NONBLOCK` and checked with
`fstat` (`open_regular`), so even a file swapped for a FIFO after the walk
cannot block a read.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import secrets
import stat
from typing import Iterator, Optional

from migrate import errors

# A module is a few files; the largest TF1 Hub image modules are well under
# 2 GB. What is read (and hashed for resuming) is bounded by these, so a
# sparse file of a terabyte cannot stall planning.
MAX_SOURCE_BYTES = 8 << 30
MAX_SOURCE_ENTRIES = 10_000
_READ_BLOCK = 1 << 20


def _kind(mode: int) -> str:
  if stat.S_ISFIFO(mode):
    return "a FIFO (named pipe)"
  if stat.S_ISCHR(mode):
    return "a character device"
  if stat.S_ISBLK(mode):
    return "a block device"
  if stat.S_ISSOCK(mode):
    return "a socket"
  if stat.S_ISDIR(mode):
    return "a directory"
  return "a special file"


def _unreadable(path: str, found: str,
                expected: str = "a regular file or directory inside the module"
                ) -> errors.CorruptModuleError:
  return errors.CorruptModuleError(
      f"{path}: expected {expected}, found {found}; refusing to read it")


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """One regular file of a module: where it is listed, where its bytes are."""

  relpath: str  # Relative to the module, '/'-separated, as listed.
  real: str  # Absolute path with every symlink resolved (inside the module).
  size: int


def _inside(real: str, root_real: str) -> bool:
  return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def source_files(root: str, *, within: Optional[str] = None,
                 max_bytes: int = MAX_SOURCE_BYTES,
                 max_entries: int = MAX_SOURCE_ENTRIES) -> list[SourceFile]:
  """Every regular file below the directory `root`, sorted by relative path.

  Symlinks are followed only when their target stays inside `within`
  (default: `root`); a symlinked directory is walked (a loop is refused).
  Raises `CorruptModuleError` naming the first path that is a link out of
  it, a dangling link, a FIFO, device or socket, or if the module has more
  than `max_entries` entries or `max_bytes` bytes. Nothing is opened.
  """
  root_real = os.path.realpath(root)
  within_real = os.path.realpath(within) if within else root_real
  check_within(root, within_real)
  result: list[SourceFile] = []
  total = 0
  entries = 0
  # (directory as listed, its real path, real paths of the directories above it)
  todo: list[tuple[str, str, frozenset[str]]] = [("", root_real, frozenset())]
  while todo:
    rel_dir, real_dir, ancestors = todo.pop()
    try:
      names = sorted(os.listdir(real_dir))
    except OSError as e:
      raise errors.CorruptModuleError(
          f"{os.path.join(root, rel_dir)}: expected a readable directory, found "
          f"{e.strerror or type(e).__name__}") from None
    for name in names:
      entries += 1
      rel = f"{rel_dir}/{name}" if rel_dir else name
      shown = os.path.join(root, rel)
      check_utf8(shown, "a file name")
      if entries > max_entries:
        raise errors.CorruptModuleError(
            f"{root}: expected a module of at most {max_entries} files, found "
            f"more")
      listed = os.path.join(real_dir, name)
      try:
        st = os.lstat(listed)
      except OSError as e:
        raise _unreadable(shown, e.strerror or type(e).__name__) from None
      real = listed
      if stat.S_ISLNK(st.st_mode):
        real = os.path.realpath(listed)
        if not _inside(real, within_real):
          raise errors.CorruptModuleError(
              f"{shown}: expected a file or directory inside the module, found "
              f"a symlink to {real}, outside it; refusing to read it")
        try:
          st = os.stat(real)
        except OSError as e:
          found = ("a symlink loop" if e.errno == errno.ELOOP else
                   f"a dangling symlink (to {os.readlink(listed)})")
          raise errors.CorruptModuleError(
              f"{shown}: expected a file or directory inside the module, found "
              f"{found}") from None
      if stat.S_ISDIR(st.st_mode):
        if real in ancestors or real == real_dir:
          raise errors.CorruptModuleError(
              f"{shown}: expected a directory tree, found a symlink loop")
        todo.append((rel, real, ancestors | {real_dir}))
      elif stat.S_ISREG(st.st_mode):
        total += st.st_size
        if total > max_bytes:
          raise errors.CorruptModuleError(
              f"{root}: expected a module of at most {max_bytes} bytes, found "
              f"more (at {rel})")
        result.append(SourceFile(rel, real, st.st_size))
      else:
        raise _unreadable(shown, _kind(st.st_mode))
  return sorted(result, key=lambda f: f.relpath)


def check_within(path: str, within: str) -> None:
  """Refuses `path` if it resolves (through symlinks) outside `within`."""
  real = os.path.realpath(path)
  within_real = os.path.realpath(within)
  if not _inside(real, within_real):
    raise errors.CorruptModuleError(
        f"{path}: expected a module inside {within}, found a symlink to "
        f"{real}, outside it; refusing to read it")


def check_utf8(path: str, what: str = "a path") -> None:
  """Refuses a path TensorFlow cannot open: its file APIs take UTF-8 names,
  and Python keeps undecodable bytes of a name as lone surrogates."""
  try:
    path.encode("utf-8")
  except UnicodeEncodeError:
    raise errors.InputNotFoundError(
        f"{path}: expected {what} in UTF-8 (TensorFlow opens no other), found "
        f"bytes that are not") from None


def open_regular(path: str, shown: Optional[str] = None) -> int:
  """Opens `path` for reading without blocking; refuses anything but a
  regular file (a FIFO, a device) once open. Returns the file descriptor."""
  shown = shown or path
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
  except OSError as e:
    if e.errno in (errno.ENXIO, errno.EWOULDBLOCK):  # A socket, a busy device.
      raise _unreadable(shown, "a special file", "a regular file") from None
    raise
  st = os.fstat(fd)
  if not stat.S_ISREG(st.st_mode):
    os.close(fd)
    raise _unreadable(shown, _kind(st.st_mode), "a regular file")
  os.set_blocking(fd, True)
  return fd


def _blocks(fd: int) -> Iterator[bytes]:
  with os.fdopen(fd, "rb", closefd=True) as f:
    for block in iter(lambda: f.read(_READ_BLOCK), b""):
      yield block


# Protocol buffers cannot exceed 2 GiB; a SavedModel's saved_model.pb is one.
MAX_PROTO_BYTES = 2 << 30


def read_regular_file(path: str, shown: Optional[str] = None, *,
                      max_bytes: int = MAX_PROTO_BYTES) -> bytes:
  """The bytes of the regular file `path` (refusing a FIFO or a device, or
  more than `max_bytes`, before reading them)."""
  fd = open_regular(path, shown)
  size = os.fstat(fd).st_size
  if size > max_bytes:
    os.close(fd)
    raise errors.CorruptModuleError(
        f"{shown or path}: expected at most {max_bytes} bytes, found {size}")
  return b"".join(_blocks(fd))


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  for block in _blocks(open_regular(path)):
    digest.update(block)
  return digest.hexdigest()


def tree_sha256(path: str, *, within: Optional[str] = None) -> str:
  """sha256 over every file of a module directory: relative paths, sizes and
  contents, following the symlinks that `source_files` allows (so the bytes
  conversion reads through a symlinked `variables/` are covered)."""
  digest = hashlib.sha256()
  for f in source_files(path, within=within):
    digest.update(f"{f.relpath}\0{f.size}\0".encode("utf-8", "surrogateescape"))
    for block in _blocks(open_regular(f.real, os.path.join(path, f.relpath))):
      digest.update(block)
  return digest.hexdigest()


def directory_size(path: str) -> int:
  """Bytes of every file below `path` (symlinks not followed, none counted twice)."""
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        st = os.lstat(os.path.join(root, name))
      except OSError:
        continue
      if stat.S_ISREG(st.st_mode):
        total += st.st_size
  return total


def atomic_write(path: str, text: str, *, dir_fd: Optional[int] = None) -> None:
  """Writes `text` to `path` through a temporary file beside it (fsync,
  rename): a reader sees the old file or the new one, never a part. With
  `dir_fd`, `path` is a name in that open directory, and everything happens
  relative to it. The file's mode follows the umask, as `open(path, "w")`
  would make it; a symlink at `path` is replaced, not written through."""
  if dir_fd is None:
    absolute = os.path.abspath(path)
    fd = os.open(os.path.dirname(absolute), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
      atomic_write(os.path.basename(absolute), text, dir_fd=fd)
    finally:
      os.close(fd)
    return
  tmp = f".{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                 os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
  except BaseException:
    try:
      os.unlink(tmp, dir_fd=dir_fd)
    except OSError:
      pass
    raise


def current_umask() -> int:
  """The process's umask, read without changing it where Linux shows it."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)  # Elsewhere: set and put back (process-wide, brief).
  os.umask(mask)
  return mask


def pid_alive(pid: int) -> bool:
  """Whether a process with this id exists (ours or another user's)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
