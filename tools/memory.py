"""Peak memory of `migrate-hub-module SRC DST` against the size of the module's variables.

    PYTHONPATH=. python tools/memory.py [--modules=resnet_v2_50,...] [--modes=noverify,verify]
                                        [--interval=0.05] [--json=FILE]

For each full-size module (legacy_fixtures/full/<name>, made by `legacy_fixtures/generate.py
--full NAME` in the legacy venv) and each mode, runs the real CLI (`python -m migrate.cli SRC
DST`, with `--noverify` or not) and polls /proc every `--interval` seconds for the whole process
tree it starts: the CLI, its worker, the worker's reference child. It reports

- the peak of the tree's summed VmRSS (sampled; shared pages such as TensorFlow's libraries
  count once per process, as the kernel's RSS does),
- each process's own peak (VmHWM, exact), by depth in the tree (cli, worker, child),
- the variables' size (the checkpoint's data files) and the ratios.

Prints a Markdown table and, with --json, the raw figures. RSS does not depend on what other
processes on the machine do (unlike time), so measuring on a loaded machine is meaningful.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from tests import proctree  # Run from the repository: PYTHONPATH=.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = os.path.join(REPO, "legacy_fixtures", "full")
DEFAULT_MODULES = ("mobilenet_v2_100", "mobilenet_v1_100", "efficientnet_b0",
                   "efficientnet_b0_defun_swish", "nasnet_mobile", "resnet_v2_50",
                   "inception_v3", "inception_resnet_v2")
ROLES = ("cli", "worker", "child")
MB = 2**20


def variables_bytes(module: str) -> int:
  """The size of the module's checkpoint (variables/variables.data-*)."""
  folder = os.path.join(module, "variables")
  return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
             if f.startswith("variables.data-"))


def _parents() -> dict[int, int]:
  """pid -> parent pid of every process (from /proc/<pid>/stat)."""
  result = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat", "rb") as f:
        stat = f.read()
    except OSError:
      continue
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    fields = stat[stat.rfind(b")") + 2:].split()
    result[int(entry)] = int(fields[1])
  return result


def tree(root: int) -> dict[int, int]:
  """pid -> depth below `root` (0) of root's living descendants."""
  children: dict[int, list[int]] = {}
  for pid, ppid in _parents().items():
    children.setdefault(ppid, []).append(pid)
  depth, todo = {root: 0}, [root]
  while todo:
    pid = todo.pop()
    for child in children.get(pid, []):
      depth[child] = depth[pid] + 1
      todo.append(child)
  return depth


def status_kb(pid: int) -> dict[str, int]:
  result = {}
  try:
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith(("VmRSS:", "VmHWM:")):
          key, value = line.split(":", 1)
          result[key] = int(value.split()[0])
  except OSError:
    pass
  return result


def measure(argv: list[str], interval: float) -> dict:
  """Runs `argv`; peak summed RSS of its process tree and each process's VmHWM."""
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  start = time.monotonic()
  # Output goes to files, not pipes: nobody reads a pipe while this polls, so a
  # child writing more than the pipe holds (64 KiB) would block forever.
  out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
  proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=REPO)
  peak_tree_kb, hwm_kb = 0, {}  # (pid, cmdline) -> (role, VmHWM kB)
  while proc.poll() is None:
    total = 0
    for pid, depth in tree(proc.pid).items():
      status = status_kb(pid)
      total += status.get("VmRSS", 0)
      if "VmHWM" in status:
        cmdline = proctree.cmdline(pid)
        # multiprocessing's resource tracker is not one of the tool's processes.
        role = ("tracker" if "resource_tracker" in cmdline
                else ROLES[min(depth, len(ROLES) - 1)])
        key = (pid, cmdline)
        hwm_kb[key] = (role, max(status["VmHWM"], hwm_kb.get(key, (0, 0))[1]))
    peak_tree_kb = max(peak_tree_kb, total)
    time.sleep(interval)
  proc.wait()
  seconds = time.monotonic() - start
  out.seek(0)
  err.seek(0)
  stdout, stderr = out.read(), err.read()
  out.close()
  err.close()
  by_role = {}
  for role, kb in hwm_kb.values():
    by_role[role] = max(by_role.get(role, 0), kb)
  return {"returncode": proc.returncode, "seconds": round(seconds, 1),
          "peak_tree_rss_mb": round(peak_tree_kb / 1024), "processes": len(hwm_kb),
          "peak_rss_mb": {r: round(kb / 1024) for r, kb in by_role.items()},
          "stderr": stderr.decode(errors="replace")[-2000:],
          "stdout_tail": stdout.decode(errors="replace")[-500:]}


def _machine() -> str:
  cpu = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  with open("/proc/meminfo", encoding="ascii") as f:
    total = int(next(l for l in f if l.startswith("MemTotal")).split()[1]) / 2**20
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return (f"{os.cpu_count()} cores ({cpu}), {total:.0f} GiB, Linux {platform.release()}, "
          f"Python {platform.python_version()}, TF {tf.__version__}")


def markdown(results: list[dict], machine: str, date: str, load: str) -> str:
  lines = [f"Measured {date} on {machine}; load average at start {load}.", "",
           "| module | variables MB | mode | peak RSS, process tree | x variables | "
           "cli / worker / reference child | s |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in results:
    per = " / ".join(str(r["peak_rss_mb"].get(role, "-")) for role in ROLES)
    lines.append(
        f"| {r['module']} | {r['variables_mb']:.1f} | {r['mode']} | "
        f"{r['peak_tree_rss_mb']} MB | {r['peak_tree_rss_mb'] / r['variables_mb']:.1f}x | "
        f"{per} MB | {r['seconds']} |")
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--modules", default=",".join(DEFAULT_MODULES))
  parser.add_argument("--modes", default="noverify,verify",
                      help="noverify, verify (the default consumers), verify_all")
  parser.add_argument("--interval", type=float, default=0.05)
  parser.add_argument("--json", default=None)
  parser.add_argument("--full_dir", default=FULL, help="where the full-size modules are")
  args = parser.parse_args()
  names = [n for n in args.modules.split(",") if n]
  missing = [n for n in names if not os.path.isdir(os.path.join(args.full_dir, n))]
  if missing:
    print(f"missing full-size modules {missing}: run legacy_fixtures/generate.py --full NAME "
          f"in the legacy venv", file=sys.stderr)
    return 2
  date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  load = " ".join(f"{x:.2f}" for x in os.getloadavg())
  work = tempfile.mkdtemp(prefix="migrate-memory-")
  results = []
  try:
    for name in names:
      src = os.path.join(args.full_dir, name)
      for mode in args.modes.split(","):
        dst = os.path.join(work, f"{name}-{mode}")
        argv = [sys.executable, "-m", "migrate.cli", src, dst]
        if mode == "noverify":
          argv.append("--noverify")
        elif mode == "verify_all":  # Every consumer: TFLite and the fit steps too.
          argv.append("--consumers=all")
        elif mode != "verify":
          raise SystemExit(f"unknown mode {mode!r}: noverify, verify or verify_all")
        print(f"{name} ({mode}) ...", file=sys.stderr, flush=True)
        result = measure(argv, args.interval)
        result.update(module=name, mode=mode,
                      variables_mb=variables_bytes(src) / MB)
        results.append(result)
        print(f"  exit {result['returncode']}, peak tree {result['peak_tree_rss_mb']} MB, "
              f"{result['peak_rss_mb']}, {result['seconds']} s", file=sys.stderr, flush=True)
        if result["returncode"] != 0:
          print("  " + result["stderr"].strip().splitlines()[-1] if result["stderr"].strip()
                else "", file=sys.stderr)
        shutil.rmtree(dst, ignore_errors=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  print(markdown(results, _machine(), date, load))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"date": date, "load": load, "results": results}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
