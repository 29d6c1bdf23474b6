"""Benchmark: conversion cost and converted-model speed against the baselines.

    python tools/benchmark.py [--modules=resnet_v2_50,inception_v3,mobilenet_v2_100]
                              [--repeats=3] [--json=FILE] [--build]

For each full-size module (legacy_fixtures/full/<name>, made on demand by
`legacy_fixtures/generate.py --full NAME` in the legacy venv; `--build` runs
that), measured in one run, each measurement in a fresh subprocess (so peak
RSS is that task's own), medians over `--repeats`:

- conversion wall time and peak RSS, without and with verification, against
  the naive re-export (`hub.load` of the TF1 module, then
  `tf.saved_model.save`: works, but gives a non-callable model);
- verification time against conversion time, in the API (the "verify"
  stage against `convert(verify=False)`) and end to end through the CLI
  (`migrate-hub-module SRC DST` against `--noverify`, TF import included);
- output size against input size;
- inference throughput of the converted model (batch 1 and 32 at the
  module's size) against the TF1 module run in graph mode (Session) and
  against `hub.load(module).signatures[...]`;
- load time of the converted model against `hub.load` of the TF1 module;
- inference throughput of the native Keras 3 model (`SRC -> DST.keras`,
  `model.predict_on_batch`) on each installed Keras backend against the TF2
  SavedModel, round-robin in the same process (one per backend).

`--parts=keras` measures only the last; `--modules=fixture:NAME` takes a
committed fixture (legacy_fixtures/modules/NAME) instead of a full-size one.

Times exclude the TensorFlow import (the same for every side). Prints a
Markdown table (paste it into the README) and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = os.path.join(REPO, "legacy_fixtures", "full")
DEFAULT_MODULES = ("resnet_v2_50", "inception_v3", "mobilenet_v2_100")
MIN_SECONDS = 2.0  # Each throughput figure runs at least this long.


# --------------------------------------------------------------------------
# Tasks, each run in a fresh subprocess: `benchmark.py --task NAME ARGS...`.
# Each prints one JSON line: {"seconds": ..., "peak_rss_mb": ..., ...}.


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _images(batch: int, size: tuple[int, int]):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  return rng.random((batch, size[0], size[1], 3), dtype=np.float32)


def _throughput(run, batch: int) -> float:
  run()  # Warm-up (tracing, graph optimisation).
  run()
  count, start = 0, time.perf_counter()
  while True:
    run()
    count += 1
    elapsed = time.perf_counter() - start
    if elapsed >= MIN_SECONDS and count >= 3:
      return count * batch / elapsed


def task_naive(src: str, dst: str) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_hub as hub
  start = time.perf_counter()
  obj = hub.load(src)
  tf.saved_model.save(obj, dst)
  return {"seconds": time.perf_counter() - start}


def task_convert(src: str, dst: str, verify: str) -> dict:
  from migrate import convert  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  result = convert.convert(src, dst, verify=verify == "1")
  seconds = time.perf_counter() - start
  return {"seconds": seconds, "stages": result.seconds,
          "input_bytes": result.input_bytes, "output_bytes": result.output_bytes,
          "verified": result.verified}


def task_load_converted(path: str) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  tf.saved_model.load(path)
  return {"seconds": time.perf_counter() - start}


def task_load_hub(src: str) -> dict:
  import tensorflow_hub as hub  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  hub.load(src)
  return {"seconds": time.perf_counter() - start}


def task_infer(src: str, converted: str, signature: str, batch: str, h: str,
               w: str, rounds: str) -> dict:
  """Throughput of the three sides, round-robin in one process.

  On a shared machine, load drifts; alternating short runs of each side and
  taking medians exposes them to the same conditions.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_hub as hub
  from migrate import reference
  batch_size = int(batch)
  images = _images(batch_size, (int(h), int(w)))
  x = tf.constant(images)
  obj = tf.saved_model.load(converted)
  hub_fn = hub.load(src).signatures[signature]
  ref = reference.ReferenceModule(src)
  sig = ref.module.inference.signatures[signature]
  fetches = {"out": sig.outputs["default"].tensor_name}
  feeds = {sig.inputs["images"].tensor_name: images}
  sides = {
      "converted": lambda: obj(x).numpy(),
      "session": lambda: ref.infer_tensors(fetches, feeds),
      "hub_signature": lambda: hub_fn(images=x)["default"].numpy(),
  }
  figures: dict[str, list[float]] = {k: [] for k in sides}
  for _ in range(int(rounds)):
    for name, run in sides.items():
      figures[name].append(_throughput(run, batch_size))
  return {k: statistics.median(v) for k, v in figures.items()}


def task_infer_keras(keras_path: str, converted: str, batch: str, h: str,
                     w: str, rounds: str) -> dict:
  """Throughput of the .keras model on this process's Keras backend
  (KERAS_BACKEND, set by the caller) and of the TF2 SavedModel, round-robin."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  batch_size = int(batch)
  images = _images(batch_size, (int(h), int(w)))
  model = keras.saving.load_model(keras_path, safe_mode=True)
  obj = tf.saved_model.load(converted)
  x = tf.constant(images)
  sides = {"keras": lambda: model.predict_on_batch(images),
           "savedmodel": lambda: obj(x).numpy()}
  figures: dict[str, list[float]] = {k: [] for k in sides}
  for _ in range(int(rounds)):
    for name, run in sides.items():
      figures[name].append(_throughput(run, batch_size))
  result = {k: statistics.median(v) for k, v in figures.items()}
  result["backend"] = keras.backend.backend()
  return result


TASKS = {name[len("task_"):]: fn for name, fn in globals().items()
         if name.startswith("task_")}


def _time_cli(*args: str) -> float:
  """Wall time of `migrate-hub-module ARGS` as a user runs it (TF import included)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "migrate.cli", *args],
                        capture_output=True, text=True, env=env, check=False)
  seconds = time.perf_counter() - start
  if proc.returncode != 0:
    raise RuntimeError(f"migrate-hub-module {args} failed:\n{proc.stderr[-3000:]}")
  return seconds


def _run_task(name: str, *args: str, backend: str = "") -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
  if backend:
    env["KERAS_BACKEND"] = backend
  proc = subprocess.run([sys.executable, __file__, "--task", name, *args],
                        capture_output=True, text=True, env=env, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"task {name} {args} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# The driver.


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f))
             for r, _, fs in os.walk(path) for f in fs)


def _median(runs: list[dict], key: str) -> float:
  return statistics.median(r[key] for r in runs)


def _module_info(src: str) -> tuple[str, tuple[int, int]]:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
  code = ("import json,sys; from migrate import legacy_format, plan; "
          "m = legacy_format.read_module(sys.argv[1]); p = plan.make_plan(m); "
          "print(json.dumps([p.signature, p.default_image_size]))")
  out = subprocess.run([sys.executable, "-c", code, src], capture_output=True,
                       text=True, env=env, check=True).stdout
  signature, size = json.loads(out.strip().splitlines()[-1])
  return signature, tuple(size or (224, 224))


def _source(name: str) -> str:
  if name.startswith("fixture:"):
    return os.path.join(REPO, "legacy_fixtures", "modules", name.split(":", 1)[1])
  return os.path.join(FULL, name)


def _keras_backends() -> list[str]:
  from migrate import keras_side  # pylint: disable=g-import-not-at-top
  return keras_side.installed_backends()


def benchmark_keras(name: str, repeats: int, work: str, res: dict) -> None:
  """The .keras model's inference on each installed backend vs the SavedModel."""
  src = _source(name)
  _, (h, w) = _module_info(src)
  tag = name.replace(":", "-")
  saved, native = os.path.join(work, f"{tag}-k-sm"), os.path.join(work, f"{tag}.keras")
  shutil.rmtree(saved, ignore_errors=True)
  if os.path.exists(native):
    os.remove(native)
  _run_task("convert", src, saved, "0")
  _run_task("convert", src, native, "0")
  res["keras"] = {}
  for backend in _keras_backends():
    for batch in (1, 32):
      ips = _run_task("infer_keras", native, saved, str(batch), str(h), str(w),
                      str(repeats), backend=backend)
      res["keras"][f"{backend}_b{batch}"] = ips


def benchmark_module(name: str, repeats: int, work: str) -> dict:
  src = _source(name)
  signature, (h, w) = _module_info(src)
  res: dict = {"module": name, "signature": signature, "image_size": [h, w]}

  def fresh(tag: str) -> str:
    path = os.path.join(work, f"{name}-{tag}")
    shutil.rmtree(path, ignore_errors=True)
    return path

  naive, plain, verified, cli_plain, cli_verified = [], [], [], [], []
  for i in range(repeats):  # Interleaved, so load drift hits every side alike.
    naive.append(_run_task("naive", src, fresh(f"naive{i}")))
    plain.append(_run_task("convert", src, fresh(f"conv{i}"), "0"))
    verified.append(_run_task("convert", src, fresh(f"ver{i}"), "1"))
    cli_plain.append(_time_cli(src, fresh(f"cli{i}"), "--noverify"))
    cli_verified.append(_time_cli(src, fresh(f"cliv{i}")))
  for key, runs in (("naive", naive), ("convert", plain), ("convert_verify", verified)):
    res[key] = {"seconds": _median(runs, "seconds"),
                # A reference child process (verify.start_reference), if any,
                # runs beside this one: count its peak too.
                "peak_rss_mb": statistics.median(
                    r["peak_rss_mb"] + r["children_peak_rss_mb"] for r in runs)}
  res["verify_seconds"] = statistics.median(r["stages"]["verify"] for r in verified)
  res["cli_seconds"] = statistics.median(cli_plain)
  res["cli_verify_seconds"] = statistics.median(cli_verified)
  res["stages"] = plain[-1]["stages"]
  res["verify_stages"] = verified[-1]["stages"]
  res["size_ratio"] = plain[-1]["output_bytes"] / plain[-1]["input_bytes"]
  converted = os.path.join(work, f"{name}-conv0")

  loads_conv = [_run_task("load_converted", converted) for _ in range(repeats)]
  loads_hub = [_run_task("load_hub", src) for _ in range(repeats)]
  res["load_converted_s"] = _median(loads_conv, "seconds")
  res["load_hub_s"] = _median(loads_hub, "seconds")

  for batch in (1, 32):
    ips = _run_task("infer", src, converted, signature, str(batch), str(h),
                    str(w), str(repeats))
    for side in ("converted", "session", "hub_signature"):
      res[f"ips_{side}_b{batch}"] = ips[side]
  return res


def _machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return f"{os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GiB, Python {platform.python_version()}"


def keras_markdown(results: list[dict]) -> str:
  """Rows: the .keras model's img/s on each backend against the SavedModel's."""
  head = "| Keras model (`predict_on_batch`) vs TF2 SavedModel, img/s | " + " | ".join(
      r["module"] for r in results) + " |"
  lines = [head, "|" + " --- |" * (len(results) + 1)]
  keys = sorted({k for r in results for k in r.get("keras", {})})
  for key in keys:
    backend, batch = key.rsplit("_", 1)
    cells = []
    for r in results:
      f = r.get("keras", {}).get(key)
      cells.append("-" if f is None else
                   f"{f['keras'] / f['savedmodel']:.2f}x ({f['keras']:.1f} / {f['savedmodel']:.1f})")
    lines.append(f"| {backend}, batch {batch[1:]} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown(results: list[dict], machine: str, date: str, load: str) -> str:
  rows = [
      ("conversion time vs naive re-export", "<= 1.0x",
       lambda r: r["convert"]["seconds"] / r["naive"]["seconds"]),
      ("conversion peak RSS vs naive", "<= 1.3x",
       lambda r: r["convert"]["peak_rss_mb"] / r["naive"]["peak_rss_mb"]),
      ("verification time vs conversion time", "<= 1.0x",
       lambda r: r["verify_seconds"] / r["convert"]["seconds"]),
      ("the same, CLI end to end (`migrate-hub-module` vs `--noverify`)", "-",
       lambda r: (r["cli_verify_seconds"] - r["cli_seconds"]) / r["cli_seconds"]),
      ("conversion + verification time vs naive", "<= 2.0x",
       lambda r: r["convert_verify"]["seconds"] / r["naive"]["seconds"]),
      ("conversion + verification peak RSS vs naive", "-",
       lambda r: r["convert_verify"]["peak_rss_mb"] / r["naive"]["peak_rss_mb"]),
      ("output size vs input size", "<= 1.02x", lambda r: r["size_ratio"]),
      ("inference batch 1 vs TF1 Session", ">= 1.0x",
       lambda r: r["ips_converted_b1"] / r["ips_session_b1"]),
      ("inference batch 32 vs TF1 Session", ">= 1.0x",
       lambda r: r["ips_converted_b32"] / r["ips_session_b32"]),
      ("inference batch 1 vs hub.load(...).signatures", "-",
       lambda r: r["ips_converted_b1"] / r["ips_hub_signature_b1"]),
      ("inference batch 32 vs hub.load(...).signatures", "-",
       lambda r: r["ips_converted_b32"] / r["ips_hub_signature_b32"]),
      ("load time vs hub.load of the TF1 module", "<= 1.0x",
       lambda r: r["load_converted_s"] / r["load_hub_s"]),
  ]
  head = "| ratio | target | " + " | ".join(r["module"] for r in results) + " |"
  lines = [f"Measured {date} on {machine}; load average at start {load}.", "",
           head, "|" + " --- |" * (len(results) + 2)]
  for label, target, fn in rows:
    lines.append(f"| {label} | {target} | " +
                 " | ".join(f"{fn(r):.2f}x" for r in results) + " |")
  lines += ["", "| absolute | " + " | ".join(r["module"] for r in results) + " |",
            "|" + " --- |" * (len(results) + 1)]
  absolute = [
      ("naive re-export s / MB", lambda r: f"{r['naive']['seconds']:.1f} / {r['naive']['peak_rss_mb']:.0f}"),
      ("conversion s / MB", lambda r: f"{r['convert']['seconds']:.1f} / {r['convert']['peak_rss_mb']:.0f}"),
      ("conversion + verification s / MB", lambda r: f"{r['convert_verify']['seconds']:.1f} / {r['convert_verify']['peak_rss_mb']:.0f}"),
      ("of which verification s", lambda r: f"{r['verify_seconds']:.1f}"),
      ("CLI s: --noverify / verified", lambda r: f"{r['cli_seconds']:.1f} / {r['cli_verify_seconds']:.1f}"),
      ("converted img/s b1 / b32", lambda r: f"{r['ips_converted_b1']:.1f} / {r['ips_converted_b32']:.1f}"),
      ("TF1 Session img/s b1 / b32", lambda r: f"{r['ips_session_b1']:.1f} / {r['ips_session_b32']:.1f}"),
      ("hub.load signature img/s b1 / b32", lambda r: f"{r['ips_hub_signature_b1']:.1f} / {r['ips_hub_signature_b32']:.1f}"),
      ("load s: converted / hub.load", lambda r: f"{r['load_converted_s']:.2f} / {r['load_hub_s']:.2f}"),
  ]
  for label, fn in absolute:
    lines.append(f"| {label} | " + " | ".join(fn(r) for r in results) + " |")
  return "\n".join(lines)


def _build(names: list[str]) -> None:
  venv = os.environ.get("LEGACY_VENV", os.path.join(REPO, ".legacy-venv"))
  if not os.path.exists(os.path.join(venv, "bin", "python")):
    subprocess.run(["bash", os.path.join(REPO, "legacy_fixtures", "setup_legacy_env.sh")],
                   check=True, env=dict(os.environ, LEGACY_VENV=venv))
  for name in names:
    if not os.path.isdir(os.path.join(FULL, name)):
      subprocess.run([os.path.join(venv, "bin", "python"),
                      os.path.join(REPO, "legacy_fixtures", "generate.py"),
                      "--full", name], check=True, cwd=REPO)


def main() -> int:
  if len(sys.argv) > 2 and sys.argv[1] == "--task":
    result = TASKS[sys.argv[2]](*sys.argv[3:])
    result["peak_rss_mb"] = _peak_rss_mb()
    result["children_peak_rss_mb"] = resource.getrusage(
        resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    print(json.dumps(result))
    return 0
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--modules", default=",".join(DEFAULT_MODULES))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", default=None)
  parser.add_argument("--build", action="store_true",
                      help="build missing full-size modules in the legacy venv")
  parser.add_argument("--parts", choices=("all", "keras"), default="all",
                      help="keras: only the .keras model's inference rows")
  args = parser.parse_args()
  names = [n for n in args.modules.split(",") if n]
  if args.build:
    _build([n for n in names if not n.startswith("fixture:")])
  missing = [n for n in names if not os.path.isdir(_source(n))]
  if missing:
    print(f"missing full-size modules {missing}: run with --build, or "
          f"legacy_fixtures/generate.py --full NAME in the legacy venv",
          file=sys.stderr)
    return 2
  date = datetime.date.today().isoformat()
  load = " ".join(f"{x:.2f}" for x in os.getloadavg())
  work = tempfile.mkdtemp(prefix="migrate-bench-")
  try:
    results = []
    for name in names:
      print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
      res = (benchmark_module(name, args.repeats, work) if args.parts == "all"
             else {"module": name})
      benchmark_keras(name, args.repeats, work, res)
      results.append(res)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  if args.parts == "all":
    table = markdown(results, _machine(), date, load) + "\n\n" + keras_markdown(results)
  else:
    table = (f"Measured {date} on {_machine()}; load average at start {load}.\n\n"
             + keras_markdown(results))
  print(table)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"date": date, "machine": _machine(), "load": load,
                 "results": results}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
