"""Small file-system helpers shared by the stages (no TensorFlow import).

`migrate.batch` and the CLI run without TensorFlow in their process, so what
they share with the TensorFlow-side stages lives here.
"""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def directory_size(path: str) -> int:
  """Bytes of every file below `path`."""
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, files in os.walk(path) for name in files)


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
