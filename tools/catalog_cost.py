#!/usr/bin/env python3
"""What converting the real catalog at full size costs: an estimate from measurements.

    PYTHONPATH=. .venv/bin/python tools/memory.py --modes=verify --json=full.json
    python3 tools/catalog_cost.py full.json [--csv=../shared/data/tfhub-tf1-image-modules.csv]
                                             [--workers=2] [--beam_workers=8,32]

Each row of the catalog CSV gets the full-size module of its family that
tools/memory.py measured (`migrate-hub-module SRC DST` from a cold start, with
verification: wall time and the peak RSS of the whole process tree), scaled
to the row's variant: cost = fixed + (measured - fixed) * scale. `fixed` is
what a module costs whatever its size (the processes, the imports, the
consumers' loads; 80% of the smallest measurement, `--fixed`); the rest is split between variables and graph as the batch's memory
estimate weighs them, each scaled by the variant's size (parameters, from
published figures; blocks or cells against the measured module's,
`GRAPH_FACTOR`).
Rows that are not image models this tool converts (GAN generators, VAEs)
count as refused at once.

Prints per family: modules, estimated hours, largest peak; then the whole
catalog on one machine with `--workers` workers (the batch's memory-aware
scheduler: a module whose peak would not fit waits) and on Beam clusters of
N workers of the same machine type. An estimate, stated as one: only one
variant per family was measured, the scaling is a model.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CSV = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data",
                           "tfhub-tf1-image-modules.csv")

# Millions of parameters by variant (the papers' and tf-slim's tables).
MOBILENET_V1 = {"025": 0.47, "050": 1.34, "075": 2.59, "100": 4.24}
MOBILENET_V2 = {"035": 1.66, "050": 1.95, "075": 2.61, "100": 3.47, "130": 5.34, "140": 6.06}
EFFICIENTNET = {"b0": 5.3, "b1": 7.8, "b2": 9.2, "b3": 12.0, "b4": 19.0, "b5": 30.0,
                "b6": 43.0, "b7": 66.0, "lite0": 4.7, "lite1": 5.4, "lite2": 6.1,
                "lite3": 8.2, "lite4": 13.0}
FIXED_PARAMS = {"resnet-v1-50": 25.6, "resnet-v2-50": 25.6, "resnet50-v2": 25.6,
                "resnet-v1-101": 44.5, "resnet-v2-101": 44.5, "resnet-v1-152": 60.2,
                "resnet-v2-152": 60.2, "resnet-v1-200": 64.7, "inception-v1": 6.6,
                "inception-v2": 11.2, "inception-v3": 23.8, "inception-v4": 42.7,
                "inception-resnet-v2": 55.8, "nasnet-a-mobile": 5.3, "nasnet-a-large": 88.9,
                "pnasnet-5-large": 86.1, "amoebanet-a-n18-f448": 469.0, "wrn-106": 70.0,
                "mobilenet-v3": 5.4, "vgg-style": 1.0}
NOT_IMAGE_MODELS = ("biggan", "vae", "wae")  # Generators: refused in seconds.

# How much bigger the variant's graph is than the measured module's (blocks
# or cells against the measured one's: ResNet-101 has 33 blocks to 50's 16;
# EfficientNet-B7 55 MBConv blocks to B0's 16; NASNet-A Large 18 normal
# cells to Mobile's 12). 1 where depth does not change (width multipliers).
GRAPH_FACTOR = {"resnet-v1-101": 2.0, "resnet-v2-101": 2.0, "resnet-v1-152": 3.0,
                "resnet-v2-152": 3.0, "resnet-v1-200": 4.0, "wrn-106": 2.0,
                "inception-v4": 1.5, "nasnet-a-large": 1.5, "pnasnet-5-large": 1.3,
                "amoebanet-a-n18-f448": 2.0}
EFFICIENTNET_BLOCKS = {"b0": 16, "b1": 23, "b2": 23, "b3": 26, "b4": 32, "b5": 39,
                       "b6": 45, "b7": 55}

# The measured full-size module standing for each family, with its parameters.
MEASURED = {"mobilenet_v1": ("mobilenet_v1_100", 4.24),
            "mobilenet_v2": ("mobilenet_v2_100", 3.47),
            "resnet": ("resnet_v2_50", 25.6),
            "inception": ("inception_v3", 23.8),
            "inception_resnet": ("inception_resnet_v2", 55.8),
            "efficientnet": ("efficientnet_b0", 5.3),
            "nasnet": ("nasnet_mobile", 5.3)}


def classify(row: dict) -> tuple[str, float, float]:
  """-> (family, millions of parameters, graph factor) of a catalog row
  ("refused", 0, 0 if it is not an image model)."""
  arch, handle = row["architecture"].lower(), row["handle"].lower()
  if any(k in arch for k in NOT_IMAGE_MODELS):
    return "refused", 0.0, 0.0
  m = re.search(r"mobilenet_v([12])_(\d{3})_", handle)
  if m:
    table = MOBILENET_V1 if m.group(1) == "1" else MOBILENET_V2
    return f"mobilenet_v{m.group(1)}", table[m.group(2)], 1.0
  m = re.search(r"efficientnet/(b\d|lite\d)", handle)
  if m:
    variant = m.group(1)
    blocks = EFFICIENTNET_BLOCKS.get(variant, EFFICIENTNET_BLOCKS["b" + variant[-1]])
    return "efficientnet", EFFICIENTNET[variant], blocks / 16
  for key, params in FIXED_PARAMS.items():
    if key in arch:
      family = ("inception_resnet" if "resnet-v2" in key and "inception" in key else
                "resnet" if "resnet" in key or "wrn" in key else
                "inception" if "inception" in key else
                "nasnet" if "nasnet" in key or "amoeba" in key else
                "mobilenet_v2" if "mobilenet" in key else "mobilenet_v1")
      return family, params, GRAPH_FACTOR.get(key, 1.0)
  if "mobilenet-v1" in arch:
    return "mobilenet_v1", MOBILENET_V1["100"], 1.0
  return "mobilenet_v2", MOBILENET_V2["100"], 1.0  # Most rows without one are.


def schedule(costs: list[tuple[float, float]], workers: int, memory_mb: float) -> float:
  """Hours for `costs` [(seconds, peak MB)] on `workers` slots sharing
  `memory_mb`, largest first, a module waiting while the peaks running would
  not fit (one always runs): the batch's scheduler."""
  running: list[tuple[float, float]] = []  # (ends at, peak MB)
  now = 0.0
  for seconds, peak in sorted(costs, key=lambda c: -c[1]):
    while running and (len(running) >= workers or
                       sum(p for _, p in running) + peak > memory_mb):
      running.sort()
      now = max(now, running.pop(0)[0])
    running.append((now + seconds, peak))
  return max([end for end, _ in running] + [now]) / 3600


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("measured", help="tools/memory.py --json output (mode verify)")
  p.add_argument("--csv", default=DEFAULT_CSV)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--beam_workers", default="8,32")
  p.add_argument("--memory_gib", type=float, default=23.0, help="per machine, for the tool")
  p.add_argument("--fixed", type=float, default=None,
                 help="seconds / MB every module costs (default: 80%% of the smallest "
                      "measurement)")
  p.add_argument("--full_dir", default=None,
                 help="the measured modules (their graphs' sizes; default 2 MB each)")
  args = p.parse_args()
  args.graph_mb = {}
  for name, _ in MEASURED.values():
    graph = os.path.join(args.full_dir or "", name, "saved_model.pb")
    if args.full_dir and os.path.exists(graph):
      args.graph_mb[name] = os.path.getsize(graph) / 2**20
  with open(args.measured, encoding="utf-8") as f:
    results = {r["module"]: r for r in json.load(f)["results"]
               if r["mode"] == "verify" and r["returncode"] == 0}
  missing = [m for m, _ in MEASURED.values() if m not in results]
  if missing:
    print(f"not measured (or failed): {missing}", file=sys.stderr)
    return 2
  fixed_s = args.fixed or 0.8 * min(r["seconds"] for r in results.values())
  fixed_mb = 0.8 * min(r["peak_tree_rss_mb"] for r in results.values())
  with open(args.csv, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  per_family = collections.defaultdict(list)
  costs = []
  for row in rows:
    family, params, graph_factor = classify(row)
    if family == "refused":
      cost = (5.0, fixed_mb)
    else:
      name, measured_params = MEASURED[family]
      r = results[name]
      # What a module costs beyond `fixed` is split between its variables and
      # its graph as the batch's memory estimate weighs them (15 and 300
      # bytes per byte: batch.estimated_peak_bytes), each scaled by the
      # variant's own size.
      v, g = 15 * r["variables_mb"], 300 * args.graph_mb.get(name, 2.0)
      scale = (v * params / measured_params + g * graph_factor) / (v + g)
      cost = (fixed_s + (r["seconds"] - fixed_s) * scale,
              fixed_mb + (r["peak_tree_rss_mb"] - fixed_mb) * scale)
    per_family[family].append(cost)
    costs.append(cost)
  memory_mb = args.memory_gib * 1024
  print("| family | modules | measured as | CPU-hours (one worker each) | largest peak, GB |")
  print("| --- | --- | --- | --- | --- |")
  for family, c in sorted(per_family.items(), key=lambda kv: -sum(s for s, _ in kv[1])):
    measured = MEASURED.get(family, ("-",))[0]
    print(f"| {family} | {len(c)} | {measured} | {sum(s for s, _ in c) / 3600:.2f} | "
          f"{max(m for _, m in c) / 1024:.1f} |")
  too_big = [c for c in costs if c[1] > memory_mb]
  print(f"\n{len(costs)} modules; {sum(s for s, _ in costs) / 3600:.1f} hours of one worker; "
        f"{len(too_big)} with an estimated peak above {args.memory_gib:.0f} GiB")
  print(f"one machine, {args.workers} workers: "
        f"{schedule(costs, args.workers, memory_mb):.1f} h")
  for n in (int(v) for v in args.beam_workers.split(",")):
    # Each Beam worker is a machine like this one running `--workers` modules.
    slots = n * args.workers
    hours = schedule(costs, slots, memory_mb * n)
    print(f"Beam, {n} workers of {args.workers} cores: {hours:.2f} h "
          f"(the largest module alone: {max(s for s, _ in costs) / 3600:.2f} h)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
