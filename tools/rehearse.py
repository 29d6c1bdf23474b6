#!/usr/bin/env python3
"""A rehearsal of the catalog migration: how `batch` grows with the number of modules.

    .legacy-venv/bin/python tools/make_catalog.py /tmp/catalog          # 402 modules, ~1 h
    PYTHONPATH=. .venv/bin/python tools/rehearse.py /tmp/catalog /tmp/rehearsal \\
        --sizes=50,200,402 --jobs=2 [--beam_python=.venv-beam/bin/python] --json=r.json

For each size N it makes `WORK/src<N>`, the first N archives of the catalog in a
fixed shuffled order (hard links, nested: 50 of them are among the 200), and
converts the largest into `WORK/dst` with the CLI as a user runs it
(`migrate-hub-module batch SRC DST --jobs=2 --report=...`), polling the process
tree's summed RSS and the state file's size. Then, per size, the same command
again over `src<N>` into the same DST: everything is up to date, so its time
is what discovery, resume (hashing, the state) and the final report cost,
which are also timed one by one in this process (`discover`, `run_batch` with
nothing to do, each report file written). Modules per minute at 50, 200, ...
come from the conversion run's own timeline (the `finished_at` of each module).

`--interrupt` also runs the smallest size into a DST of its own, sends SIGINT
when a third of it is recorded, reruns, and checks from the two reports that
no module was converted twice and every good one once. `--beam_python` runs
the smallest and largest sizes through the Beam DirectRunner (2 workers) in
that interpreter's environment (the [beam] extra). Every outcome is checked
against the catalog's `catalog.json` (bad modules and the exit code each must
get); a mismatch is listed under "unexpected".
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import memory  # noqa: E402  (tools/memory.py: the process-tree poller)

from migrate import batch  # noqa: E402
from migrate import batch_report  # noqa: E402
from migrate import batch_sources  # noqa: E402
from migrate import batch_state  # noqa: E402

CLI = [sys.executable, "-m", "migrate.cli"]
REPORT_EXTENSIONS = ("json", "csv", "html")


def _order(entries: list[dict]) -> list[dict]:
  """The catalog in a fixed shuffled order (families spread over every prefix)."""
  return sorted(entries, key=lambda e: hashlib.sha256(e["archive"].encode()).hexdigest())


def make_trees(catalog: str, work: str, sizes: list[int]) -> dict[int, str]:
  with open(os.path.join(catalog, "catalog.json"), encoding="utf-8") as f:
    entries = _order(json.load(f)["modules"])
  trees = {}
  for n in sizes:
    root = os.path.join(work, f"src{n}")
    shutil.rmtree(root, ignore_errors=True)
    for e in entries[:n]:
      target = os.path.join(root, e["archive"])
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.link(os.path.join(catalog, e["archive"]), target)
    trees[n] = root
  return trees


def _reports(prefix: str) -> list[str]:
  return [f"{prefix}.{ext}" for ext in REPORT_EXTENSIONS]


def run_cli(argv: list[str], state: str, interval: float = 0.5,
            interrupt_after: int | None = None, python: str | None = None) -> dict:
  """Runs the CLI, polling the tree's RSS and the state file; optionally
  sends SIGINT once `interrupt_after` modules are recorded."""
  env = dict(os.environ, PYTHONPATH=REPO)
  cmd = ([python, "-m", "migrate.cli"] if python else CLI) + argv
  start = time.monotonic()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                          cwd=REPO, start_new_session=True)
  peak_kb, samples, interrupted = 0, [], False
  while proc.poll() is None:
    total = sum(memory.status_kb(pid).get("VmRSS", 0) for pid in memory.tree(proc.pid))
    peak_kb = max(peak_kb, total)
    size = os.path.getsize(state) if os.path.exists(state) else 0
    samples.append((round(time.monotonic() - start, 1), size, total // 1024))
    if interrupt_after is not None and not interrupted and size:
      try:
        with open(state, encoding="utf-8") as f:
          recorded = len(json.load(f).get("modules", {}))
      except (OSError, ValueError):
        recorded = 0
      if recorded >= interrupt_after:
        proc.send_signal(signal.SIGINT)
        interrupted = True
    time.sleep(interval)
  stdout, stderr = proc.communicate()
  return {"argv": argv, "returncode": proc.returncode,
          "seconds": round(time.monotonic() - start, 2),
          "peak_tree_rss_mb": round(peak_kb / 1024), "interrupted": interrupted,
          "state_bytes": os.path.getsize(state) if os.path.exists(state) else 0,
          "samples": samples[:: max(1, len(samples) // 200)],
          "stdout_tail": stdout.decode(errors="replace")[-3000:],
          "stderr_tail": stderr.decode(errors="replace")[-1500:]}


def timeline(report: dict, marks: list[int]) -> dict[int, float]:
  """Modules per minute over the first N modules the run finished, by their
  `finished_at` (from the run's start)."""
  start = datetime.datetime.fromisoformat(report["started_at"])
  done = sorted(datetime.datetime.fromisoformat(m["finished_at"])
                for m in report["modules"] if m["status"] != "skipped")
  rates = {}
  for n in marks:
    if len(done) >= n:
      rates[n] = round(n / ((done[n - 1] - start).total_seconds() / 60), 1)
  return rates


def check_outcomes(catalog: str, report: dict, src_root: str) -> list[str]:
  """Every module as catalog.json says it must end: good ones converted (or
  up to date), bad ones failed with their exit code, each reported once."""
  with open(os.path.join(catalog, "catalog.json"), encoding="utf-8") as f:
    expected = {e["archive"]: e["expect_exit_code"] for e in json.load(f)["modules"]}
  seen: dict[str, int] = {}
  problems = []
  for m in report["modules"]:
    rel = os.path.relpath(m["source"], src_root)
    seen[rel] = seen.get(rel, 0) + 1
    want = expected.get(rel)
    got = m["exit_code"] if m["status"] == "failed" else 0
    if want is None:
      problems.append(f"{rel}: not in the catalog")
    elif got != want:
      problems.append(f"{rel}: exit {got}, expected {want}: {m.get('error', '')[:200]}")
  problems += [f"{rel}: reported {n} times" for rel, n in seen.items() if n != 1]
  return problems


def _state_converted(state: str) -> set[str]:
  """The destinations a batch's state file records as converted."""
  with open(state, encoding="utf-8") as f:
    records = json.load(f).get("modules", {})
  return {r.get("destination", key) for key, r in records.items()
          if r.get("status") == "converted"}


def write_manifest(tree: str, work: str, n: int) -> str:
  """A manifest of the archives in `tree` (relative paths: they resolve under
  the largest tree, where the same archives are)."""
  path = os.path.join(work, f"manifest{n}.csv")
  with open(path, "w", encoding="utf-8") as f:
    f.write("source,destination\n")
    for root, _, files in sorted(os.walk(tree)):
      for name in sorted(files):
        rel = os.path.relpath(os.path.join(root, name), tree)
        f.write(f"{rel},{rel[:-len('.tar.gz')]}\n")
  return path


def resume_breakdown(tree: str, src_root: str, dst: str, manifest: str | None,
                     jobs: int, out_prefix: str) -> dict:
  """Discovery (a scan of `tree`), the resume (hash + state, nothing to
  convert) and each report file, timed in this process."""
  t = time.monotonic()
  discovered = batch_sources.discover(tree, dst)
  discover_s = time.monotonic() - t
  sources = (batch_sources.read_manifest(manifest, src_root, dst) if manifest
             else discovered)
  t = time.monotonic()
  report = batch.run_batch(sources, dst, jobs=jobs)
  resume_s = time.monotonic() - t
  writes = {}
  for path in _reports(out_prefix):
    t = time.monotonic()
    report.write(path)
    writes[os.path.splitext(path)[1][1:]] = (round(time.monotonic() - t, 3),
                                             os.path.getsize(path))
  return {"modules": len(sources), "discovered": len(discovered),
          "discover_s": round(discover_s, 3),
          "resume_s": round(resume_s, 3), "skipped": report.counts[batch_report.STATUS_SKIPPED],
          "report_write_s_bytes": writes}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("catalog")
  p.add_argument("work")
  p.add_argument("--sizes", default="50,200,402")
  p.add_argument("--jobs", type=int, default=2)
  p.add_argument("--interrupt", action="store_true")
  p.add_argument("--beam_python", default=None)
  p.add_argument("--beam_sizes", default=None,
                 help="sizes run through Beam (default: the smallest and the largest)")
  p.add_argument("--skip_batch", action="store_true",
                 help="only the Beam runs (of an earlier rehearsal's trees)")
  p.add_argument("--json", default=None)
  args = p.parse_args()
  sizes = sorted(int(s) for s in args.sizes.split(","))
  os.makedirs(args.work, exist_ok=True)
  trees = make_trees(args.catalog, args.work, sizes)
  result = {"date": datetime.datetime.now().isoformat(timespec="minutes"),
            "load_at_start": open("/proc/loadavg").read().split()[:3],
            "jobs": args.jobs, "sizes": sizes}
  largest = sizes[-1]

  if not args.skip_batch:
    # 1. The conversion of the largest size, as a user runs it.
    dst = os.path.join(args.work, "dst")
    shutil.rmtree(dst, ignore_errors=True)
    state = os.path.join(dst, batch_state.STATE_FILENAME)
    prefix = os.path.join(args.work, f"report{largest}")
    run = run_cli(["batch", trees[largest], dst, f"--jobs={args.jobs}",
                   "--report=" + ",".join(_reports(prefix))], state)
    with open(prefix + ".json", encoding="utf-8") as f:
      report = json.load(f)
    run["modules_per_minute"] = timeline(report, sizes)
    run["counts"] = report["counts"]
    run["unexpected"] = check_outcomes(args.catalog, report, trees[largest])
    result["convert"] = run
    print(json.dumps({k: v for k, v in run.items() if k not in ("samples", "stdout_tail")},
                     indent=1), flush=True)

    # 2. Each size again: nothing to do; discovery + resume + report. The
    # smaller sizes are manifests of the largest tree's modules (a record is
    # up to date only for the same source path), the largest is the tree.
    result["rerun"] = {}
    for n in sizes:
      p_n = os.path.join(args.work, f"rerun{n}")
      manifest = None if n == largest else write_manifest(trees[n], args.work, n)
      cli = run_cli(["batch", trees[largest], dst, f"--jobs={args.jobs}",
                     "--report=" + ",".join(_reports(p_n))]
                    + ([f"--manifest={manifest}"] if manifest else []), state)
      parts = resume_breakdown(trees[n], trees[largest], dst, manifest, args.jobs,
                               p_n + "-inproc")
      result["rerun"][n] = {"cli_seconds": cli["seconds"], "returncode": cli["returncode"],
                            "state_bytes": cli["state_bytes"], **parts}
      print(n, json.dumps(result["rerun"][n]), flush=True)

    # 3. An interrupted run, resumed: no module converted twice.
    if args.interrupt:
      n = sizes[0]
      dst_i = os.path.join(args.work, "dst-interrupted")
      shutil.rmtree(dst_i, ignore_errors=True)
      state_i = os.path.join(dst_i, batch_state.STATE_FILENAME)
      first = run_cli(["batch", trees[n], dst_i, f"--jobs={args.jobs}",
                       f"--report={args.work}/interrupted1.json"], state_i,
                      interrupt_after=n // 3)
      after_first = _state_converted(state_i)
      second = run_cli(["batch", trees[n], dst_i, f"--jobs={args.jobs}",
                        f"--report={args.work}/interrupted2.json"], state_i)
      with open(os.path.join(args.work, "interrupted2.json"), encoding="utf-8") as f:
        final = json.load(f)
      # What the first run recorded as converted (its state: an interrupted
      # run writes no report), and what the second converted again.
      converted = [after_first, {m["destination"] for m in final["modules"]
                                 if m["status"] == "converted"}]
      result["interrupt"] = {
          "modules": n, "first_returncode": first["returncode"],
          "first_interrupted": first["interrupted"],
          "second_returncode": second["returncode"],
          "converted_first": len(converted[0]), "converted_second": len(converted[1]),
          "converted_twice": sorted(converted[0] & converted[1]),
          "unexpected": check_outcomes(args.catalog, final, trees[n])}
      print(json.dumps(result["interrupt"], indent=1), flush=True)

  # 4. The Beam DirectRunner, 2 workers.
  if args.beam_python:
    result["beam"] = {}
    beam_sizes = ([int(v) for v in args.beam_sizes.split(",")] if args.beam_sizes
                  else sorted({sizes[0], largest}))
    for n in beam_sizes:
      dst_b = os.path.join(args.work, f"dst-beam{n}")
      shutil.rmtree(dst_b, ignore_errors=True)
      p_b = os.path.join(args.work, f"beam{n}")
      run = run_cli(["batch", trees[n], dst_b, "--report=" + p_b + ".json",
                     "--beam_args=--runner=DirectRunner --direct_num_workers=2 "
                     "--direct_running_mode=multi_threading"],
                    os.path.join(dst_b, batch_state.STATE_FILENAME),
                    python=args.beam_python)
      if os.path.exists(p_b + ".json"):
        with open(p_b + ".json", encoding="utf-8") as f:
          report = json.load(f)
        run["counts"] = report["counts"]
        run["modules_per_minute"] = round(
            sum(1 for m in report["modules"] if m["status"] == "converted")
            / (run["seconds"] / 60), 1)
        run["unexpected"] = check_outcomes(args.catalog, report, trees[n])
      result["beam"][n] = {k: v for k, v in run.items() if k != "samples"}
      print(n, json.dumps(result["beam"][n])[:2000], flush=True)

  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
