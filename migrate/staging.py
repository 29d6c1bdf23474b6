"""EXPORT's file-system half: DST's parent held open, staging, commit, cleanup.

No TensorFlow here: the CLI and `batch` (which never import it) clean up after
killed workers with the same code the worker stages and commits with.

`Destination(dst)` opens DST's parent directory once (`O_DIRECTORY`) and does
everything else relative to that handle (`dir_fd=`): the staging directory is
created in it, TensorFlow writes into it through `/proc/<pid>/fd/<n>` (a path
that follows the open directory, not the name), and the commit renames
within it. So if another process renames DST's parent mid-run and puts a
symlink in its place, nothing lands where the symlink points; the commit
then sees that the path no longer leads to the directory it holds and
refuses (nothing written). Whether the output would lie inside SRC is
checked by device and inode of every directory above it, never by comparing
path strings (a bind mount or a hard-linked directory tree cannot fool it).

Temporary names carry the owning process id: `.<name>.migrate-tmp-<pid>-*`
(a model being written) and `.<name>.migrate-old-<pid>-*` (the previous DST
during an `--overwrite` commit). `clean_stale` removes those of dead
processes, and puts a previous DST back if a commit was cut short.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
from typing import Optional

from migrate import errors
from migrate import fileutil
from migrate import isolation

MODEL_CARD_FILENAME = "MODEL_CARD.md"
MODEL_CARD_TITLE = "# Model card: converted TF1 Hub module"
TMP_MARK = ".migrate-tmp-"
OLD_MARK = ".migrate-old-"
PREVIOUS = "previous"  # The old DST inside a `.migrate-old-` directory.
_MAX_PARENTS = 4096  # Depth bound while walking up with '..'.


def identity(st: os.stat_result) -> tuple[int, int]:
  return (st.st_dev, st.st_ino)


def path_identity(path: str) -> Optional[tuple[int, int]]:
  """(device, inode) of what `path` names (following symlinks), or None."""
  try:
    return identity(os.stat(path))
  except OSError:
    return None


def ancestors(dir_fd: int) -> list[tuple[int, int]]:
  """(device, inode) of the directory `dir_fd` and of each one above it, up
  to the root, found by opening '..' (not by reading a path)."""
  result = [identity(os.fstat(dir_fd))]
  fd = os.dup(dir_fd)
  try:
    for _ in range(_MAX_PARENTS):
      up = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
      os.close(fd)
      fd = up
      here = identity(os.fstat(fd))
      if here == result[-1]:
        break  # '..' of the root is the root.
      result.append(here)
  finally:
    os.close(fd)
  return result


def is_within(path: str, container: str) -> bool:
  """Whether the directory `path` is `container` or lies below it, by inode."""
  target = path_identity(container)
  if target is None:
    return False
  try:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
  except OSError:
    return False
  try:
    return target in ancestors(fd)
  finally:
    os.close(fd)


def check_replaceable(dst: str, st: os.stat_result) -> None:
  """`--overwrite` replaces a directory, a file or a symlink (not what it
  points to); never a FIFO, a device or a socket (`/dev/null` as DST)."""
  if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or
          stat.S_ISLNK(st.st_mode)):
    raise errors.OutputError(
        f"{dst}: expected a directory or a file to replace, found a special "
        f"file (a device, FIFO or socket); refusing to replace it")


def _proc_path(fd: int) -> Optional[str]:
  """A path that names the open directory `fd` for this process and its
  children (Linux), whatever happens to its name meanwhile."""
  path = f"/proc/{os.getpid()}/fd/{fd}"
  try:
    if os.path.samestat(os.stat(path), os.fstat(fd)):
      return path
  except OSError:
    pass
  return None


def _stale_pattern(name: str) -> re.Pattern:
  marks = "|".join(re.escape(m) for m in (TMP_MARK, OLD_MARK))
  return re.compile(rf"^\.{re.escape(name)}({marks})(\d+)-")


def _rmtree(name: str, dir_fd: int) -> None:
  try:
    st = os.lstat(name, dir_fd=dir_fd)
  except OSError:
    return
  if stat.S_ISDIR(st.st_mode):
    shutil.rmtree(name, dir_fd=dir_fd, ignore_errors=True)
  else:
    try:
      os.unlink(name, dir_fd=dir_fd)
    except OSError:
      pass


class StagedOutput:
  """A directory beside DST being written, then moved into place."""

  def __init__(self, destination: "Destination", name: str, fd: int,
               member: Optional[str] = None):
    self.destination = destination
    self.name = name  # Its name in DST's parent.
    self._fd = fd
    self.dst = destination.dst
    # The output is this directory, or the one file `member` in it (a
    # `.keras` model): then that file is what becomes DST.
    self.member = member
    # Where to write and read it: follows the directory itself (see module doc).
    directory = _proc_path(fd) or os.path.join(destination.parent, name)
    self.path = os.path.join(directory, member) if member else directory

  @property
  def output_name(self) -> str:
    """What is renamed to DST, relative to DST's parent."""
    return f"{self.name}/{self.member}" if self.member else self.name

  def write_model_card(self, text: str) -> None:
    with open(os.path.join(self.path, MODEL_CARD_FILENAME), "w",
              encoding="utf-8") as f:
      f.write(text)

  def commit(self, *, overwrite: bool) -> None:
    """Moves the model into place (replacing DST only if `overwrite`)."""
    self.destination.commit(self, overwrite=overwrite)

  def keep_aside(self, suffix: str) -> str:
    """Moves the model to `<DST><suffix>` for inspection; returns that path."""
    return self.destination.keep_aside(self, suffix)

  def discard(self) -> None:
    self.destination.discard(self)

  def close(self) -> None:
    if self._fd >= 0:
      os.close(self._fd)
      self._fd = -1


class Destination:
  """DST's parent directory, held open for the whole run."""

  def __init__(self, dst: str, *, src: Optional[str] = None):
    self.dst = dst
    absolute = os.path.abspath(dst)
    self.name = os.path.basename(absolute)
    self.parent = os.path.dirname(absolute)
    if not self.name or self.name in (".", ".."):
      raise errors.OutputError(
          f"{dst}: expected an output path that names a new directory, found "
          f"'{self.name or '/'}'")
    fileutil.check_utf8(dst, "an output path")
    try:
      self.fd = os.open(self.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
      raise errors.OutputError(
          f"{dst}: expected an existing parent directory, found "
          f"{self.parent}: {e.strerror or type(e).__name__}") from None
    self.parent_identity = identity(os.fstat(self.fd))
    self.src_identity = path_identity(src) if src else None
    self.src = src
    self.check_outside_src()

  # -- checks ---------------------------------------------------------------------

  def check_outside_src(self) -> None:
    """Refuses if DST's parent is SRC or below it (by device and inode)."""
    if self.src_identity is not None and self.src_identity in ancestors(self.fd):
      raise errors.OutputError(
          f"{self.dst}: expected an output path outside the input module "
          f"{self.src}, found it inside (the input is never modified)")

  def check_parent_unchanged(self) -> None:
    """Refuses if DST's parent path no longer leads to the directory held."""
    if path_identity(self.parent) != self.parent_identity:
      raise errors.OutputError(
          f"{self.dst}: expected its parent directory {self.parent} to stay "
          f"in place, found it replaced or moved during the run; nothing was "
          f"written")

  def exists(self) -> bool:
    try:
      os.lstat(self.name, dir_fd=self.fd)
      return True
    except FileNotFoundError:
      return False

  def identity(self) -> Optional[tuple[int, int]]:
    try:
      return identity(os.stat(self.name, dir_fd=self.fd))
    except OSError:
      return None

  # -- staging and commit -----------------------------------------------------------

  def _mkdir(self, mark: str) -> str:
    for _ in range(100):
      name = f".{self.name}{mark}{os.getpid()}-{secrets.token_hex(4)}"
      try:
        os.mkdir(name, 0o700, dir_fd=self.fd)
        return name
      except FileExistsError:
        continue
    raise FileExistsError(f"{self.parent}: no free temporary name")

  def stage(self, member: Optional[str] = None) -> StagedOutput:
    """A fresh empty directory beside DST (after removing dead runs' ones);
    with `member`, the output will be that one file in it."""
    self.clean_stale()
    name = self._mkdir(TMP_MARK)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
    return StagedOutput(self, name, fd, member)

  def commit(self, staged: StagedOutput, *, overwrite: bool) -> None:
    """Renames the staged model to DST within the held parent."""
    try:
      self.check_parent_unchanged()
      self.check_outside_src()
    except errors.MigrationError:
      self.discard(staged)
      raise
    old = None
    if self.exists():
      if not overwrite:
        self.discard(staged)
        raise errors.OutputError(
            f"{self.dst}: expected a new output path, found one created "
            f"meanwhile (pass --overwrite to replace it)")
      try:
        check_replaceable(self.dst, os.lstat(self.name, dir_fd=self.fd))
      except errors.MigrationError:
        self.discard(staged)
        raise
      old = self._mkdir(OLD_MARK)
      try:
        os.rename(self.name, f"{old}/{PREVIOUS}", src_dir_fd=self.fd,
                  dst_dir_fd=self.fd)
      except OSError as e:  # EBUSY: DST is a mount point; EXDEV, EPERM...
        _rmtree(old, self.fd)
        self.discard(staged)
        raise errors.OutputError(
            f"{self.dst}: expected an output that can be moved aside to be "
            f"replaced, found {e.strerror or type(e).__name__} (a mount "
            f"point?); nothing was written") from None
    os.rename(staged.output_name, self.name, src_dir_fd=self.fd,
              dst_dir_fd=self.fd)
    staged.close()
    if staged.member:
      _rmtree(staged.name, self.fd)
    if old is not None:
      _rmtree(old, self.fd)

  def keep_aside(self, staged: StagedOutput, suffix: str) -> str:
    target = self.name + suffix
    _rmtree(target, self.fd)
    os.rename(staged.output_name, target, src_dir_fd=self.fd, dst_dir_fd=self.fd)
    staged.close()
    if staged.member:
      _rmtree(staged.name, self.fd)
    return os.path.join(self.parent, target)

  def discard(self, staged: StagedOutput) -> None:
    staged.close()
    _rmtree(staged.name, self.fd)

  # -- after killed runs --------------------------------------------------------------

  def clean_stale(self, *, pid: Optional[int] = None) -> list[str]:
    """Removes the temporaries of dead runs for DST (or those of `pid`, once
    it is dead); a previous DST moved aside by a cut-short commit is put back."""
    pattern = _stale_pattern(self.name)
    removed = []
    try:
      names = sorted(os.listdir(self.fd))
    except OSError:
      return removed
    for name in names:
      match = pattern.match(name)
      if not match:
        continue
      owner = int(match.group(2))
      if (pid is not None and owner != pid) or fileutil.pid_alive(owner):
        continue
      if match.group(1) == OLD_MARK and not self.exists():
        try:
          os.rename(f"{name}/{PREVIOUS}", self.name, src_dir_fd=self.fd,
                    dst_dir_fd=self.fd)
        except OSError:
          pass
      _rmtree(name, self.fd)
      removed.append(name)
    return removed

  def close(self) -> None:
    if self.fd >= 0:
      os.close(self.fd)
      self.fd = -1

  def __enter__(self) -> "Destination":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def has_model_card(dst: str) -> bool:
  """Whether the directory `dst` holds a model card this tool wrote (a model
  it made, which a batch may replace)."""
  try:
    card = fileutil.read_regular_file(os.path.join(dst, MODEL_CARD_FILENAME),
                                      max_bytes=1 << 20)
  except (OSError, errors.MigrationError):
    return False
  return card.split(b"\n", 1)[0].strip() == MODEL_CARD_TITLE.encode()


def clean_stale(dst: str, *, pid: Optional[int] = None) -> list[str]:
  """`Destination.clean_stale` for a DST path (nothing if its parent is gone)."""
  try:
    destination = Destination(dst)
  except errors.MigrationError:
    return []
  with destination:
    return destination.clean_stale(pid=pid)


def settled(error: errors.MigrationError, dst: str,
            before: Optional[tuple[int, int]], *, verified: bool
            ) -> errors.MigrationError:
  """`error` (of a worker that died, timed out or was stopped) once the
  worker is gone: what it staged beside DST is removed (a DST that a cut-short
  `--overwrite` commit had moved aside is put back), and the message ends in
  what is true: DST complete (the worker had moved the finished model into
  place before it died) or nothing written. `before`: DST's
  `path_identity` when the work began."""
  clean_stale(dst)
  text = str(error)
  if text.endswith(isolation.NOTHING_WRITTEN):
    text = text[:-len(isolation.NOTHING_WRITTEN)]
  after = path_identity(dst)
  if after is not None and after != before:
    text += (f"; the finished model had already been moved into place: {dst} "
             f"is complete{' and verified' if verified else ''}, only the "
             f"summary was lost")
  else:
    text += isolation.NOTHING_WRITTEN
  return type(error)(text)


class ReportFile:
  """A file written beside the model (`--report`), placed the way DST is.

  Checked when the run starts, so that a wrong path costs no conversion: its
  parent must exist and is held open from then on; what the name holds, if
  anything, must be a regular file or a symlink (which is replaced, never
  written through), and neither an input nor the output (`protected`: SRC,
  OLD, NEW, DST), nor inside one. At the end the text is written to a
  temporary file in the held directory and renamed over the name, after
  checking again that the directory is where it was and outside them.
  Every failure is an `OutputError`.
  """

  def __init__(self, path: str, *, protected: tuple[str, ...] = ()):
    self.path = path
    self.fd = -1
    absolute = os.path.abspath(path)
    self.name = os.path.basename(absolute)
    self.parent = os.path.dirname(absolute)
    fileutil.check_utf8(path, "a report path")
    if path.endswith(os.sep) or not self.name or self.name in (".", ".."):
      raise errors.OutputError(f"{path}: expected a report file name, found "
                               f"a directory path")
    self.protected = [(given, os.path.abspath(given), path_identity(given))
                      for given in protected]
    try:
      self.fd = os.open(self.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
      self.parent_identity = identity(os.fstat(self.fd))
      self._check_placement()
      try:
        st = os.lstat(self.name, dir_fd=self.fd)
      except FileNotFoundError:
        return
      if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise errors.OutputError(
            f"{path}: expected a report file to replace, found "
            f"{'a directory' if stat.S_ISDIR(st.st_mode) else 'a special file'}")
    except OSError as e:
      self.close()
      raise errors.OutputError(
          f"{path}: expected a report path in an existing, searchable "
          f"directory, found {e.strerror or type(e).__name__}") from None
    except BaseException:
      self.close()
      raise

  def _check_placement(self) -> None:
    above = ancestors(self.fd)
    try:
      here = identity(os.stat(self.name, dir_fd=self.fd))
    except OSError:
      here = None
    for given, absolute, found in self.protected:
      if (found is not None and (found in above or found == here)) or (
          absolute == os.path.join(self.parent, self.name) or
          os.path.join(self.parent, self.name).startswith(absolute + os.sep)):
        raise errors.OutputError(
            f"{self.path}: expected a report path outside {given}, found it "
            f"there (the input and the output are never written by the report)")
    if path_identity(self.parent) != self.parent_identity:
      raise errors.OutputError(
          f"{self.path}: expected its directory {self.parent} to stay in "
          f"place, found it replaced or moved during the run; the report was "
          f"not written")

  def write(self, text: str) -> None:
    """Replaces the file with `text`, whole (`fileutil.atomic_write` in the
    held directory)."""
    try:
      self._check_placement()
      fileutil.atomic_write(self.name, text, dir_fd=self.fd)
    except OSError as e:
      raise errors.OutputError(
          f"{self.path}: expected a writable report file, found "
          f"{e.strerror or type(e).__name__}; the report was not written"
      ) from None

  def close(self) -> None:
    if self.fd >= 0:
      os.close(self.fd)
      self.fd = -1
