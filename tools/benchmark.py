"""Benchmark: conversion cost and converted-model speed against the baselines.

    PYTHONPATH=. python tools/benchmark.py [--modules=resnet_v2_50,...] [--repeats=3]
        [--parts=cold,inprocess,keras,scaling,batch] [--full_dir=legacy_fixtures/full]
        [--scaling=scaling_10k,...] [--batch_modules=...] [--build] [--json=FILE]
        [--write=docs/PERFORMANCE.md]

Every figure is a median over `--repeats`, the sides of a comparison run
interleaved (so the drift of a shared machine's load hits each alike). The
parts (`--parts`, default all):

- cold: the way issue 17 judges speed. Per module, each side a fresh process
  measured with `tools/memory.py`'s `measure` (wall time, peak summed RSS of
  the whole process tree): the naive re-export as a user runs it (`python -c
  "import tensorflow as tf, tensorflow_hub as hub; tf.saved_model.save(
  hub.load(SRC), DST)"`: works, but gives a non-callable model), `python -m
  migrate.cli SRC DST --noverify`, and `python -m migrate.cli SRC DST`
  (verified, the default consumers). TensorFlow's import is included.
- inprocess (diagnosis): conversion and verification in a fresh process but
  timed after `import tensorflow` (the API's `convert()`, its stage times),
  output size, inference throughput of the converted model (batch 1 and 32)
  against the TF1 Session and `hub.load(...).signatures`, load time.
- keras: the native Keras 3 model's inference (`model.predict_on_batch`) on
  each installed backend against the TF2 SavedModel.
- scaling: the cold sides on the synthetic modules whose graph grows while
  compute and variables stay tiny (`generate.py --full scaling_10k,...`):
  graph nodes and bytes, time and tree peak against the naive re-export, and
  the cost per 1k nodes (marginal: between consecutive sizes).
- batch: `migrate-hub-module batch --jobs=1` against `--jobs=2` on a source
  tree of full-size modules mixed in size (hard links to `--full_dir`).

Modules are `--full_dir/<name>` (made by `legacy_fixtures/generate.py --full
NAME` in the legacy venv; `--build` runs that), or `fixture:NAME` for a
committed fixture. Prints Markdown; `--write=FILE` also replaces the text
between FILE's `<!-- benchmark:begin -->` and `<!-- benchmark:end -->` lines
with it. To regenerate docs/PERFORMANCE.md's table (on a quiet machine):

    PYTHONPATH=. .venv/bin/python tools/benchmark.py --build --json=bench.json \\
        --write=docs/PERFORMANCE.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from migrate import fileutil  # pylint: disable=g-import-not-at-top
from tools import memory  # pylint: disable=g-import-not-at-top

FULL = os.path.join(REPO, "legacy_fixtures", "full")
# Every full-size family of `generate.py --full` (issue 13).
DEFAULT_MODULES = ("resnet_v2_50", "inception_v3", "mobilenet_v2_100",
                   "mobilenet_v1_100", "inception_resnet_v2", "nasnet_mobile",
                   "efficientnet_b0", "efficientnet_b0_defun_swish")
SCALING = ("scaling_10k", "scaling_30k", "scaling_100k")
# Mixed in size: 14, 98, 91 and 20 MB of variables, 1.6-2.9 MB graphs.
BATCH_MODULES = ("mobilenet_v2_100", "resnet_v2_50", "inception_v3", "efficientnet_b0")
BATCH_JOBS = (1, 2)
PARTS = ("cold", "inprocess", "keras", "scaling", "batch")
COLD_SIDES = ("naive", "noverify", "verified")
SIDE_NAMES = {"naive": "naive re-export", "noverify": "`--noverify`", "verified": "verified"}
NAIVE_CODE = ("import sys, tensorflow as tf, tensorflow_hub as hub; "
              "tf.saved_model.save(hub.load(sys.argv[1]), sys.argv[2])")
BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"
MIN_SECONDS = 2.0  # Each side of a throughput comparison runs this long per round.


# --------------------------------------------------------------------------
# Tasks, each run in a fresh subprocess: `benchmark.py --task NAME ARGS...`.
# Each prints one JSON line: {"seconds": ..., "peak_rss_mb": ..., ...}.

# (The in-process and keras parts: diagnosis. The cold and scaling parts use
# memory.measure on whole commands instead.)

def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _images(batch: int, size: tuple[int, int]):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  return rng.random((batch, size[0], size[1], 3), dtype=np.float32)


def _throughputs(sides: dict, batch: int, rounds: int) -> dict[str, float]:
  """Images per second of each side: `batch` over its median call time.

  The sides' calls alternate one by one, the side that starts rotating
  each pass, until every side has run `rounds * MIN_SECONDS` and at least
  `3 * rounds` calls: on a shared machine the load drifts within seconds,
  and blocks of one side's calls (2 s each, as this first did) met
  different loads, e.g. two routes to the same graph measured 0.64x apart.
  """
  for run in sides.values():  # Warm-up (tracing, graph optimisation).
    run()
    run()
  names = list(sides)
  times: dict[str, list[float]] = {k: [] for k in names}
  passes = 0
  while (passes < 3 * rounds or
         min(sum(t) for t in times.values()) < rounds * MIN_SECONDS):
    for name in names[passes % len(names):] + names[:passes % len(names)]:
      start = time.perf_counter()
      sides[name]()
      times[name].append(time.perf_counter() - start)
    passes += 1
  return {k: batch / statistics.median(t) for k, t in times.items()}


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
  """Throughput of the three sides, their calls interleaved in one process
  (`_throughputs`)."""
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
  return _throughputs(sides, batch_size, int(rounds))


def task_infer_keras(keras_path: str, converted: str, batch: str, h: str,
                     w: str, rounds: str) -> dict:
  """Throughput of the .keras model on this process's Keras backend
  (KERAS_BACKEND, set by the caller) and of the TF2 SavedModel, interleaved."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  batch_size = int(batch)
  images = _images(batch_size, (int(h), int(w)))
  model = keras.saving.load_model(keras_path, safe_mode=True)
  obj = tf.saved_model.load(converted)
  x = tf.constant(images)
  sides = {"keras": lambda: model.predict_on_batch(images),
           "savedmodel": lambda: obj(x).numpy()}
  result = _throughputs(sides, batch_size, int(rounds))
  result["backend"] = keras.backend.backend()
  return result


TASKS = {name[len("task_"):]: fn for name, fn in globals().items()
         if name.startswith("task_")}


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
# Cold processes, the whole tree: each run measured by memory.measure.


def _cli(*args: str) -> list[str]:
  return [sys.executable, "-m", "migrate.cli", *args]


def cold_commands(src: str) -> dict:
  """The three sides of the cold comparison: output path -> argv."""
  return {"naive": lambda dst: [sys.executable, "-c", NAIVE_CODE, src, dst],
          "noverify": lambda dst: _cli(src, dst, "--noverify"),
          "verified": lambda dst: _cli(src, dst)}


def _measured(argv: list[str], interval: float) -> dict:
  """Wall seconds and peak tree RSS of one run of `argv`; raises if it fails."""
  result = memory.measure(argv, interval)
  if result["returncode"] != 0:
    raise RuntimeError(f"{' '.join(argv)} exited {result['returncode']}:\n"
                       f"{result['stderr']}")
  return {key: result[key] for key in ("seconds", "peak_tree_rss_mb")}


def _interleaved(commands: dict, repeats: int, work: str, interval: float) -> dict:
  """Per command (output path -> argv), the medians of its wall time and tree
  peak over `repeats` rounds, each round running every command once, each run
  into a fresh output path that is removed after it."""
  runs: dict[str, list[dict]] = {name: [] for name in commands}
  for i in range(repeats):
    for name, argv in commands.items():
      out = os.path.join(work, f"{name}-{i}")
      runs[name].append(_measured(argv(out), interval))
      shutil.rmtree(out, ignore_errors=True)
      print(f"  {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
  return {name: {key: statistics.median(r[key] for r in done) for key in done[0]}
          for name, done in runs.items()}


def graph_size(src: str) -> tuple[int, int]:
  """Nodes summed over the MetaGraphs of SRC's saved_model.pb, and its bytes."""
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  with open(os.path.join(src, "saved_model.pb"), "rb") as f:
    data = f.read()
  proto = saved_model_pb2.SavedModel.FromString(data)
  return sum(len(m.graph_def.node) for m in proto.meta_graphs), len(data)


def add_per_node_costs(series: list[dict]) -> list[dict]:
  """Sorts the scaling series by nodes and adds to each size, per cold side,
  its seconds and tree MB per 1k nodes, and the marginal cost per 1k nodes
  since the previous size (None for the first): constant when cost is linear
  in the graph."""
  series = sorted(series, key=lambda r: r["nodes"])
  for prev, r in zip([None] + series[:-1], series):
    r["per_1k_nodes"] = {}
    for side, figures in r["cold"].items():
      costs = {}
      for key, value in figures.items():
        marginal = None
        if prev is not None and r["nodes"] != prev["nodes"]:
          marginal = ((value - prev["cold"][side][key]) * 1000
                      / (r["nodes"] - prev["nodes"]))
        costs[key] = [value * 1000 / r["nodes"], marginal]
      r["per_1k_nodes"][side] = costs
  return series


def _link_tree(src: str, dst: str) -> None:
  """DST: SRC's tree, its files hard links (copies across file systems). Not a
  symlink: batch refuses a module that resolves outside SRC_ROOT."""
  def link(s: str, d: str) -> None:
    try:
      os.link(s, d)
    except OSError:
      shutil.copy2(s, d)
  shutil.copytree(src, dst, copy_function=link)


def benchmark_batch(names: list[str], full_dir: str, repeats: int, work: str,
                    interval: float) -> dict:
  """`migrate-hub-module batch` over a tree of NAMES, per --jobs in BATCH_JOBS."""
  src = os.path.join(work, "batch-src")
  for name in names:
    _link_tree(_source(name, full_dir), os.path.join(src, name.replace(":", "-")))
  commands = {f"jobs{j}": lambda dst, j=j: _cli("batch", f"--jobs={j}", src, dst)
              for j in BATCH_JOBS}
  return {"modules": names, **_interleaved(commands, repeats, work, interval)}


# --------------------------------------------------------------------------
# In process (diagnosis): tasks in fresh subprocesses, timed after the import.


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


def _source(name: str, full_dir: str) -> str:
  if name.startswith("fixture:"):
    return os.path.join(REPO, "legacy_fixtures", "modules", name.split(":", 1)[1])
  return os.path.join(full_dir, name)


def _fresh(work: str, name: str, tag: str) -> str:
  path = os.path.join(work, f"{name.replace(':', '-')}-{tag}")
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)
  return path


def _keras_backends() -> list[str]:
  from migrate import keras_side  # pylint: disable=g-import-not-at-top
  return keras_side.installed_backends()


def benchmark_keras(src: str, name: str, repeats: int, work: str) -> dict:
  """The .keras model's inference on each installed backend vs the SavedModel."""
  _, (h, w) = _module_info(src)
  saved, native = _fresh(work, name, "k-sm"), _fresh(work, name, "k.keras")
  _run_task("convert", src, saved, "0")
  _run_task("convert", src, native, "0")
  res = {}
  for backend in _keras_backends():
    for batch in (1, 32):
      res[f"{backend}_b{batch}"] = _run_task(
          "infer_keras", native, saved, str(batch), str(h), str(w), str(repeats),
          backend=backend)
  return res


def benchmark_inprocess(src: str, name: str, repeats: int, work: str) -> dict:
  signature, (h, w) = _module_info(src)
  res: dict = {"signature": signature, "image_size": [h, w]}
  naive, plain, verified = [], [], []
  for i in range(repeats):  # Interleaved, so load drift hits every side alike.
    naive.append(_run_task("naive", src, _fresh(work, name, f"naive{i}")))
    converted = _fresh(work, name, f"conv{i}")
    plain.append(_run_task("convert", src, converted, "0"))
    verified.append(_run_task("convert", src, _fresh(work, name, f"ver{i}"), "1"))
  for key, runs in (("naive", naive), ("convert", plain), ("convert_verify", verified)):
    res[key] = {"seconds": _median(runs, "seconds"),
                # A reference child process (verify.start_reference), if any,
                # runs beside this one: count its peak too.
                "peak_rss_mb": statistics.median(
                    r["peak_rss_mb"] + r["children_peak_rss_mb"] for r in runs)}
  res["verify_seconds"] = statistics.median(r["stages"]["verify"] for r in verified)
  res["stages"] = plain[-1]["stages"]
  res["verify_stages"] = verified[-1]["stages"]
  res["size_ratio"] = plain[-1]["output_bytes"] / plain[-1]["input_bytes"]
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


# --------------------------------------------------------------------------
# Markdown.


def _x(a: float, b: float) -> str:
  return f"{a / b:.2f}x"


def _s_mb(figures: dict) -> str:
  return f"{figures['seconds']:.1f} s / {figures['peak_tree_rss_mb']:.0f} MB"


def _table(first: list[str], columns: dict[str, dict], rows: list) -> list[str]:
  """A Markdown table: the `first` header cells, then one column per result;
  each row is (its leading cells, function of a column's result -> cell)."""
  lines = ["| " + " | ".join([*first, *columns]) + " |",
           "|" + " --- |" * (len(first) + len(columns))]
  for lead, cell in rows:
    lines.append("| " + " | ".join([*lead, *(cell(r) for r in columns.values())]) + " |")
  return lines


def _cold_rows(noverify_target: str = "-") -> list:
  def ratio(side: str, key: str):
    return lambda r: _x(r["cold"][side][key], r["cold"]["naive"][key])
  return [
      (["`--noverify` time", noverify_target], ratio("noverify", "seconds")),
      (["verified time", "<= 1.25x"], ratio("verified", "seconds")),
      (["verified tree peak", "<= 1.5x"], ratio("verified", "peak_tree_rss_mb")),
      (["`--noverify` tree peak", "-"], ratio("noverify", "peak_tree_rss_mb")),
  ] + [([f"{SIDE_NAMES[side]}: s / tree MB", ""], lambda r, side=side: _s_mb(r["cold"][side]))
       for side in COLD_SIDES]


def _per_node_rows() -> list:
  def cell(side: str, key: str, digits: int):
    def fmt(r: dict) -> str:
      total, marginal = r["per_1k_nodes"][side][key]
      return f"{total:.{digits}f}" + ("" if marginal is None else f" ({marginal:.{digits}f})")
    return fmt
  return [([f"{SIDE_NAMES[side]}: {unit} per 1k nodes (marginal)", ""],
           cell(side, key, digits))
          for key, unit, digits in (("seconds", "s", 3), ("peak_tree_rss_mb", "MB", 1))
          for side in COLD_SIDES]


def _inprocess_rows() -> list:
  rows = [
      ("conversion time vs naive re-export", "<= 1.0x",
       lambda r: _x(r["convert"]["seconds"], r["naive"]["seconds"])),
      ("conversion peak RSS vs naive", "<= 1.3x",
       lambda r: _x(r["convert"]["peak_rss_mb"], r["naive"]["peak_rss_mb"])),
      ("verification time vs conversion time", "-",
       lambda r: _x(r["verify_seconds"], r["convert"]["seconds"])),
      ("conversion + verification time vs naive", "-",
       lambda r: _x(r["convert_verify"]["seconds"], r["naive"]["seconds"])),
      ("conversion + verification peak RSS vs naive", "-",
       lambda r: _x(r["convert_verify"]["peak_rss_mb"], r["naive"]["peak_rss_mb"])),
      ("output size vs input size", "<= 1.02x", lambda r: f"{r['size_ratio']:.3f}x"),
      ("inference batch 1 vs TF1 Session", ">= 1.0x",
       lambda r: _x(r["ips_converted_b1"], r["ips_session_b1"])),
      ("inference batch 32 vs TF1 Session", ">= 1.0x",
       lambda r: _x(r["ips_converted_b32"], r["ips_session_b32"])),
      ("inference batch 1 vs hub.load(...).signatures", "-",
       lambda r: _x(r["ips_converted_b1"], r["ips_hub_signature_b1"])),
      ("inference batch 32 vs hub.load(...).signatures", "-",
       lambda r: _x(r["ips_converted_b32"], r["ips_hub_signature_b32"])),
      ("load time vs hub.load of the TF1 module", "<= 1.0x",
       lambda r: _x(r["load_converted_s"], r["load_hub_s"])),
      ("naive re-export s / MB", "",
       lambda r: f"{r['naive']['seconds']:.1f} / {r['naive']['peak_rss_mb']:.0f}"),
      ("conversion s / MB", "",
       lambda r: f"{r['convert']['seconds']:.1f} / {r['convert']['peak_rss_mb']:.0f}"),
      ("conversion + verification s / MB", "",
       lambda r: f"{r['convert_verify']['seconds']:.1f} / {r['convert_verify']['peak_rss_mb']:.0f}"),
      ("of which verification s", "", lambda r: f"{r['verify_seconds']:.1f}"),
      ("converted img/s b1 / b32", "",
       lambda r: f"{r['ips_converted_b1']:.1f} / {r['ips_converted_b32']:.1f}"),
      ("TF1 Session img/s b1 / b32", "",
       lambda r: f"{r['ips_session_b1']:.1f} / {r['ips_session_b32']:.1f}"),
      ("hub.load signature img/s b1 / b32", "",
       lambda r: f"{r['ips_hub_signature_b1']:.1f} / {r['ips_hub_signature_b32']:.1f}"),
      ("load s: converted / hub.load", "",
       lambda r: f"{r['load_converted_s']:.2f} / {r['load_hub_s']:.2f}"),
  ]
  return [([label, target], fn) for label, target, fn in rows]


def _keras_rows(columns: dict[str, dict]) -> list:
  def cell(key: str):
    def fmt(r: dict) -> str:
      f = r["keras"].get(key)
      return "-" if f is None else (
          f"{_x(f['keras'], f['savedmodel'])} ({f['keras']:.1f} / {f['savedmodel']:.1f})")
    return fmt
  keys = sorted({k for r in columns.values() for k in r["keras"]})
  return [([f"{k.rsplit('_', 1)[0]}, batch {k.rsplit('_b', 1)[1]}"], cell(k)) for k in keys]


def _batch_rows(first: int, second: int) -> list:
  a, b = f"jobs{first}", f"jobs{second}"
  return [
      ([f"`--jobs={second}` throughput vs `--jobs={first}` (wall time)", ">= 1.7x"],
       lambda r: _x(r[a]["seconds"], r[b]["seconds"])),
      ([f"`--jobs={second}` tree peak vs `--jobs={first}`", "-"],
       lambda r: _x(r[b]["peak_tree_rss_mb"], r[a]["peak_tree_rss_mb"])),
  ] + [([f"`--jobs={j}`: s / tree MB", ""], lambda r, j=j: _s_mb(r[f"jobs{j}"]))
       for j in (first, second)]


def markdown(data: dict) -> str:
  """Every part's table, the cold CLI ratios first."""
  modules = data["modules"]

  def having(key: str) -> dict[str, dict]:
    return {r["module"]: r for r in modules if key in r}

  lines = [f"Measured {data['date']} on {data['machine']}; load average at start "
           f"{data['load']}; "
           + ("one run each." if data["repeats"] == 1 else f"medians of {data['repeats']} runs.")]
  if having("cold"):
    lines += ["", *_table(["cold CLI, whole process tree, vs the naive re-export", "target"],
                          having("cold"), _cold_rows())]
  if data.get("scaling"):
    scaling = {r["module"]: r for r in data["scaling"]}
    rows = [(["graph nodes / MB", ""],
             lambda r: f"{r['nodes']} / {r['graph_bytes'] / 2**20:.1f}"),
            *_cold_rows("<= 1.0x at 100k"), *_per_node_rows()]
    lines += ["", *_table(["scaling: cold CLI vs the naive re-export", "target"],
                          scaling, rows)]
  if data.get("batch"):
    batch = data["batch"]
    lines += ["", *_table([f"batch of {', '.join(batch['modules'])}", "target"],
                          {"figure": batch}, _batch_rows(*BATCH_JOBS))]
  if having("convert"):
    lines += ["", *_table(["in process (diagnosis), after `import tensorflow`", "target"],
                          having("convert"), _inprocess_rows())]
  if having("keras"):
    lines += ["", *_table(["Keras model (`predict_on_batch`) vs TF2 SavedModel, img/s"],
                          having("keras"), _keras_rows(having("keras")))]
  return "\n".join(lines)


def replace_marked(text: str, table: str) -> str:
  """TEXT with what lies between its BEGIN and END markers replaced by TABLE."""
  start, end = text.find(BEGIN), text.find(END)
  counts = (text.count(BEGIN), text.count(END))
  if counts != (1, 1) or end < start:
    raise ValueError(f"expected one {BEGIN} and after it one {END}, found "
                     f"{counts[0]} and {counts[1]}"
                     + (" in the wrong order" if counts == (1, 1) else ""))
  return f"{text[:start + len(BEGIN)]}\n{table}\n{text[end:]}"


# --------------------------------------------------------------------------
# The driver.


def _build(names: list[str], full_dir: str) -> None:
  """Makes the missing full-size modules in the legacy venv."""
  missing = [n for n in names if not os.path.isdir(os.path.join(full_dir, n))]
  if not missing:
    return
  if os.path.basename(os.path.normpath(full_dir)) != "full":
    raise SystemExit(f"--build: generate.py writes into <out>/full/, found --full_dir="
                     f"{full_dir}")
  venv = os.environ.get("LEGACY_VENV", os.path.join(REPO, ".legacy-venv"))
  if not os.path.exists(os.path.join(venv, "bin", "python")):
    subprocess.run(["bash", os.path.join(REPO, "legacy_fixtures", "setup_legacy_env.sh")],
                   check=True, env=dict(os.environ, LEGACY_VENV=venv))
  subprocess.run([os.path.join(venv, "bin", "python"),
                  os.path.join(REPO, "legacy_fixtures", "generate.py"),
                  f"--out={os.path.dirname(os.path.normpath(full_dir))}",
                  "--full", ",".join(missing)], check=True, cwd=REPO)


def _names(text: str) -> list[str]:
  return [n for n in text.split(",") if n]


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--modules", default=",".join(DEFAULT_MODULES),
                      help="for the cold, inprocess and keras parts")
  parser.add_argument("--scaling", default=",".join(SCALING),
                      help="the modules of the scaling part")
  parser.add_argument("--batch_modules", default=",".join(BATCH_MODULES),
                      help="the source tree of the batch part")
  parser.add_argument("--parts", default="all",
                      help=f"comma-separated, of {', '.join(PARTS)} (default all)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--full_dir", default=FULL, help="where the full-size modules are")
  parser.add_argument("--interval", type=float, default=0.05,
                      help="seconds between samples of the process tree's RSS")
  parser.add_argument("--build", action="store_true",
                      help="build missing full-size modules in the legacy venv")
  parser.add_argument("--json", default=None, help="also write the raw figures here")
  parser.add_argument("--write", default=None,
                      help=f"replace the text between {BEGIN} and {END} in this file")
  args = parser.parse_args()
  args.parts = PARTS if args.parts == "all" else tuple(_names(args.parts))
  unknown = set(args.parts) - set(PARTS)
  if unknown:
    parser.error(f"--parts: expected some of {', '.join(PARTS)}, found {sorted(unknown)}")
  return args


def _needed(args: argparse.Namespace) -> list[str]:
  names = []
  if {"cold", "inprocess", "keras"} & set(args.parts):
    names += _names(args.modules)
  if "scaling" in args.parts:
    names += _names(args.scaling)
  if "batch" in args.parts:
    names += _names(args.batch_modules)
  return list(dict.fromkeys(names))


def run(args: argparse.Namespace, work: str) -> dict:
  modules, scaling, batch = [], [], None
  module_parts = [p for p in ("cold", "inprocess", "keras") if p in args.parts]
  for name in _names(args.modules) if module_parts else []:
    src, res = _source(name, args.full_dir), {"module": name}
    print(f"benchmarking {name} ({', '.join(module_parts)}) ...", file=sys.stderr, flush=True)
    if "cold" in args.parts:
      res["cold"] = _interleaved(cold_commands(src), args.repeats,
                                 tempfile.mkdtemp(dir=work), args.interval)
    if "inprocess" in args.parts:
      res.update(benchmark_inprocess(src, name, args.repeats, work))
    if "keras" in args.parts:
      res["keras"] = benchmark_keras(src, name, args.repeats, work)
    modules.append(res)
  for name in _names(args.scaling) if "scaling" in args.parts else []:
    print(f"scaling: {name} ...", file=sys.stderr, flush=True)
    src = _source(name, args.full_dir)
    nodes, graph_bytes = graph_size(src)
    scaling.append({"module": name, "nodes": nodes, "graph_bytes": graph_bytes,
                    "cold": _interleaved(cold_commands(src), args.repeats,
                                         tempfile.mkdtemp(dir=work), args.interval)})
  if "batch" in args.parts:
    print(f"batch of {args.batch_modules} ...", file=sys.stderr, flush=True)
    batch = benchmark_batch(_names(args.batch_modules), args.full_dir, args.repeats,
                            tempfile.mkdtemp(dir=work), args.interval)
  return {"modules": modules, "scaling": add_per_node_costs(scaling), "batch": batch}


def main() -> int:
  if len(sys.argv) > 2 and sys.argv[1] == "--task":
    result = TASKS[sys.argv[2]](*sys.argv[3:])
    result["peak_rss_mb"] = _peak_rss_mb()
    result["children_peak_rss_mb"] = resource.getrusage(
        resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    print(json.dumps(result))
    return 0
  args = _parse_args()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # As the CLI sets it.
  if args.write:  # Before the hours of measuring, not after.
    try:
      with open(args.write, encoding="utf-8") as f:
        replace_marked(f.read(), "")
    except (OSError, ValueError) as e:
      print(f"--write={args.write}: {e}", file=sys.stderr)
      return 2
  names = _needed(args)
  if args.build:
    _build([n for n in names if not n.startswith("fixture:")], args.full_dir)
  missing = [n for n in names if not os.path.isdir(_source(n, args.full_dir))]
  if missing:
    print(f"missing modules {missing} in {args.full_dir}: run with --build, or "
          f"legacy_fixtures/generate.py --full NAME in the legacy venv", file=sys.stderr)
    return 2
  data = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
          "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
          "repeats": args.repeats, "parts": list(args.parts)}
  work = tempfile.mkdtemp(prefix="migrate-bench-")
  try:
    data.update(run(args, work))
  finally:
    shutil.rmtree(work, ignore_errors=True)
  data["machine"] = memory._machine()  # pylint: disable=protected-access
  table = markdown(data)
  print(table)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(data, f, indent=1)
  if args.write:
    with open(args.write, encoding="utf-8") as f:
      fileutil.atomic_write(args.write, replace_marked(f.read(), table))
  return 0


if __name__ == "__main__":
  sys.exit(main())
