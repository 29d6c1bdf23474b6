"""Batch throughput: the same conversions with 1 worker, then with 2 (or --jobs).

    PYTHONPATH=. python tools/bench_batch.py [--modules=8] [--jobs=1,2]

Copies small fixture modules into a temporary source tree (`--modules`
conversions, cycling through `--fixtures`), then runs `batch.run_batch` on
it once per worker count, each time into a fresh DST (conversion and
verification included, as in a real batch). Prints wall times, modules per
minute, the speed-up over the first worker count, and the machine's load
(other processes skew the figures: note it with the results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from migrate import batch  # pylint: disable=g-import-not-at-top

DEFAULT_FIXTURES = ("classifier_probabilities", "inference_only_asset",
                    "refvars_bn", "mobilenet_v1_bn_hparams")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _load() -> str:
  try:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return "?"


def _busy_cpu_seconds() -> float:
  """CPU seconds spent by the whole machine (all processes) since boot."""
  try:
    with open("/proc/stat", encoding="utf-8") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return float("nan")
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
  """CPU seconds of this process and its finished children (the workers)."""
  total = 0.0
  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
    usage = resource.getrusage(who)
    total += usage.ru_utime + usage.ru_stime
  return total


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--modules", type=int, default=8,
                      help="conversions per run (default 8)")
  parser.add_argument("--jobs", default="1,2", help="worker counts, e.g. 1,2")
  parser.add_argument("--fixtures", default=",".join(DEFAULT_FIXTURES),
                      help="fixture modules to cycle through")
  parser.add_argument("--json", help="also write the figures to this file")
  args = parser.parse_args()
  jobs_list = [int(j) for j in args.jobs.split(",")]
  fixtures = args.fixtures.split(",")
  work = tempfile.mkdtemp(prefix="bench-batch-")
  try:
    src = os.path.join(work, "src")
    for i in range(args.modules):
      name = fixtures[i % len(fixtures)]
      shutil.copytree(os.path.join(REPO, "legacy_fixtures", "modules", name),
                      os.path.join(src, f"{i:02d}_{name}"))
    print(f"machine: {os.cpu_count()} cores ({_cpu_model()}), "
          f"{platform.platform()}, python {platform.python_version()}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"modules: {args.modules} conversions+verifications of "
          f"{', '.join(fixtures)}")
    runs = []
    for jobs in jobs_list:
      dst = os.path.join(work, f"dst_{jobs}")
      load_before = _load()
      busy_before, own_before = _busy_cpu_seconds(), _own_cpu_seconds()
      began = time.monotonic()
      report = batch.run_batch(batch.discover(src, dst), dst, jobs=jobs)
      seconds = time.monotonic() - began
      own = _own_cpu_seconds() - own_before
      others = max(0.0, _busy_cpu_seconds() - busy_before - own)
      counts = report.counts
      if counts["converted"] != args.modules:
        print(report.format_table())
        print("error: not every module was converted", file=sys.stderr)
        return 1
      runs.append({"jobs": jobs, "seconds": round(seconds, 2),
                   "modules_per_minute": round(args.modules / seconds * 60, 2),
                   "load_before": load_before, "load_after": _load(),
                   "batch_cpu_seconds": round(own, 1),
                   "other_processes_cpu_seconds": round(others, 1),
                   "mean_module_seconds": round(
                       sum(m.seconds for m in report.modules) / args.modules, 2)})
      print(f"jobs={jobs}: {seconds:.1f}s wall, "
            f"{runs[-1]['modules_per_minute']:.1f} modules/min, mean "
            f"{runs[-1]['mean_module_seconds']:.1f}s per module; batch used "
            f"{own:.0f} CPU-s, other processes {others:.0f} CPU-s "
            f"({others / seconds:.2f} cores); load {load_before} -> "
            f"{runs[-1]['load_after']}")
    base = runs[0]["seconds"]
    for run in runs[1:]:
      run["speedup"] = round(base / run["seconds"], 3)
      print(f"throughput ratio jobs={run['jobs']} / jobs={runs[0]['jobs']}: "
            f"{run['speedup']:.2f}x")
    if args.json:
      with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"cpu": _cpu_model(), "cores": os.cpu_count(),
                   "date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "modules": args.modules, "fixtures": fixtures, "runs": runs},
                  f, indent=1)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
