"""What the end of a batch says, without running a batch: failures grouped
by cause, the terminal summary of a 400-module report (a screen, not a line
per module), the report files by extension (the HTML escaping module text).
Fast: no conversion runs."""

from __future__ import annotations

import json
import os

import pytest

from migrate import batch_report
from migrate import errors


def test_failures_group_by_cause_whatever_the_path_names_and_numbers():
  cause = batch_report.failure_cause
  eof = ("{0}: expected a gzipped tar archive of a TF1 Hub module, found EOFError: "
         "Compressed file ended before the end-of-stream marker was reached")
  assert (cause(eof.format("/a/x/1.tar.gz"), "/a/x/1.tar.gz") ==
          cause(eof.format("/b/y/2.tar.gz"), "/b/y/2.tar.gz"))
  size = "{0}/saved_model.pb: expected at most {1} bytes, found {2}"
  assert (cause(size.format("/a", 10, 12), "/a") == cause(size.format("/b", 10, 13), "/b")
          == "expected at most N bytes, found N")
  quoted = "{0} (tags []) signature '{1}' output 'x': expected a tensor, found '{1}:0'"
  assert cause(quoted.format("/a", "f"), "/a") == cause(quoted.format("/b", "g"), "/b")
  assert cause(eof.format("/a"), "/a") != cause(size.format("/a", 1, 2), "/a")
  assert len(cause("/a: expected " + "word " * 100, "/a").split()) <= batch_report.CAUSE_WORDS + 1


def _outcome(i: int, family: str, failed_cause: int = -1) -> batch_report.ModuleOutcome:
  causes = [(6, "expected a checkpoint at variables/variables.index, found none"),
            (5, "expected an image module, found a text module (string inputs)"),
            (6, "expected a gzipped tar archive of a TF1 Hub module, found EOFError: x"),
            (12, "the work took longer than 600 s and was stopped")]
  source = f"/catalog/publisher{i % 7}/model{i}/1.tar.gz"
  m = batch_report.ModuleOutcome(
      source=source, destination=f"/out/publisher{i % 7}/model{i}/1",
      kind="archive", status=batch_report.STATUS_CONVERTED, family=family,
      seconds=10.0 + (i * 37) % 101, stage_seconds={"read": 0.5, "verify": 4.0},
      parity_summary="parity passed: 25/25 checks")
  if failed_cause >= 0:
    code, text = causes[failed_cause]
    m.status, m.exit_code, m.error = batch_report.STATUS_FAILED, code, f"{source}: {text}"
  return m


def _report(modules) -> batch_report.BatchReport:
  return batch_report.BatchReport(dst_root="/out", jobs=2, started_at="now",
                                  seconds=3600.0, modules=modules, state_path="/out/s")


def test_the_summary_of_400_modules_fits_a_screen():
  families = ["mobilenet_v1"] * 130 + ["mobilenet_v2"] * 94 + ["resnet_v2"] * 60 + [
      "efficientnet"] * 50 + ["inception_v3"] * 30 + ["nasnet"] * 20 + ["unknown"] * 16
  modules = [_outcome(i, f, failed_cause=(i % 4 if i % 25 == 0 else -1))
             for i, f in enumerate(families)]
  report = _report(modules)
  text = report.format_summary()
  lines = text.splitlines()
  assert len(lines) <= 40, text
  assert lines[-1] == report.summary() and "16 failed" in lines[-1]
  assert lines[0].split() == ["family", "modules", "converted", "up", "to", "date", "failed"]
  assert lines[1].split() == ["mobilenet_v1", "130", "124", "0", "6"]
  assert "failures by cause (16 modules, 4 causes):" in lines
  assert sum(line.lstrip().startswith("e.g. /catalog/") for line in lines) == 4
  slowest = sorted(modules, key=lambda m: -m.seconds)[:batch_report.SLOWEST]
  start = lines.index("slowest:")
  for m, line in zip(slowest, lines[start + 1:]):
    assert line.split()[:2] == [f"{m.seconds:.1f}s", m.destination[len("/out/"):]], line
  # Successful modules are counted, not listed (except the slowest).
  listed = [m for m in modules if m.destination[len("/out/"):] + " " in text]
  assert len(listed) <= batch_report.SLOWEST + 4

  summary = batch_report.summarize(report.to_dict())
  assert [(f["count"], f["exit_code"]) for f in summary["failures"]] == [
      (4, 5), (4, 6), (4, 6), (4, 12)]


def test_many_families_and_causes_are_counted_beyond_a_screen():
  modules = [_outcome(i, f"family{i:02d}", failed_cause=-1) for i in range(40)]
  for i, m in enumerate(modules[:20]):
    m.status, m.exit_code, m.error = "failed", 6, f"{m.source}: expected thing{'x' * i}"
  text = _report(modules).format_summary()
  assert len(text.splitlines()) <= 60, text
  assert "... 25 more families (25 modules)" in text
  assert "... 5 more causes (5 modules)" in text


def test_report_files_by_extension_and_html_escapes_module_text(tmp_path):
  modules = [_outcome(i, "mobilenet_v1") for i in range(3)]
  modules[1].status, modules[1].exit_code = "failed", 6
  modules[1].error = "/x: expected <script>alert(1)</script>, found 'a&b'"
  modules[2].family = "<b>bold</b>"
  report = _report(modules)
  for name in ("r.json", "r.csv", "r.html", "R.HTM"):
    report.write(str(tmp_path / name))
  assert json.loads((tmp_path / "r.json").read_text())["modules"][0]["family"] == "mobilenet_v1"
  assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith(
      "source,destination,kind,family,status,")
  page = (tmp_path / "r.html").read_text()
  assert page == (tmp_path / "R.HTM").read_text()
  assert page.startswith("<!DOCTYPE html>") and "<script>alert" not in page
  assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;bold" in page
  assert "http" not in page.split("<script>")[0], "self-contained: no external resource"
  embedded = page.split("<script type=application/json id=summary>")[1].split("</script>")[0]
  assert json.loads(embedded)["failures"][0]["example_error"] == modules[1].error
  with pytest.raises(errors.UsageError, match=r"r\.txt: expected a report file ending in"):
    report.write(str(tmp_path / "r.txt"))
  with pytest.raises(errors.OutputError, match=r"no/r\.json: expected a writable report"):
    report.write(str(tmp_path / "no" / "r.json"))
  assert sorted(os.listdir(tmp_path)) == ["R.HTM", "r.csv", "r.html", "r.json"]
