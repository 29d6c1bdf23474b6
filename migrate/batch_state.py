"""BATCH, state and locking: what a batch leaves in DST_ROOT between runs.

- `DST_ROOT/.migrate-batch-state.json` (`BatchState`): one record per
  destination (its outcome, the sha256 of its source, the options'
  fingerprint), rewritten atomically after every module; a rerun skips what
  it records as up to date.
- `RunLock`: one batch at a time per DST_ROOT (flock on the directory).
- `DST_ROOT/.migrate-batch/` (`WORK_DIRNAME`): `tmp/<pid>-*` extraction
  directories, `tfhub_cache/`; `clean_stale_files` removes what killed runs
  left (their staging directories beside each DST too: `staging.clean_stale`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import threading
from typing import Any, Iterable, Optional

from migrate import errors
from migrate import fileutil
from migrate import staging

STATE_FILENAME = ".migrate-batch-state.json"
WORK_DIRNAME = ".migrate-batch"
STATE_VERSION = 1


class BatchState:
  """`DST_ROOT/.migrate-batch-state.json`: one record per destination."""

  def __init__(self, path: str, dst_root: str):
    self.path = path
    self.dst_root = dst_root
    self._lock = threading.Lock()
    self.records: dict[str, dict[str, Any]] = {}
    self.warning: Optional[str] = None
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
      if data.get("version") == STATE_VERSION:
        self.records = dict(data.get("modules", {}))
      else:
        self.warning = f"{path}: unknown state version; starting afresh"
    except FileNotFoundError:
      pass
    except (OSError, ValueError, AttributeError) as e:
      self.warning = f"{path}: unreadable state ({e}); starting afresh"

  def key(self, destination: str) -> str:
    if destination.startswith(self.dst_root + os.sep):
      return os.path.relpath(destination, self.dst_root).replace(os.sep, "/")
    return destination

  def get(self, destination: str) -> Optional[dict[str, Any]]:
    with self._lock:
      return self.records.get(self.key(destination))

  def put(self, destination: str, record: dict[str, Any]) -> None:
    with self._lock:
      self.records[self.key(destination)] = record
      fileutil.atomic_write(self.path, json.dumps(
          {"version": STATE_VERSION, "modules": self.records}, indent=1,
          sort_keys=True))


def _remove_if_dead(path: str, pid_text: str) -> bool:
  if pid_text.isdigit() and not fileutil.pid_alive(int(pid_text)):
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      try:
        os.unlink(path)
      except OSError:
        return False
    return True
  return False


def clean_stale_files(dst_root: str, destinations: Iterable[str]) -> list[str]:
  """Removes what killed runs left: scratch dirs, state temp files, staging dirs."""
  removed = []
  scratch = os.path.join(dst_root, WORK_DIRNAME, "tmp")
  if os.path.isdir(scratch):
    for name in os.listdir(scratch):
      if _remove_if_dead(os.path.join(scratch, name), name.split("-", 1)[0]):
        removed.append(os.path.join(scratch, name))
  # fileutil.atomic_write's temporary names: .<name>.tmp-<pid>-*
  state_tmp = re.compile(rf"^\.{re.escape(STATE_FILENAME)}\.tmp-(\d+)-")
  try:
    for name in os.listdir(dst_root):
      match = state_tmp.match(name)
      if match and _remove_if_dead(os.path.join(dst_root, name), match.group(1)):
        removed.append(os.path.join(dst_root, name))
  except OSError:
    pass
  for dst in destinations:
    if os.path.isdir(os.path.dirname(dst)):
      removed += [os.path.join(os.path.dirname(dst), name)
                  for name in staging.clean_stale(dst)]
  return removed


class RunLock:
  """One batch at a time per DST_ROOT: flock on the directory itself.

  No lock file is left behind, and the lock goes with the process (even on
  SIGKILL).
  """

  def __init__(self, dst_root: str):
    self._fd = os.open(dst_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self._fd)
      raise errors.OutputError(
          f"{dst_root}: expected no other batch writing here, found one "
          f"running") from None

  def release(self) -> None:
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)


def remove_empty_work_dir(dst_root: str) -> None:
  """Removes DST_ROOT/.migrate-batch (and its tmp/) if nothing is left in them."""
  work_dir = os.path.join(dst_root, WORK_DIRNAME)
  for path in (os.path.join(work_dir, "tmp"), work_dir):
    try:
      os.rmdir(path)
    except OSError:
      pass
