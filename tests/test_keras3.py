"""The native Keras 3 output (`migrate-hub-module SRC DST.keras`).

Against the goldens recorded by `hub.Module` (TF 2.15, graph mode), in a
fresh process per Keras backend (KERAS_BACKEND fixed before Keras is
imported), each loading the .keras files with `keras.saving.load_model(path,
safe_mode=True)` and no custom objects: outputs at every recorded batch and
resolution, one training call's output and moving averages and the gradients
of the goldens' probe (the model's Dropout layers fed the random values
hub.Module drew, as verification feeds the TF1 Session's: drop path feeds
later batch norms), `model.losses`, and fine-tuning with `model.fit`. Backends that are not installed are
skipped with the reason. The verification (`keras_verify`) runs on all
backends through the CLI for one module, and is shown to fail on a tampered
model; FakeQuant modules are refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from tests import conftest

from migrate import compare
from migrate import keras_format
from migrate import keras_side

# Committed fixtures a .keras output refuses, and the op it names.
REFUSED = {"mobilenet_quantops": "FakeQuantWithMinMaxVars"}
KERAS_FIXTURES = tuple(n for n in conftest.convertible_fixture_names()
                       if n not in REFUSED)
INSTALLED = keras_side.installed_backends()


def _backend_param(backend: str):
  return pytest.param(backend, marks=pytest.mark.skipif(
      backend not in INSTALLED,
      reason=f"Keras backend {backend} is not installed (pip install "
             f"'migrate-hub-module[keras]')"), id=backend)


BACKENDS = [_backend_param(b) for b in keras_side.BACKENDS]


@pytest.fixture(scope="module")
def keras_models(tmp_path_factory):
  """name -> (path of the .keras file, its KerasPlan): converted once, unverified."""
  from migrate import convert  # pylint: disable=g-import-not-at-top
  from migrate import keras_translate
  from migrate import legacy_format
  from migrate import plan as plan_lib
  out = tmp_path_factory.mktemp("keras3")
  models = {}
  for name in KERAS_FIXTURES:
    dst = str(out / f"{name}.keras")
    convert.convert(conftest.module_path(name), dst, verify=False)
    module = legacy_format.read_module(conftest.module_path(name))
    models[name] = (dst, keras_translate.translate(module, plan_lib.make_plan(module)))
  return models


def _golden_case(name: str, path: str, kplan) -> dict:
  """What keras3_child.golden_run needs for one fixture: the goldens' images,
  the random values hub.Module drew (fed to the model's Dropout layers as
  verification feeds the TF1 Session's), and the probe of its gradients."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  meta, arrays = conftest.golden_meta(name), conftest.golden_arrays(name)
  train_images = arrays[f"images/{meta['train_batch']}"]
  # Seeded by the op's name: every signature's application drew the same values.
  random_values = {op: arrays[f"train_random/{s}/{op}"]
                   for s, ops in meta["random_ops"].items() for op in ops}
  grad = f"{meta['grad_signature']}/{meta['grad_output_key']}"
  return {"name": name, "path": path,
          "images": {t: arrays[f"images/{t}"] for t in meta["batches"]},
          "train": train_images if meta["train_signatures"] else None,
          "fit": arrays[f"images/{meta['batches'][0]}"],
          "layers": [dataclasses.asdict(s) for s in kplan.layers],
          "output": kplan.output, "random_values": random_values,
          "variables": {v: list(w) for v, w in kplan.variables.items()},
          "grad_output": kplan.outputs.get(grad, "") if "grad_probe" in arrays else "",
          "grad_images": train_images, "probe": arrays.get("grad_probe")}


def _in_backend(backend: str, fn: str, *args):
  from migrate import keras_verify  # pylint: disable=g-import-not-at-top
  call = keras_verify.start_with_backend(backend, fn, *args, what=f"test on {backend}")
  try:
    return call.result()
  finally:
    call.cancel()


@pytest.mark.parametrize("backend", BACKENDS)
def test_goldens_on_each_backend(backend, keras_models):
  """hub.Module's goldens, reproduced by each fixture's .keras file in a
  fresh process with KERAS_BACKEND=backend."""
  cases = [_golden_case(n, p, k) for n, (p, k) in sorted(keras_models.items())]
  results = _in_backend(backend, "tests.keras3_child:golden_run", backend, cases)
  assert results["backend"] == backend
  failures, lines = [], []
  for name, (_, kplan) in sorted(keras_models.items()):
    meta, golden = conftest.golden_meta(name), conftest.golden_arrays(name)
    r = results[name]
    sig, key = _signature(kplan, meta)
    checks = [compare.compare_many(
        "outputs", r["outputs"],
        {t: golden[f"infer/{sig}/{key}/{t}"] for t in meta["batches"]},
        "golden_inference")]
    checks.append(compare.compare(
        "model.losses", np.float32(r["losses_total"]),
        golden["regularization_loss"], "golden_regularization"))
    if "train_output" in r:
      checks.append(compare.compare("training output", r["train_output"],
                                    _golden_training_output(golden, sig, key),
                                    "golden_training"))
      checks.append(_moving_averages(kplan, r, golden))
    if "gradients" in r:
      checks.append(_gradient_norms(kplan, r, golden))
    unfed = r.get("unfed", []) + r.get("grad_unfed", [])
    checks.append(compare.check(
        "fed", not unfed, f"Dropout layers drew their own masks: {unfed[:3]}"
        if unfed else "every Dropout got the goldens' random values"))
    fit = r["fit"]
    moving = {p for p in fit["moving_averages"]}
    frozen = kplan.frozen_batch_norm
    checks.append(compare.check(
        "fit", fit["finite"] and len(set(fit["moved"]) & set(fit["trainable"]))
        >= len(fit["trainable"]) // 2 and (frozen or moving <= set(fit["moved"])),
        f"{len(set(fit['moved']) & set(fit['trainable']))}/{len(fit['trainable'])} "
        f"trainable weights and {len(moving & set(fit['moved']))}/{len(moving)} "
        f"moving averages moved; losses {fit['loss']}"))
    for c in checks:
      lines.append(f"{name:26s} {c.name:17s} max_abs "
                   f"{c.max_abs_err if c.max_abs_err is not None else '-'}; {c.detail}")
      if not c.passed:
        failures.append(f"{name}: {c}")
  print("\n".join(lines))
  assert not failures, "\n".join(failures)


def _signature(kplan, meta) -> tuple[str, str]:
  """The signature and output key the default conversion exposes."""
  sig = meta["default_signature_aliases"] or "default"
  keys = list(meta["signatures"][sig]["outputs"])
  return sig, ("default" if "default" in keys else keys[0])


def _golden_training_output(golden, sig, key):
  """What the train graph output on the train batch with the goldens' random
  values: the dropout's input where the converter removes an output dropout."""
  nodrop = f"train_nodropout/{sig}/{key}"
  return golden[nodrop] if nodrop in golden else golden[f"train/{sig}/{key}"]


def _gradient_norms(kplan, r, golden) -> compare.CheckResult:
  """grad_norm/ (the goldens' gradients of sum(output * grad_probe) for the
  gradient signature's output) against the Keras model's, per variable the
  model trains (a module without a train graph has frozen batch norms)."""
  trainable = {v for v, (layer, _) in kplan.variables.items()
               if kplan.layer(layer).trainable}
  expected = {n[len("grad_norm/"):]: v for n, v in golden.items()
              if n.startswith("grad_norm/") and n[len("grad_norm/"):] in trainable}
  actual = {v: np.float32(np.linalg.norm(g.astype(np.float64)))
            for v, g in r["gradients"].items()}
  return compare.compare_many(
      "gradient norms", actual, expected, "golden_gradient_norms",
      scale=max([float(v) for v in expected.values()] + [1e-30]))


def _moving_averages(kplan, r, golden) -> compare.CheckResult:
  """moving_after/ against the Keras model's after one training call, with
  Bessel's correction taken out of the variances (keras_verify explains)."""
  from migrate import keras_verify  # pylint: disable=g-import-not-at-top
  by_layer = {(layer, weight): var for var, (layer, weight) in kplan.variables.items()}
  actual, tf1, before = {}, {}, {}
  for name, value in r["moving_after"].items():
    layer, weight = name.rsplit("/", 1)
    var = by_layer[(layer, weight)]
    actual[var] = value
    tf1[var] = golden[f"moving_after/{var}"]
    before[var] = golden[f"moving_before/{var}"]
  changed = {v: x for v, x in tf1.items() if not np.array_equal(x, before[v])}
  want = keras_verify.moving_expectation(kplan, changed, before, r["counts"])
  result = compare.compare_many(
      "moving averages", actual, {v: want.get(v, before[v]) for v in actual},
      "golden_moving_averages")
  raw = max((float(np.max(np.abs(actual[v] - tf1[v]) / np.abs(tf1[v])))
             for v in actual), default=0.0)
  result.detail += f"; unadjusted, the moving variances differ by {raw:.2e} relative"
  return result


def _cli(*args, timeout=900):
  return subprocess.run(
      [sys.executable, "-m", "migrate.cli", *args], capture_output=True,
      text=True, timeout=timeout, cwd=conftest.REPO,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def test_cli_converts_and_verifies_on_every_backend(tmp_path):
  """The whole path through the CLI: one parity row per installed backend,
  the file in place and loadable; the report says what is compared."""
  dst, report = tmp_path / "m.keras", tmp_path / "report.json"
  r = _cli(conftest.module_path("mobilenet_v1_bn_hparams"), str(dst),
           f"--report={report}")
  assert r.returncode == 0, r.stderr + r.stdout
  data = json.loads(report.read_text())
  assert data["passed"]
  names = {c["name"] for c in data["checks"]}
  for backend in INSTALLED:
    for check in ("keras/load", "call/inference", "train/output",
                  "train/moving_averages", "train/gradients",
                  "regularization/values", "regularization/total"):
      assert f"{check}[{backend}]" in names, (check, backend)
  assert any("biased batch variance" in w for w in data["warnings"])
  assert "batch_norm_momentum" in r.stdout  # The note on the fixed momentum.
  meta = keras_format.read_metadata(str(dst))
  assert meta["signature"] == "image_feature_vector" and meta["source_sha256"]
  assert sorted(os.listdir(tmp_path)) == ["m.keras", "report.json"]


def test_fed_output_dropout_and_existing_pair(tmp_path):
  """inception_v3_tiny with --keep_output_dropout: the output depends on the
  dropout, whose masks are fed from the TF1 Session (TensorFlow backend)."""
  from migrate import convert  # pylint: disable=g-import-not-at-top
  from migrate import keras_convert
  dst = str(tmp_path / "v3.keras")
  result = keras_convert.convert_keras(
      conftest.module_path("inception_v3_tiny"), dst, keep_output_dropout=True,
      backends=("tensorflow",))
  assert result.parity.passed, result.parity.format_table()
  assert result.parity.method_for_random_ops.startswith("fed")
  assert result.parity.check("train/output[tensorflow]").max_abs_err < 1e-4
  again = convert.verify_existing(conftest.module_path("inception_v3_tiny"), dst)
  assert again.passed, again.format_table()


def test_verification_fails_on_a_tampered_model(tmp_path, keras_models):
  """A model that differs from the module (a nudged kernel, another
  momentum) fails the checks that see it."""
  path, _ = keras_models["refvars_bn"]
  bad = tmp_path / "bad.keras"
  script = (
      "import keras, sys, zipfile\n"
      f"m = keras.saving.load_model({path!r})\n"
      "conv = [l for l in m.layers if type(l).__name__ == 'Conv2D'][0]\n"
      "conv.kernel.assign(conv.kernel + 1e-2)\n"
      "bn = [l for l in m.layers if type(l).__name__ == 'BatchNormalization'][0]\n"
      "bn.momentum = 0.5\n"
      f"m.save({str(bad)!r})\n"
      f"src = zipfile.ZipFile({path!r})\n"
      f"with zipfile.ZipFile({str(bad)!r}, 'a') as z:\n"
      f"  z.writestr({keras_format.METADATA_MEMBER!r}, src.read({keras_format.METADATA_MEMBER!r}))\n")
  subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                 env=dict(os.environ, KERAS_BACKEND="tensorflow"))
  from migrate import keras_verify  # pylint: disable=g-import-not-at-top
  report = keras_verify.verify_existing(conftest.module_path("refvars_bn"),
                                        str(bad), backends=("tensorflow",))
  failed = {c.name for c in report.failures}
  # The configuration differs (momentum): the structure check stops there.
  assert failed == {"keras/load[tensorflow]"}, report.format_table()
  assert "momentum=0.5" in report.first_failure.detail
  subprocess.run([sys.executable, "-c", script.replace("bn.momentum = 0.5\n", "")],
                 check=True, capture_output=True,
                 env=dict(os.environ, KERAS_BACKEND="tensorflow"))
  report = keras_verify.verify_existing(conftest.module_path("refvars_bn"),
                                        str(bad), backends=("tensorflow",))
  failed = {c.name.split("[")[0] for c in report.failures}
  assert {"variables/values", "call/inference", "train/output",
          "train/moving_averages", "train/gradient_norms"} <= failed, (
              report.format_table())


def test_fake_quant_is_refused_before_anything_is_written(tmp_path, convert_cached):
  """Exit code 5, one line naming the op and the node; nothing at or beside
  DST; the same module still converts to a SavedModel."""
  dst = tmp_path / "q.keras"
  r = _cli(conftest.module_path("mobilenet_quantops"), str(dst))
  assert r.returncode == 5, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in r.stderr
  assert REFUSED["mobilenet_quantops"] in lines[0] and "node '" in lines[0]
  assert os.listdir(tmp_path) == []
  assert os.path.isfile(os.path.join(convert_cached("mobilenet_quantops"),
                                     "saved_model.pb"))


def test_format_flag_must_match_the_destination(tmp_path):
  r = _cli(conftest.module_path("refvars_bn"), str(tmp_path / "out"),
           "--format=keras")
  assert r.returncode == 2 and "must end in .keras" in r.stderr


def test_batch_writes_keras_files(tmp_path):
  """`batch --format=keras`: DST_ROOT/<module>.keras, refusals per module,
  and a rerun skips what is up to date."""
  src = tmp_path / "src"
  for name in ("classifier_probabilities", "mobilenet_quantops"):
    shutil.copytree(conftest.module_path(name), src / name)
  dst = tmp_path / "dst"
  report = tmp_path / "batch.json"
  args = ["batch", str(src), str(dst), "--format=keras", "--noverify",
          "--jobs=1", f"--report={report}"]
  r = _cli(*args)
  assert r.returncode == 10, r.stderr
  modules = {os.path.basename(m["source"]): m for m in
             json.loads(report.read_text())["modules"]}
  assert modules["classifier_probabilities"]["status"] == "converted"
  assert modules["mobilenet_quantops"]["exit_code"] == 5
  assert zipfile.is_zipfile(dst / "classifier_probabilities.keras")
  assert not (dst / "mobilenet_quantops.keras").exists()
  r = _cli(*args)
  modules = {os.path.basename(m["source"]): m for m in
             json.loads(report.read_text())["modules"]}
  assert modules["classifier_probabilities"]["status"].startswith("skipped")


FULL = ("resnet_v2_50", "inception_v3", "mobilenet_v2_100", "mobilenet_v1_100",
        "inception_resnet_v2", "nasnet_mobile", "efficientnet_b0",
        "efficientnet_b0_defun_swish")


@pytest.mark.parametrize("name", FULL)
def test_full_size_module(name, tmp_path):
  """The full-size generators' modules (legacy_fixtures/generate.py --full):
  converted and verified on every installed backend."""
  src = os.path.join(conftest.FIXTURES, "full", name)
  if not os.path.isdir(src):
    pytest.skip(f"{src} is absent (make it with the legacy venv: "
                f"generate.py --full {name})")
  from migrate import keras_convert  # pylint: disable=g-import-not-at-top
  result = keras_convert.convert_keras(src, str(tmp_path / f"{name}.keras"))
  print(result.parity.format_table())
  assert result.parity.passed, result.parity.format_table()


def test_uneven_average_pool_is_exact():
  """TF's AvgPool with SAME padding averages over the input values only. Where
  the padding is uneven (3x3 stride 2 on an even size), Keras 3.15's
  AveragePooling2D('same') counts replicated edges on PyTorch; the pattern
  `avg_pool_uneven` builds it of VALID pools instead. Translated and built
  as a conversion does, against tf.nn.avg_pool2d at odd and even sizes (the
  golden test runs nasnet_cell_droppath's on every backend); an input of
  unknown size is refused, one whose padding is even everywhere is not."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from migrate import keras_build
  from migrate import keras_patterns
  from migrate import keras_translate
  import keras

  def pool_graph(shape, k, s):
    with tf.Graph().as_default() as g:
      x = tf.compat.v1.placeholder(tf.float32, shape, name="images")
      tf.nn.avg_pool2d(x, k, s, "SAME", name="pool")
    return keras_patterns.Graph(g.as_graph_def(add_shapes=True))

  rng = np.random.default_rng(0)
  for h, w in ((8, 8), (7, 10), (16, 9)):
    for k, s in ((3, 2), (2, 1), (3, 1), (2, 2), (3, 3), (1, 2)):
      t = keras_translate._Translator(pool_graph([None, h, w, 3], k, s),
                                      "images:0", set())
      out = t.translate("pool:0")
      x = keras.Input((h, w, 3), name=keras_translate.INPUT)
      y, _ = keras_side.wire([dataclasses.asdict(l) for l in t.layers], out, x,
                             lambda spec, v: keras_build.make_layer(
                                 keras_translate.LayerSpec(**spec), {})(v))
      images = rng.normal(size=(2, h, w, 3)).astype(np.float32)
      want = tf.nn.avg_pool2d(images, k, s, "SAME").numpy()
      have = keras.ops.convert_to_numpy(keras.Model(x, y)(images))
      uneven = any(p.pattern == "avg_pool_uneven" for p in t.layers)
      assert uneven == any((-(-n // s) - 1) * s + k - n > 0 and
                           ((-(-n // s) - 1) * s + k - n) % 2 for n in (h, w)), (h, w, k, s)
      np.testing.assert_allclose(have, want, rtol=1e-6, atol=1e-6,
                                 err_msg=f"{h}x{w}, pool {k}, stride {s}")
  with pytest.raises(keras_patterns.Refusal, match="unknown size"):
    keras_translate._Translator(pool_graph([None, None, None, 3], 3, 2),
                                "images:0", set()).translate("pool:0")
  t = keras_translate._Translator(pool_graph([None, None, None, 3], 3, 1),
                                  "images:0", set())
  t.translate("pool:0")
  assert [(l.cls, l.config["padding"]) for l in t.layers] == [("AveragePooling2D", "same")]


def test_readme_lists_every_pattern():
  """The README's translation table names every entry of the pattern table."""
  from migrate import keras_patterns  # pylint: disable=g-import-not-at-top
  with open(os.path.join(conftest.REPO, "README.md"), encoding="utf-8") as f:
    section = f.read().split("## Native Keras 3 output")[1].split("\n## ")[0]
  listed = {name.strip() for line in section.splitlines()
            if line.startswith("| ") for name in line.split("|")[1].split(",")}
  names = {p.name for p in keras_patterns.PATTERNS + keras_patterns.DEFUN_PATTERNS}
  assert names <= listed, sorted(names - listed)
