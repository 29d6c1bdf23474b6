"""SRC read as regular files inside it; DST written relative to its held parent.

Issue #14, without TensorFlow (fast): `fileutil.source_files` refuses a
symlink out of the module, a dangling one, a loop, a FIFO, a device or a
socket before anything opens it, and `fileutil.tree_sha256` (the resume hash)
covers the bytes reached through a symlinked `variables/`;
`staging.Destination` stages and commits relative to DST's parent held open,
refuses when that parent is swapped, never lands inside SRC (by inode), and
cleans up after killed runs, putting back a DST moved aside by a cut-short
`--overwrite`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from migrate import batch_sources
from migrate import errors
from migrate import fileutil
from migrate import preflight
from migrate import staging
from tests.conftest import MODULES

FIXTURE = os.path.join(MODULES, "inference_only_asset")


def _module(tmp_path, name="m") -> str:
  return shutil.copytree(FIXTURE, str(tmp_path / name))


def _refused(path: str, *words: str) -> None:
  """Both the walk and the CLI's preflight refuse it, in one line, at once."""
  start = time.monotonic()
  for check in (lambda: fileutil.source_files(path),
                lambda: preflight.check_source(path),
                lambda: fileutil.tree_sha256(path)):
    with pytest.raises(errors.CorruptModuleError) as info:
      check()
    assert info.value.exit_code == errors.ExitCode.CORRUPT
    text = str(info.value)
    assert "\n" not in text
    for word in words:
      assert word in text, text
  assert time.monotonic() - start < 10  # Nothing blocked on a FIFO.


def test_special_files_are_refused_before_they_are_opened(tmp_path):
  src = _module(tmp_path, "fifo")
  os.mkfifo(os.path.join(src, "variables", "stall"))
  _refused(src, "variables/stall", "a FIFO")

  src = _module(tmp_path, "device")
  os.symlink("/dev/zero", os.path.join(src, "variables", "zero"))
  _refused(src, "variables/zero", "a symlink to /dev/zero, outside it")

  src = _module(tmp_path, "socket")
  sock = socket.socket(socket.AF_UNIX)
  try:
    sock.bind(os.path.join(src, "assets", "sock"))
    _refused(src, "assets/sock", "a socket")
  finally:
    sock.close()


def test_links_out_of_the_module_dangling_links_and_loops_are_refused(tmp_path):
  secret = tmp_path / "secret.txt"
  secret.write_text("not part of the module")
  src = _module(tmp_path, "assets_link")
  shutil.rmtree(os.path.join(src, "assets"))
  os.symlink(str(tmp_path), os.path.join(src, "assets"))
  _refused(src, os.path.join(src, "assets"), "outside it")

  src = _module(tmp_path, "file_link")
  os.symlink(str(secret), os.path.join(src, "assets", "extra.txt"))
  _refused(src, "assets/extra.txt", "outside it")

  src = _module(tmp_path, "dangling")
  os.symlink("no_such_file", os.path.join(src, "notes.txt"))
  _refused(src, "notes.txt", "a dangling symlink")

  src = _module(tmp_path, "loop")
  os.symlink("..", os.path.join(src, "variables", "up"))
  _refused(src, "variables/up", "a symlink loop")


def test_symlinks_inside_the_module_are_followed_and_hashed(tmp_path):
  src = _module(tmp_path)
  os.rename(os.path.join(src, "variables"), os.path.join(src, "weights"))
  os.symlink("weights", os.path.join(src, "variables"))
  listed = [f.relpath for f in fileutil.source_files(src)]
  assert "variables/variables.index" in listed and "weights/variables.index" in listed
  before = batch_sources.source_sha256(src, batch_sources.KIND_DIRECTORY)
  data = os.path.join(src, "weights", "variables.data-00000-of-00001")
  with open(data, "r+b") as f:
    f.write(b"\x00")
  assert batch_sources.source_sha256(src, batch_sources.KIND_DIRECTORY) != before


def test_the_walk_is_bounded(tmp_path):
  src = _module(tmp_path)
  with pytest.raises(errors.CorruptModuleError, match="at most 3 files"):
    fileutil.source_files(src, max_entries=3)
  with pytest.raises(errors.CorruptModuleError, match="at most 1000 bytes"):
    fileutil.source_files(src, max_bytes=1000)
  sparse = os.path.join(src, "assets", "sparse")
  with open(sparse, "wb") as f:
    f.truncate(fileutil.MAX_SOURCE_BYTES + 1)  # A terabyte-style sparse file.
  with pytest.raises(errors.CorruptModuleError, match="bytes"):
    batch_sources.source_sha256(src, batch_sources.KIND_DIRECTORY)


def test_non_utf8_paths_are_refused_with_their_bytes_escaped(tmp_path):
  root = os.fsencode(str(tmp_path))
  src = os.fsdecode(shutil.copytree(os.fsencode(FIXTURE), root + b"/caf\xe9"))
  with pytest.raises(errors.InputNotFoundError) as info:
    preflight.check_source(src)
  assert "caf\\xe9" in str(info.value) and info.value.exit_code == 3


# -- DST -------------------------------------------------------------------------------

def test_output_inside_src_is_refused_by_inode(tmp_path):
  src = _module(tmp_path)
  alias = str(tmp_path / "alias")
  os.symlink(src, alias)  # Another path to SRC.
  for dst in (os.path.join(alias, "out"), os.path.join(src, "variables", "out")):
    with pytest.raises(errors.OutputError, match="inside"):
      preflight.check_destination(src, dst, overwrite=True)
    with pytest.raises(errors.OutputError, match="inside"):
      staging.Destination(dst, src=src)
  with pytest.raises(errors.OutputError, match="does not contain the input"):
    preflight.check_destination(src, str(tmp_path), overwrite=True)


def test_a_swapped_parent_gets_nothing_and_src_is_untouched(tmp_path):
  src = _module(tmp_path)
  parent = tmp_path / "parent"
  parent.mkdir()
  destination = staging.Destination(str(parent / "out"), src=src)
  staged = destination.stage()
  with open(os.path.join(staged.path, "saved_model.pb"), "wb") as f:
    f.write(b"model")
  os.rename(parent, tmp_path / "moved")
  os.symlink(src, parent)  # The parent now leads into SRC.
  with open(os.path.join(staged.path, "late_write"), "wb") as f:
    f.write(b"still in the held directory")
  with pytest.raises(errors.OutputError, match="replaced or moved"):
    staged.commit(overwrite=False)
  assert sorted(os.listdir(src)) == sorted(os.listdir(FIXTURE))
  assert os.listdir(tmp_path / "moved") == []  # Staging removed, nothing committed.
  destination.close()


def test_a_cut_short_overwrite_is_put_back(tmp_path):
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "old_model").write_text("previous")
  code = (
      "import os, sys\n"
      "from migrate import staging\n"
      "d = staging.Destination(sys.argv[1])\n"
      "staged = d.stage()\n"
      "old = d._mkdir(staging.OLD_MARK)\n"  # What commit does first...
      "os.rename(d.name, old + '/' + staging.PREVIOUS, src_dir_fd=d.fd, dst_dir_fd=d.fd)\n"
      "os._exit(9)\n")  # ...and then the process dies.
  proc = subprocess.run([sys.executable, "-c", code, str(dst)], cwd=str(MODULES),
                        env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(MODULES))),
                        check=False)
  assert proc.returncode == 9
  assert not dst.exists()
  assert len([n for n in os.listdir(tmp_path) if ".migrate-" in n]) == 2
  removed = staging.clean_stale(str(dst))
  assert len(removed) == 2
  assert (dst / "old_model").read_text() == "previous"
  assert [n for n in os.listdir(tmp_path) if ".migrate-" in n] == []


# -- the --report file (staging.ReportFile) -------------------------------------------

def test_a_report_whose_directory_is_swapped_mid_run_never_lands_in_src(tmp_path):
  src = _module(tmp_path)
  digest = fileutil.tree_sha256(src)
  reports = tmp_path / "reports"
  reports.mkdir()
  report = staging.ReportFile(str(reports / "r.json"), protected=(src,))
  os.rename(reports, tmp_path / "moved")
  os.symlink(src, reports)  # The path now leads into SRC.
  with pytest.raises(errors.OutputError, match="replaced or moved"):
    report.write("{}")
  report.close()
  assert fileutil.tree_sha256(src) == digest
  assert os.listdir(tmp_path / "moved") == []


@pytest.mark.parametrize("where", ["input_file", "output", "inside_output",
                                   "inside_input", "too_long", "trailing_slash"])
def test_a_report_may_not_replace_an_input_or_the_output(tmp_path, where):
  src = _module(tmp_path)
  new = tmp_path / "new.keras"
  new.write_bytes(b"model")
  dst = tmp_path / "dst"
  dst.mkdir()
  path = {"input_file": str(new), "output": str(dst),
          "inside_output": str(dst / "r.json"),
          "inside_input": os.path.join(src, "r.json"),
          "too_long": str(tmp_path / ("r" * 300)),
          "trailing_slash": str(tmp_path / "r") + "/"}[where]
  with pytest.raises(errors.OutputError) as info:
    staging.ReportFile(path, protected=(src, str(new), str(dst)))
  assert "\n" not in str(info.value)
  assert new.read_bytes() == b"model" and os.listdir(dst) == []


def test_a_report_replaces_a_symlink_never_what_it_points_to(tmp_path):
  target = tmp_path / "target.json"
  target.write_text("keep")
  (tmp_path / "r.json").symlink_to(target)
  report = staging.ReportFile(str(tmp_path / "r.json"))
  report.write('{"a": 1}')
  report.close()
  assert target.read_text() == "keep"
  assert (tmp_path / "r.json").read_text() == '{"a": 1}'
  assert not (tmp_path / "r.json").is_symlink()
