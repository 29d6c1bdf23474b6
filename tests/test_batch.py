"""Batch conversion (issue #5): many modules, each converted AND verified in a worker.

Real conversions of the small fixtures in spawned workers; nothing of
TensorFlow is mocked. The full corpus runs once (plus a truncated copy and the
text module); the other tests use two or three small fixtures.
"""

from __future__ import annotations

import concurrent.futures
import csv
import functools
import html.parser
import http.server
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time

import pytest

from migrate import batch
from migrate import batch_sources
from migrate import batch_state
from migrate import errors
from tests import bad_inputs as bi
from tests import proctree
from tests.conftest import FIXTURE_FAMILIES, REPO, convertible_fixture_names, module_path

SMALL = ("classifier_probabilities", "inference_only_asset", "refvars_bn")
TEMP_MARKS = (".migrate-tmp-", ".migrate-old-", ".tmp-")


# -- helpers ---------------------------------------------------------------------

def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "migrate.cli", *args], cwd=REPO,
                        env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


def _copy_module(name: str, dst: str) -> str:
  shutil.copytree(module_path(name), dst)
  return dst


def _make_archive(name: str, archive: str) -> str:
  """A module archive as tfhub.dev served them: the files at the root."""
  os.makedirs(os.path.dirname(archive), exist_ok=True)
  with tarfile.open(archive, "w:gz") as tar:
    for entry in sorted(os.listdir(module_path(name))):
      tar.add(os.path.join(module_path(name), entry), arcname=entry)
  return archive


def _truncated_copy(name: str, dst: str) -> str:
  _copy_module(name, dst)
  pb = os.path.join(dst, "saved_model.pb")
  with open(pb, "rb") as f:
    data = f.read()
  with open(pb, "wb") as f:
    f.write(data[:len(data) // 3])
  return dst


def _leftovers(root: str) -> list[str]:
  """Temporary files or directories of any run under `root`."""
  found = []
  for parent, dirs, files in os.walk(root):
    for name in dirs + files:
      if any(mark in name for mark in TEMP_MARKS):
        found.append(os.path.join(parent, name))
  scratch = os.path.join(root, batch.WORK_DIRNAME, "tmp")
  if os.path.isdir(scratch) and os.listdir(scratch):
    found.append(scratch)
  return found


def _assert_complete_model(path: str) -> None:
  for rel in ("saved_model.pb", "MODEL_CARD.md", "variables/variables.index"):
    assert os.path.isfile(os.path.join(path, rel)), f"{path}: no {rel}"


def _load_and_call(paths) -> None:
  """Every path loads with tf.saved_model.load and computes features."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for path in paths:
    obj = tf.saved_model.load(path)
    h, w = obj.metadata.default_image_size.numpy().tolist() or [32, 32]
    out = obj(tf.constant(np.full((1, h or 32, w or 32, 3), 0.5, np.float32)))
    assert out.shape[0] == 1 and np.all(np.isfinite(out.numpy())), path


def _state(dst_root: str) -> dict:
  with open(os.path.join(dst_root, batch.STATE_FILENAME), encoding="utf-8") as f:
    return json.load(f)["modules"]


def _by_dest(report: dict) -> dict:
  return {os.path.relpath(m["destination"], report["dst_root"]): m
          for m in report["modules"]}


# -- discovery, manifest, archives (no TensorFlow) -------------------------------

def test_discover_mirrors_the_tree_and_names_archives(tmp_path):
  src, dst = tmp_path / "src", tmp_path / "dst"
  _copy_module("refvars_bn", str(src / "a" / "refvars"))
  _make_archive("classifier_probabilities", str(src / "b" / "clf.tar.gz"))
  _copy_module("refvars_bn", str(src / ".hidden" / "skipped"))
  (src / "not_a_module").mkdir()
  (src / "not_a_module" / "README").write_text("x")
  found = batch.discover(str(src), str(dst))
  assert [(os.path.relpath(s.destination, dst), s.kind) for s in found] == [
      ("a/refvars", "directory"), ("b/clf", "archive")]
  assert found[0].location == str(src / "a" / "refvars")
  # DST_ROOT inside SRC_ROOT is not scanned (its hub cache holds TF1 modules).
  _copy_module("refvars_bn", str(src / "out" / "inner"))
  assert [os.path.relpath(s.location, src)
          for s in batch.discover(str(src), str(src / "out"))] == [
              "a/refvars", "b/clf.tar.gz"]
  with pytest.raises(errors.InputNotFoundError):
    batch.discover(str(tmp_path / "missing"), str(dst))


def test_manifest_resolves_paths_and_refuses_escapes(tmp_path):
  src, dst = tmp_path / "src", tmp_path / "dst"
  manifest = tmp_path / "m.csv"
  manifest.write_text(
      "source,destination,signature,output_key\n"
      "mods/a,out/a,image_classification,image_classifier\n"
      "/abs/b.tar.gz,,,\n"
      "https://example.org/models/google/x/1,,,\n")
  found = batch.read_manifest(str(manifest), str(src), str(dst))
  assert [s.location for s in found] == [
      str(src / "mods" / "a"), "/abs/b.tar.gz",
      "https://example.org/models/google/x/1"]
  assert [s.destination for s in found] == [
      str(dst / "out" / "a"), str(dst / "b"), str(dst / "x_1")]
  assert [s.kind for s in found] == ["directory", "directory", "url"]
  assert (found[0].signature, found[0].output_key) == (
      "image_classification", "image_classifier")
  for text, words in [
      ("source,destination\nm,../escape\n", "inside"),
      ("source,destination\nm1,same\nm2,same\n", "also on line 2"),
      ("src,dst\nm,x\n", "expected columns"),
      ("source,destination\n", "found none")]:
    manifest.write_text(text)
    with pytest.raises(batch.ManifestError, match=words) as info:
      batch.read_manifest(str(manifest), str(src), str(dst))
    assert info.value.exit_code == errors.ExitCode.USAGE


def _tar_with(path: str, members) -> str:
  with tarfile.open(path, "w:gz") as tar:
    for info, data in members:
      tar.addfile(info, io.BytesIO(data) if data is not None else None)
  return path


def _file(name: str, data: bytes = b"x"):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  return info, data


def test_archive_extraction_is_safe(tmp_path):
  good = _make_archive("refvars_bn", str(tmp_path / "good.tar.gz"))
  module = batch_sources.extract_archive(good, str(tmp_path / "x1"))
  assert sorted(os.listdir(module)) == sorted(os.listdir(module_path("refvars_bn")))
  link = tarfile.TarInfo("tfhub_module.pb")
  link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
  cases = {
      "traversal": ([_file("../evil")], "outside the archive root"),
      "absolute": ([_file("/tmp/evil")], "outside the archive root"),
      "symlink": ([(link, None)], "not a file or directory"),
      "too_big": ([_file("a", b"x" * 2000)], "more than 1000 bytes"),
  }
  for name, (members, words) in cases.items():
    archive = _tar_with(str(tmp_path / f"{name}.tar.gz"), members)
    with pytest.raises(errors.CorruptModuleError, match=words):
      batch_sources.extract_archive(archive, str(tmp_path / f"out_{name}"), max_bytes=1000)
    assert not os.path.exists(tmp_path / "evil")
  garbage = tmp_path / "garbage.tar.gz"
  garbage.write_bytes(b"\x1f\x8b not really gzip")
  with pytest.raises(errors.CorruptModuleError, match="gzipped tar archive"):
    batch_sources.extract_archive(str(garbage), str(tmp_path / "out_garbage"))


# -- real batches ----------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
  """The whole corpus (one module as an archive) + a truncated copy, a
  truncated archive and the text module, through the CLI, with every report
  format. Shared by the tests below: the conversions run once."""
  tmp_path = tmp_path_factory.mktemp("corpus")
  src, dst = tmp_path / "src", tmp_path / "dst"
  good = convertible_fixture_names()
  archived = good[1]
  for name in good:
    if name == archived:
      _make_archive(name, str(src / "corpus" / f"{name}.tar.gz"))
    else:
      _copy_module(name, str(src / "corpus" / name))
  _copy_module("text_module", str(src / "corpus" / "text_module"))
  _truncated_copy("refvars_bn", str(src / "broken" / "refvars_truncated"))
  cut = _make_archive("classifier_probabilities", str(src / "broken" / "cut.tar.gz"))
  os.truncate(cut, os.path.getsize(cut) * 2 // 3)
  reports = {ext: tmp_path / f"r.{ext}" for ext in ("json", "csv", "html")}
  proc = _cli("batch", str(src), str(dst), "--jobs=2",
              "--report=" + ",".join(str(p) for p in reports.values()))
  return dict(src=src, dst=dst, good=good, archived=archived, proc=proc,
              reports=reports, report=json.loads(reports["json"].read_text()))


def test_corpus_batch_converts_verifies_reports_and_reruns_without_work(corpus_run):
  """Every module converted and verified or failed with its cause; the end of
  the run summarised in a screen; a rerun does no work."""
  src, dst, good, proc = (corpus_run[k] for k in ("src", "dst", "good", "proc"))
  report_json, report_csv = corpus_run["reports"]["json"], corpus_run["reports"]["csv"]
  assert proc.returncode == errors.ExitCode.BATCH_FAILURES, proc.stderr
  report = corpus_run["report"]
  modules = _by_dest(report)
  assert report["counts"] == {"total": len(good) + 3, "converted": len(good),
                              "skipped (up to date)": 0, "failed": 3}
  for name in good:
    m = modules[f"corpus/{name}"]
    assert m["status"] == "converted", m
    assert m["family"] == FIXTURE_FAMILIES[name], m
    assert m["parity_passed"] is True and m["parity_checks"] >= 10, m
    assert m["parity_failures"] == 0 and "parity passed" in m["parity_summary"]
    assert m["stage_seconds"]["verify"] > 0 and m["seconds"] > 0
    _assert_complete_model(str(dst / "corpus" / name))
  assert modules[f"corpus/{corpus_run['archived']}"]["kind"] == "archive"
  text = modules["corpus/text_module"]
  assert (text["status"], text["exit_code"]) == ("failed", errors.ExitCode.UNSUPPORTED)
  assert "text module" in text["error"] and text["family"] == "embeddings"
  broken = modules["broken/refvars_truncated"]
  assert (broken["status"], broken["exit_code"]) == ("failed", errors.ExitCode.CORRUPT)
  assert "saved_model.pb" in broken["error"] and "\n" not in broken["error"]
  assert broken["family"] == "refnet", "its variables are intact"
  cut = modules["broken/cut"]
  assert (cut["status"], cut["exit_code"]) == ("failed", errors.ExitCode.CORRUPT)
  assert "gzipped tar archive" in cut["error"] and cut["family"] == "unknown"
  assert not os.path.exists(dst / "corpus" / "text_module")
  assert not os.path.exists(dst / "broken"), "no output (or empty dir) for a failure"

  # The end of the run: counts by family, failures by cause with one example
  # each, the slowest five, the counts; no line per converted module.
  lines = proc.stdout.splitlines()
  families: dict = {}
  for m in report["modules"]:
    row = families.setdefault(m["family"], [0, 0, 0, 0])
    row[0] += 1
    row[{"converted": 1, "failed": 3}[m["status"]]] += 1
  table_end = lines.index("failures by cause (3 modules, 3 causes):")
  assert lines[0].split() == ["family", "modules", "converted", "up", "to", "date", "failed"]
  assert {l.split()[0]: [int(v) for v in l.split()[1:]]
          for l in lines[1:table_end]} == families, proc.stdout
  failures = lines[table_end + 1:table_end + 7]
  for code, words, example in ((5, "found a text module", text),
                               (6, "expected a SavedModel protocol buffer", broken),
                               (6, "expected a gzipped tar archive", cut)):
    cause = next(i for i, l in enumerate(failures) if words in l)
    assert failures[cause].split()[:3] == ["1", "exit", str(code)], failures
    assert failures[cause + 1].split() == ["e.g.", example["source"]]
  slowest = sorted(report["modules"], key=lambda m: -m["seconds"])[:5]
  assert lines[table_end + 7] == "slowest:"
  assert [l.split()[1] for l in lines[table_end + 8:-1]] == [
      os.path.relpath(m["destination"], dst) for m in slowest]
  assert lines[-1].startswith(f"{len(good) + 3} modules: {len(good)} converted and "
                              f"verified, 0 up to date, 3 failed, in "), lines[-1]
  assert "FAILED" in proc.stderr and "text module" in proc.stderr
  with open(report_csv, newline="", encoding="utf-8") as f:
    rows = {os.path.relpath(r["destination"], dst): r for r in csv.DictReader(f)}
  assert rows["broken/refvars_truncated"]["exit_code"] == "6"
  assert int(rows[f"corpus/{good[0]}"]["parity_checks"]) >= 10
  assert {k: r["family"] for k, r in rows.items()} == {
      k: m["family"] for k, m in modules.items()}
  _load_and_call([str(dst / "corpus" / good[0]), str(dst / "corpus" / good[-1])])
  assert _leftovers(str(dst)) == []
  assert sorted(os.listdir(dst)) == [batch.STATE_FILENAME, "corpus"]
  assert sorted(os.listdir(dst / "corpus")) == sorted(good)
  state_before = _state(str(dst))

  # Rerun: the converted ones are up to date (no worker, no rewrite), the
  # failed ones are retried and fail the same way.
  mtimes = {n: os.stat(dst / "corpus" / n / "saved_model.pb").st_mtime_ns for n in good}
  proc = _cli("batch", str(src), str(dst), "--jobs=2", f"--report={report_json}")
  assert proc.returncode == errors.ExitCode.BATCH_FAILURES, proc.stderr
  report = json.loads(report_json.read_text())
  modules = _by_dest(report)
  assert report["counts"]["skipped (up to date)"] == len(good)
  assert report["counts"]["converted"] == 0 and report["counts"]["failed"] == 3
  for name in good:
    m = modules[f"corpus/{name}"]
    assert m["status"] == "skipped (up to date)" and m["seconds"] == 0
    assert m["parity_checks"] >= 10, "the skip reports the recorded parity"
    assert m["family"] == FIXTURE_FAMILIES[name], "the skip reports the recorded family"
    assert os.stat(dst / "corpus" / name / "saved_model.pb").st_mtime_ns == mtimes[name]
  state_after = _state(str(dst))
  for name in good:
    assert state_after[f"corpus/{name}"] == state_before[f"corpus/{name}"]
  assert state_after["corpus/text_module"]["finished_at"] >= state_before[
      "corpus/text_module"]["finished_at"]


class _Tables(html.parser.HTMLParser):
  """The tables of a page: id -> (header cells with their class, rows of cell texts)."""

  def __init__(self):
    super().__init__()
    self.tables: dict = {}
    self._table = self._row = self._cell = None

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "table":
      self._table = self.tables.setdefault(attrs.get("id"), ([], []))
    elif tag == "tr" and self._table is not None:
      self._row = []
    elif tag in ("td", "th") and self._row is not None:
      self._cell = [tag, attrs.get("class") or "", ""]

  def handle_data(self, data):
    if self._cell is not None:
      self._cell[2] += data

  def handle_endtag(self, tag):
    if tag in ("td", "th") and self._cell is not None:
      self._row.append(self._cell)
      self._cell = None
    elif tag == "tr" and self._row is not None:
      if self._row and self._row[0][0] == "th":
        self._table[0].extend((c[2], c[1]) for c in self._row)
      else:
        self._table[1].append([c[2] for c in self._row])
      self._row = None
    elif tag == "table":
      self._table = None


CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)


@pytest.mark.skipif(CHROMIUM is None, reason=(
    "Debian's chromium is not installed (apt-get install --no-install-recommends "
    "chromium; .ci/run does): the HTML report is not opened in a browser"))
def test_the_html_report_opens_in_a_headless_browser(corpus_run, tmp_path):
  """The page, as Chromium has it after its script ran: every table there,
  every module a row with its family and parity; `#sort=-seconds` in the
  link puts the slowest first."""
  report = corpus_run["report"]
  url = corpus_run["reports"]["html"].as_uri() + "#sort=-seconds"
  home = tmp_path / "home"
  home.mkdir()
  proc = subprocess.Popen(
      [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
       "--disable-background-networking", "--disable-component-update",
       "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url],
      env=dict(os.environ, HOME=str(home)), stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL, text=True, start_new_session=True)
  try:
    dom, _ = proc.communicate(timeout=120)
  finally:
    try:
      os.killpg(proc.pid, signal.SIGKILL)  # Its helpers, if any outlived it.
    except ProcessLookupError:
      pass
    proc.wait()
  assert proc.returncode == 0 and "</html>" in dom, dom[-2000:]
  parser = _Tables()
  parser.feed(dom)
  tables = parser.tables
  assert {"families", "failures", "slowest", "modules"} <= set(tables), list(tables)
  header, rows = tables["modules"]
  names = [h for h, _ in header]
  assert names == ["module", "family", "status", "exit", "seconds", "parity", "error"]
  assert dict(header)["seconds"] == "desc", "the page's script sorted the table"
  assert len(rows) == len(report["modules"])
  by_module = {os.path.relpath(m["destination"], report["dst_root"]): m
               for m in report["modules"]}
  for row in rows:
    m = by_module[row[0]]
    assert row[1:4] == [m["family"], m["status"], str(m["exit_code"])], row
    assert row[5] == (m["parity_summary"] or "") and row[6] == (m["error"] or "")
  seconds = [float(r[4]) for r in rows]
  assert seconds == sorted(seconds, reverse=True)
  slowest = max(report["modules"], key=lambda m: m["seconds"])
  assert rows[0][0] == os.path.relpath(slowest["destination"], report["dst_root"])
  # The summary tables: one row per family, per cause, and the slowest five.
  assert sorted(r[0] for r in tables["families"][1]) == sorted(
      {m["family"] for m in report["modules"]})
  assert sorted(r[0] for r in tables["failures"][1]) == ["1", "1", "1"]
  assert [r[0] for r in tables["slowest"][1]] == [r[0] for r in rows[:5]]


def test_sigkill_mid_batch_leaves_no_partial_output_and_rerun_completes(tmp_path):
  src, dst = tmp_path / "src", tmp_path / "dst"
  for name in SMALL:
    _copy_module(name, str(src / name))
  _make_archive("refvars_bn", str(src / "archives" / "refvars.tar.gz"))
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.Popen(
      [sys.executable, "-m", "migrate.cli", "batch", str(src), str(dst), "--jobs=2"],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  workers: set[int] = set()
  state = dst / batch.STATE_FILENAME
  deadline = time.monotonic() + 600
  try:
    # Kill it after the first module is recorded, while others are running,
    # preferably while one is staging its output beside its DST.
    recorded_at = None
    while time.monotonic() < deadline and proc.poll() is None:
      workers |= set(proctree.children(proc.pid))
      if state.exists() and proctree.children(proc.pid):
        recorded_at = recorded_at or time.monotonic()
        staging = [p for p in _leftovers(str(dst)) if ".migrate-tmp-" in p]
        if staging or time.monotonic() - recorded_at > 5:
          break
      time.sleep(0.05)
    assert proc.poll() is None, "the batch finished before it could be killed"
    workers |= set(proctree.children(proc.pid))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert workers, "the batch ran its modules in worker processes"
  deadline = time.monotonic() + 30
  while any(proctree.alive(w) for w in workers) and time.monotonic() < deadline:
    time.sleep(0.2)
  assert not any(proctree.alive(w) for w in workers), "workers die with the batch"
  recorded = _state(str(dst))
  assert 1 <= len(recorded) < 4
  present = [p for p in (dst / n for n in SMALL + ("archives/refvars",)) if p.exists()]
  for path in present:  # Nothing half-written: what exists is complete.
    _assert_complete_model(str(path))
  _load_and_call([str(p) for p in present])

  proc2 = _cli("batch", str(src), str(dst), "--jobs=2", f"--report={tmp_path / 'r.json'}")
  assert proc2.returncode == 0, proc2.stdout + proc2.stderr
  report = json.loads((tmp_path / "r.json").read_text())
  statuses = {os.path.relpath(m["destination"], dst): m["status"]
              for m in report["modules"]}
  assert set(statuses) == {"classifier_probabilities", "inference_only_asset",
                           "refvars_bn", "archives/refvars"}
  for rel, status in statuses.items():
    assert status == ("skipped (up to date)" if rel in recorded else "converted"), rel
  for rel in statuses:
    _assert_complete_model(str(dst / rel))
  assert _leftovers(str(dst)) == []


def test_sigterm_mid_batch_says_so_and_a_rerun_converts_each_module_once(tmp_path):
  """SIGTERM after a module is recorded, while another is being staged: exit
  143, one line, the workers gone and their staging directories removed at
  once (not by the next run). The rerun converts what the first run did not,
  and nothing else: every module is converted in exactly one of the runs."""
  src, dst = tmp_path / "src", tmp_path / "dst"
  names = ("classifier_probabilities", "inference_only_asset", "refvars_bn")
  for name in names:
    _copy_module(name, str(src / name))
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.Popen(
      [sys.executable, "-m", "migrate.cli", "batch", str(src), str(dst), "--jobs=2"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  workers: set[int] = set()
  state = dst / batch.STATE_FILENAME
  deadline = time.monotonic() + 600
  while time.monotonic() < deadline and proc.poll() is None:
    workers |= set(proctree.children(proc.pid))
    if state.exists() and any(".migrate-tmp-" in p for p in _leftovers(str(dst))):
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the batch finished before it staged a second module"
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == errors.ExitCode.TERMINATED, err
  last = err.splitlines()[-1]
  assert "terminated (SIGTERM)" in last and "rerun to complete" in last, err
  assert "Traceback" not in err
  deadline = time.monotonic() + 30
  while any(proctree.alive(w) for w in workers) and time.monotonic() < deadline:
    time.sleep(0.2)
  assert not any(proctree.alive(w) for w in workers), "workers die with the batch"
  assert _leftovers(str(dst)) == []
  # What the first run converted is recorded; what it did not left nothing.
  first = _state(str(dst))
  assert 1 <= len(first) < len(names), first
  assert all(r["status"] == "converted" for r in first.values()), first
  for name in names:
    assert (dst / name).exists() == (name in first), name
  mtimes = {n: os.stat(dst / n / "saved_model.pb").st_mtime_ns for n in first}

  proc = _cli("batch", str(src), str(dst), "--jobs=2", f"--report={tmp_path / 'r.json'}")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  report = _by_dest(json.loads((tmp_path / "r.json").read_text()))
  converted_again = [n for n in first if report[n]["status"] != "skipped (up to date)"]
  assert converted_again == [], "converted twice"
  assert sorted(n for n in names if report[n]["status"] == "converted") == sorted(
      set(names) - set(first))
  second = _state(str(dst))
  for name in first:
    assert second[name] == first[name]
    assert os.stat(dst / name / "saved_model.pb").st_mtime_ns == mtimes[name]
  for name in names:
    _assert_complete_model(str(dst / name))
  assert _leftovers(str(dst)) == []


def test_a_module_converted_as_the_batch_is_interrupted_is_recorded(tmp_path):
  """The interruption (Ctrl-C, SIGTERM) cancels the batch while a worker is
  finishing: its module, converted, is recorded, so the next run skips it."""
  src, dst = tmp_path / "src", tmp_path / "dst"
  _copy_module("classifier_probabilities", str(src / "m"))
  sources = batch.discover(str(src), str(dst))
  runner = batch.BatchRunner(str(dst), batch.ConvertOptions(verify=False), jobs=1)
  runner.on_progress = lambda p: p.event == "started" and runner.cancelled.set()
  report = runner.run(sources, batch.LocalExecutor(None))
  assert runner.cancelled.is_set()
  assert [m.status for m in report.modules] == ["converted"], report.format_table()
  assert _state(str(dst))["m"]["status"] == "converted"
  again = batch.run_batch(sources, str(dst), verify=False, jobs=1)
  assert [m.status for m in again.modules] == [batch.STATUS_SKIPPED]


def test_planning_refuses_special_files_and_links_without_blocking(tmp_path):
  """FIFOs, devices and links out of SRC_ROOT are refused while planning,
  before any worker: nothing opens them, so nothing blocks. Names that are not
  UTF-8 or hold control characters reach the reports escaped."""
  src, dst = tmp_path / "src", tmp_path / "dst"
  outside = _copy_module("inference_only_asset", str(tmp_path / "outside"))
  fifo_module = _copy_module("inference_only_asset", str(src / "fifo\nmodule\x1b[2J"))
  os.mkfifo(os.path.join(fifo_module, "variables", "variables.data-00001-of-00002"))
  os.mkfifo(str(src / "stall.tar.gz"))
  os.symlink("/dev/zero", str(src / "zeros.tar.gz"))
  os.symlink(outside, str(src / "linked"))
  shutil.copytree(os.fsencode(module_path("inference_only_asset")),
                  os.fsencode(str(src)) + b"/caf\xe9")
  sources = batch.discover(str(src), str(dst))
  assert len(sources) == 5
  start = time.monotonic()
  report = batch.run_batch(sources, str(dst), jobs=2)
  assert time.monotonic() - start < 60
  by_name = {os.path.basename(m.source): m for m in report.modules}
  assert all(m.status == "failed" and not m.seconds for m in report.modules)
  assert "found a FIFO" in by_name["stall.tar.gz"].error
  assert "a symlink to /dev/zero" in by_name["zeros.tar.gz"].error
  assert f"a symlink to {outside}, outside it" in by_name["linked"].error
  assert "found a FIFO" in by_name["fifo\nmodule\x1b[2J"].error
  assert by_name[os.fsdecode(b"caf\xe9")].exit_code == errors.ExitCode.NOT_FOUND
  assert {m.exit_code for m in report.modules} <= {3, 6}
  report.write(str(tmp_path / "r.csv"))
  report.write(str(tmp_path / "r.json"))
  text = (tmp_path / "r.csv").read_text(encoding="utf-8")
  assert "caf\\xe9" in text and "fifo\\nmodule\\x1b[2J" in text
  rows = list(csv.DictReader(io.StringIO(text)))
  assert len(rows) == 5
  data = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
  assert any("caf\\xe9" in m["source"] for m in data["modules"])
  table = report.format_table()
  assert len(table.splitlines()) == 7 and "\x1b" not in table


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):  # pylint: disable=arguments-differ
    pass


def test_manifest_with_url_archive_and_per_row_options(tmp_path):
  """URLs go through hub.resolve (cache under DST_ROOT), archives are extracted."""
  served = tmp_path / "served"
  _make_archive("inference_only_asset", str(served / "iao.tar.gz"))
  _make_archive("refvars_bn", str(tmp_path / "src" / "refvars.tar.gz"))
  server = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  base = f"http://127.0.0.1:{server.server_address[1]}"
  manifest = tmp_path / "m.csv"
  manifest.write_text(
      "source,destination,signature,output_key\n"
      f"{base}/iao.tar.gz,web/iao,,\n"
      f"{base}/missing.tar.gz,web/missing,,\n"
      # Its default signature would be image_feature_vector.
      "refvars.tar.gz,refvars_classes,image_classification,\n")
  dst = tmp_path / "dst"
  progress = []
  try:
    sources = batch.read_manifest(str(manifest), str(tmp_path / "src"), str(dst))
    report = batch.run_batch(sources, str(dst), jobs=2, on_progress=progress.append)
  finally:
    server.shutdown()
    server.server_close()
  outcomes = {os.path.relpath(m.destination, dst): m for m in report.modules}
  web = outcomes["web/iao"]
  assert (web.status, web.kind, web.parity_passed) == ("converted", "url", True), web
  assert web.source_sha256
  missing = outcomes["web/missing"]
  assert (missing.status, missing.exit_code) == ("failed", errors.ExitCode.NOT_FOUND)
  assert "404" in missing.error and missing.error.startswith(base), missing.error
  classes = outcomes["refvars_classes"]
  assert (classes.status, classes.signature, classes.output_key) == (
      "converted", "image_classification", "default"), classes
  assert report.exit_code == errors.ExitCode.BATCH_FAILURES
  cache = dst / batch.WORK_DIRNAME / "tfhub_cache"
  assert cache.is_dir() and os.listdir(cache), "downloads are cached under DST_ROOT"
  card = (dst / "web" / "iao" / "MODEL_CARD.md").read_text()
  assert f"`{base}/iao.tar.gz`" in card, "the card names the URL, not a temp dir"
  card = (dst / "refvars_classes" / "MODEL_CARD.md").read_text()
  assert f"`{tmp_path / 'src' / 'refvars.tar.gz'}`" in card
  events = [p.event for p in progress]
  assert events[0] == "planned" and events.count("finished") == 3
  final = [p for p in progress if p.event == "finished"][-1]
  assert (final.done, final.total, final.converted, final.failed) == (3, 3, 2, 1)
  assert _leftovers(str(dst)) == []
  _load_and_call([str(dst / "refvars_classes")])

  # The server is gone: the URL module is still up to date (from the cache).
  report = batch.run_batch(sources[:1], str(dst), jobs=1)
  assert report.modules[0].status == batch.STATUS_SKIPPED, report.modules[0]
  assert report.exit_code == 0


def test_a_killed_worker_or_a_timeout_costs_only_that_module(tmp_path):
  """A worker killed (as by the OOM killer) and a hang -> exit 11/12, others go on."""
  src, dst = tmp_path / "src", tmp_path / "dst"
  for name in ("classifier_probabilities", "refvars_bn"):
    _copy_module(name, str(src / name))
  sources = batch.discover(str(src), str(dst))
  killed = []
  done = threading.Event()

  def killer():
    while not done.is_set():
      import multiprocessing  # pylint: disable=g-import-not-at-top
      children = multiprocessing.active_children()
      if children and not killed:
        time.sleep(1.0)
        children[0].kill()
        killed.append(children[0].pid)
        return
      time.sleep(0.05)

  thread = threading.Thread(target=killer, daemon=True)
  thread.start()
  try:
    report = batch.run_batch(sources, str(dst), jobs=1)
  finally:
    done.set()
    thread.join()
  assert killed
  statuses = sorted((m.status, m.exit_code) for m in report.modules)
  assert statuses == [("converted", 0), ("failed", errors.ExitCode.CRASHED)], report.format_table()
  crashed = report.failures[0]
  assert "SIGKILL" in crashed.error and not os.path.exists(crashed.destination)
  assert report.exit_code == errors.ExitCode.BATCH_FAILURES

  # A hang: the per-module timeout stops the worker; the rerun retries it.
  shutil.rmtree(dst)
  report = batch.run_batch(sources[:1], str(dst), jobs=1, timeout=1)
  m = report.modules[0]
  assert (m.status, m.exit_code) == ("failed", errors.ExitCode.TIMEOUT), m
  assert not os.path.exists(m.destination) and _leftovers(str(dst)) == []
  assert _state(str(dst))[os.path.basename(m.destination)]["status"] == "failed"


def test_changed_source_is_reconverted_in_place(tmp_path):
  """A source whose content changed since it was converted is converted again."""
  src, dst = tmp_path / "src", tmp_path / "dst"
  _copy_module("inference_only_asset", str(src / "m"))
  sources = batch.discover(str(src), str(dst))
  first = batch.run_batch(sources, str(dst), jobs=1).modules[0]
  assert first.status == "converted"
  with open(src / "m" / "extra_notes.txt", "w", encoding="utf-8") as f:
    f.write("changed\n")
  second = batch.run_batch(sources, str(dst), jobs=1).modules[0]
  assert second.status == "converted" and second.source_sha256 != first.source_sha256
  third = batch.run_batch(sources, str(dst), jobs=1).modules[0]
  assert third.status == batch.STATUS_SKIPPED
  # Other options: not up to date either (an unknown signature fails; the
  # converted model stays).
  other = batch.run_batch(sources, str(dst), jobs=1,
                          options=batch.ConvertOptions(signature="no_such_signature"))
  assert other.modules[0].status == "failed"
  assert other.modules[0].exit_code == errors.ExitCode.UNSUPPORTED
  _assert_complete_model(str(dst / "m"))


def test_dst_root_inside_a_module_is_refused_and_the_module_untouched(tmp_path):
  """`batch ROOT ROOT/m1` (directly, or through a symlink to m1) would put the
  state file and the other modules' outputs into module m1."""
  root = tmp_path / "root"
  for name in ("m1", "m2"):
    bi.copy_fixture(SMALL[0], str(root / name))
  digest = bi.tree_digest(str(root / "m1"))
  os.symlink(root / "m1", tmp_path / "link")
  for dst_root in (root / "m1", tmp_path / "link", root / "m1" / "out"):
    sources = batch.discover(str(root), str(dst_root))
    with pytest.raises(errors.OutputError, match="inside the module"):
      batch.run_batch(sources, str(dst_root), batch.ConvertOptions(verify=False))
  assert bi.tree_digest(str(root / "m1")) == digest


def test_a_second_batch_on_the_same_dst_is_refused(tmp_path):
  dst = tmp_path / "dst"
  os.makedirs(dst)
  lock = batch_state.RunLock(str(dst))
  try:
    with pytest.raises(errors.OutputError, match="found one running"):
      batch.run_batch([], str(dst))
  finally:
    lock.release()
  assert batch.run_batch([], str(dst)).exit_code == 0
  assert os.listdir(dst) == [], "an empty batch leaves nothing behind"


def test_beam_direct_runner_converts_two_fixtures(tmp_path):
  """The same batch as a Beam pipeline (DirectRunner, 2 workers), same state."""
  pytest.importorskip(
      "apache_beam", reason="apache_beam is not installed: it is the optional "
      "extra [beam] (apache-beam 2.77 needs protobuf<7, which downgrades this "
      "venv's protobuf 7.x); see README 'Scaling out with Apache Beam'")
  from migrate import beam_pipeline  # pylint: disable=g-import-not-at-top
  src, dst = tmp_path / "src", tmp_path / "dst"
  _copy_module("classifier_probabilities", str(src / "clf"))
  _make_archive("refvars_bn", str(src / "archives" / "refvars.tar.gz"))
  sources = batch.discover(str(src), str(dst))
  report = beam_pipeline.run_pipeline(
      sources, str(dst), pipeline_args=[
          "--runner=DirectRunner", "--direct_num_workers=2",
          "--direct_running_mode=multi_threading"])
  assert [(os.path.relpath(m.destination, dst), m.status, m.parity_passed)
          for m in report.modules] == [("archives/refvars", "converted", True),
                                       ("clf", "converted", True)], report.format_table()
  assert all(m.parity_checks >= 10 for m in report.modules)
  assert [m.family for m in report.modules] == ["refnet", "classifier"]
  for m in report.modules:
    _assert_complete_model(m.destination)
  assert _leftovers(str(dst)) == []
  assert set(_state(str(dst))) == {"archives/refvars", "clf"}
  # The local batch reads the state the pipeline wrote: nothing to do.
  again = batch.run_batch(sources, str(dst), jobs=2)
  assert [m.status for m in again.modules] == [batch.STATUS_SKIPPED] * 2


def test_memory_gate_starts_only_what_fits(tmp_path):
  """Workers are held back while the estimated peaks of those running exceed the
  budget; one always runs; waiting ones give up when the batch is cancelled."""
  del tmp_path
  need = batch.estimated_peak_bytes(100 << 20, 2 << 20)
  assert need > batch.estimated_peak_bytes(10 << 20, 2 << 20) > batch.PEAK_BASE_BYTES
  # The graph weighs more than the variables; unknown, as if it were UNKNOWN_GRAPH_BYTES.
  assert batch.estimated_peak_bytes(30 << 20, 8 << 20) > need
  assert batch.estimated_peak_bytes(100 << 20) == batch.estimated_peak_bytes(
      100 << 20, batch.UNKNOWN_GRAPH_BYTES)
  assert batch.estimated_peak_bytes(0) == batch.estimated_peak_bytes(batch.UNKNOWN_SIZE_BYTES)
  for budget, most in ((need, 1), (2 * need, 2), (need // 2, 1), (None, 4)):
    gate = batch.MemoryGate(budget)
    never = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
      results = list(pool.map(lambda i: gate.run(need, never, time.sleep, 0.2), range(4)))
    assert results == [None] * 4 and gate.most_running == most, (budget, gate.most_running)
    assert gate.in_use == 0 and gate.running == 0
  gate, cancelled = batch.MemoryGate(need), threading.Event()
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    first = pool.submit(gate.run, need, cancelled, lambda: (time.sleep(1.0), "ran")[1])
    time.sleep(0.1)
    second = pool.submit(gate.run, need, cancelled, lambda: "ran")
    time.sleep(0.1)
    cancelled.set()
    assert second.result(timeout=5) is None and first.result() == "ran"
  assert batch.available_memory_bytes() > 0


def test_memory_estimate_grows_with_every_consumer():
  # --consumers=all converts to TFLite and fits in the worker: a larger peak.
  default = batch.estimated_peak_bytes(30 << 20, 8 << 20)
  assert batch.estimated_peak_bytes(30 << 20, 8 << 20, all_consumers=True) > 1.5 * default
