"""fileutil.atomic_write: whole files, with the mode the umask gives."""

import os
import stat

from migrate import fileutil


def test_atomic_write_follows_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    path = str(tmp_path / "report.json")
    fileutil.atomic_write(path, "{}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # Others may read it.
    os.umask(0o077)
    fileutil.atomic_write(path, "[]")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  finally:
    os.umask(old)
  assert open(path, encoding="utf-8").read() == "[]"
  assert os.listdir(tmp_path) == ["report.json"]  # No temporary file left.
