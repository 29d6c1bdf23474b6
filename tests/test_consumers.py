"""Every consumer of the converted model computes the goldens (issue 12).

Each convertible fixture is converted once (`convert_cached`) and verified
once with every consumer run (`verify(..., consumers="all")`, the
`verified_all` fixture of conftest): the TF1 loader in a Session, the C++
loader through TensorFlow's C API, TFLite, Keras 3's `TFSMLayer` and
tf_keras' `hub.KerasLayer`, with a fit step through each Keras layer. Each
of those runs also gets the goldens' inputs, in the same load of the model,
so one run per consumer and fixture gives both: the verification's row
(against the TF1 module in a Session, on its seeded inputs) and the
comparison with the goldens recorded by `hub.Module` (legacy_fixtures/goldens),
never with this converter's own outputs. A fit step is compared with the
module's training step on the same images in its verification row (the
goldens' training step ran on other images). Plus the real `saved_model_cli
run`. Tolerances come from `migrate/tolerances.py` through
`migrate/compare.py`.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from migrate import build
from migrate import compare
from migrate import consumers
from migrate import convert
from migrate import graph_rewrite
from migrate import legacy_format
from migrate import verify_spec
from tests import conftest

NAMES = conftest.convertible_fixture_names()
KERAS = ["keras3_tfsm_layer", "tf_keras_hub_layer"]


class _Fixture:
  """A converted fixture, its goldens, and its verification with every
  consumer (`conftest.Verified`, run once)."""

  def __init__(self, name: str, path: str, verified: conftest.Verified):
    self.name = name
    self.path = path
    self.verified = verified
    self.meta = conftest.golden_meta(name)
    self.gold = conftest.golden_arrays(name)
    self.module = legacy_format.read_module(conftest.module_path(name))
    self.fake_quant = verify_spec.has_fake_quant(self.module)
    model = tf.saved_model.load(path)
    self.signature = model.metadata.source_signature.numpy().decode()
    self.output_key = model.metadata.source_output_key.numpy().decode()
    self.trainable = sorted(v.name.rsplit(":", 1)[0]
                            for v in model.trainable_variables)
    self.inputs = {tag[len(conftest.Verified.GOLDEN):]: values
                   for tag, values in verified.golden_inputs.items()}
    self.train_images = self.gold["images/" + self.meta["train_batch"]]

  def tolerance(self, entry: str) -> str:
    return f"{entry}_fake_quant" if self.fake_quant else entry

  def result(self, consumer: str) -> consumers.ConsumerResult:
    return self.verified.result(consumer)

  def row(self, name: str) -> compare.CheckResult:
    assert self.verified.report is not None, self.verified.error
    return self.verified.report.check(name)

  def golden_key(self, signature: str, key: str, tag: str) -> str:
    if signature in (consumers.SERVING_DEFAULT, build.SERVE_ENDPOINT, "__call__"):
      if key == consumers.CALL_OUTPUT:
        key = self.output_key
      signature = self.signature
    return f"infer/{signature}/{key}/{tag}"

  def check_outputs(self, result: consumers.ConsumerResult,
                    tolerance: str = "golden_inference") -> int:
    """Compares the outputs on the goldens' inputs with the goldens."""
    assert result.ran, f"{result.consumer}: {result.not_applicable or result.error}"
    checked = 0
    for (signature, tag), outputs in sorted(result.outputs.items()):
      if not tag.startswith(conftest.Verified.GOLDEN):
        continue  # The verification's own inputs: its row compares them.
      tag = tag[len(conftest.Verified.GOLDEN):]
      assert outputs, (signature, tag)
      for key, value in outputs.items():
        check = compare.compare(
            f"{result.consumer}/{signature}/{key}/{tag}", value,
            self.gold[self.golden_key(signature, key, tag)],
            self.tolerance(tolerance))
        assert check.passed, str(check)
        checked += 1
    return checked


@pytest.fixture(scope="module")
def fixture(convert_cached, verified_all):
  cache: dict[str, _Fixture] = {}

  def get(name: str) -> _Fixture:
    if name not in cache:
      cache[name] = _Fixture(name, convert_cached(name), verified_all(name))
    return cache[name]

  return get


@pytest.mark.parametrize("name", NAMES)
def test_tf1_loader_runs_every_signature_like_the_goldens(fixture, name):
  f = fixture(name)
  result = f.result("tf1_loader")
  checked = f.check_outputs(result)
  infer_keys = [k for k in f.gold if k.startswith("infer/")]
  served = set(f.meta["signatures"]) | {consumers.SERVING_DEFAULT}
  assert {s for s, _ in result.outputs} == served
  default_keys = len(f.meta["signatures"][f.signature]["outputs"]) * len(f.meta["batches"])
  assert checked == len(infer_keys) + default_keys


@pytest.mark.parametrize("consumer", ["c_api_loader", "tflite"])
@pytest.mark.parametrize("name", NAMES)
def test_serving_default_through_the_consumer_gives_the_goldens(fixture, name, consumer):
  f = fixture(name)
  result = f.result(consumer)
  tolerance = "consumer_tflite" if consumer == "tflite" else "golden_inference"
  assert f.check_outputs(result, tolerance) == (
      len(f.meta["signatures"][f.signature]["outputs"]) * len(f.meta["batches"]))


@pytest.mark.parametrize("consumer", KERAS)
@pytest.mark.parametrize("name", NAMES)
def test_keras_predicts_like_the_goldens(fixture, name, consumer):
  f = fixture(name)
  assert f.check_outputs(f.result(consumer)) == len(f.meta["batches"])


ROWS = ["tf1_loader", "c_api_loader", "tflite", "keras3_tfsm_layer",
        "tf_keras_hub_layer"]


@pytest.mark.parametrize("name", NAMES)
def test_verification_has_a_passing_row_per_consumer(fixture, name):
  f = fixture(name)
  report = f.verified.report
  assert report is not None, f.verified.error
  for consumer in ROWS:
    row = f.row(f"consumer/{consumer}")
    assert row.passed, str(row)
    assert row.detail.endswith("within tolerance"), row.detail  # Compared.
  assert report.consumers_ran == list(consumers.selected("all").ran)
  assert report.consumers_skipped == []
  assert "skipped as expensive" not in report.format_table()


@pytest.mark.parametrize("consumer", KERAS)
@pytest.mark.parametrize("name", NAMES)
def test_keras_fit_step_trains_like_the_module(fixture, name, consumer):
  # One fit step through the layer (Keras 3: the `call_training` endpoint;
  # tf_keras: hub.KerasLayer(trainable=True)) on the verification's
  # training images, against the TF1 module's training step on them.
  f = fixture(name)
  row = f.row(f"consumer/{consumer}/fit")
  assert row.passed, str(row)
  fit = f.result(consumer).fit
  assert not fit.no_gradient_warnings, fit.no_gradient_warnings
  assert fit.trainable == f.trainable
  assert fit.moved
  # Moving averages after a random op (drop path, drop connect) are only
  # "moved and finite" (the fit draws its own random values); every other
  # variable, and every one of a deterministic module, is compared.
  random = graph_rewrite.random_updated_variables(
      (f.module.train or f.module.inference).graph_def,
      (f.module.train or f.module.inference).update_ops)
  exact = len(f.meta["variables"]) - len(f.trainable) - len(random)
  assert row.detail.startswith(f"{exact} entries within tolerance"), row.detail
  assert ("moved and finite" in row.detail) == bool(random)


# Fixtures whose training path has random ops (golden meta "random_ops"),
# and whether a batch norm comes after one.
@pytest.mark.parametrize("name,after_random", [
    ("nasnet_cell_droppath", True), ("efficientnet_defun_swish", True),
    ("efficientnet_tf2_swish", True), ("inception_v2_tiny", False),
    ("mobilenet_v1_bn_hparams", False), ("resnet_v2_tiny", False)])
def test_moving_averages_after_random_ops_are_found(name, after_random):
  module = legacy_format.read_module(conftest.module_path(name))
  train = module.train
  random = graph_rewrite.random_updated_variables(train.graph_def, train.update_ops)
  meta = conftest.golden_meta(name)
  assert bool(random) == after_random
  assert random <= set(meta["non_trainable_variables"])
  if after_random:  # The module's own record: random ops on its training path.
    assert any(meta["random_ops"].values())
    assert len(random) < len(meta["non_trainable_variables"])  # Not all of them.


@pytest.mark.parametrize("name", ["nasnet_cell_droppath", "efficientnet_defun_swish"])
def test_a_fit_step_after_random_ops_moves_the_rest_like_the_goldens(fixture, name):
  # The rule of the fit rows, on the goldens (hub.Module's training step with
  # its recorded random draws) and their training images: drop path /
  # drop connect moving averages move and stay finite; all others equal the
  # goldens. (The fit rows of test_keras_fit_step_trains_like_the_module
  # prove it against the module's own step.)
  f = fixture(name)
  train = f.module.train
  random = graph_rewrite.random_updated_variables(train.graph_def, train.update_ops)
  result = consumers.keras3_tfsm_layer(
      f.path, {"b1": {"images": f.train_images[:1]}}, fit_images=f.train_images)
  fit = result.fit
  assert fit is not None, result.error
  exact = [n for n in f.meta["non_trainable_variables"] if n not in random]
  check = compare.compare_many(
      "fit/moving_averages", {n: fit.non_trainable_after[n] for n in exact},
      {n: f.gold[f"moving_after/{n}"] for n in exact},
      f.tolerance("golden_moving_averages"))
  assert check.passed, str(check)
  for n in random:
    after = fit.non_trainable_after[n]
    assert np.isfinite(after).all(), n
    assert not np.array_equal(after, f.gold[f"moving_before/{n}"]), n


@pytest.mark.parametrize("name", NAMES)
def test_every_trainable_variable_gets_a_gradient(fixture, name):
  f = fixture(name)
  model = tf.saved_model.load(f.path)
  with tf.GradientTape() as tape:
    out = model(tf.constant(f.train_images), training=True)
    loss = tf.reduce_sum(out * out)
  grads = tape.gradient(loss, model.trainable_variables)
  missing = [v.name for v, g in zip(model.trainable_variables, grads) if g is None]
  assert not missing, f"trainable variables without a gradient: {missing}"
  # The module's other trainable variables stay in `variables` and are
  # named in the model card.
  module_trainable = set(f.meta["trainable_variables"])
  left_out = sorted(module_trainable - set(f.trainable))
  assert set(f.trainable) <= module_trainable
  names = {v.name.rsplit(":", 1)[0] for v in model.variables}
  assert module_trainable <= names
  card = open(os.path.join(f.path, "MODEL_CARD.md"), encoding="utf-8").read()
  for var in left_out:
    assert var in card, f"{var} is left out of trainable_variables silently"


def test_a_feature_vector_leaves_the_classification_head_out(fixture):
  f = fixture("resnet_v2_tiny")
  assert "resnet_v2/logits/weights" in f.meta["trainable_variables"]
  assert "resnet_v2/logits/weights" not in f.trainable
  card = open(os.path.join(f.path, "MODEL_CARD.md"), encoding="utf-8").read()
  assert re.search(r"not in trainable_variables.*resnet_v2/logits/weights", card)
  # It still serves the classification signature (the TF1 loader's test
  # compares image_classification with its goldens too).
  model = tf.saved_model.load(f.path)
  out = model.signatures["image_classification"](
      images=tf.constant(f.inputs["b4_32x32"]["images"]))["default"]
  check = compare.compare("image_classification", out.numpy(),
                          f.gold["infer/image_classification/default/b4_32x32"],
                          "golden_inference")
  assert check.passed, str(check)


def _saved_model_cli() -> str:
  return os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


def test_saved_model_cli_run_gives_the_goldens(fixture, tmp_path):
  # The TF1 loader it uses runs every fixture in tf1_loader's test.
  f = fixture("resnet_v2_tiny")  # Variable size; an output key with a '/'.
  tag = f.meta["batches"][-1]
  np.save(tmp_path / "images.npy", f.inputs[tag]["images"])
  outdir = tmp_path / "out"
  keys = f.meta["signatures"][f.signature]["outputs"]
  for key in keys:  # saved_model_cli writes KEY.npy: 'a/b' needs outdir/a/.
    os.makedirs(os.path.dirname(outdir / f"{key}.npy"), exist_ok=True)
  proc = subprocess.run(
      [_saved_model_cli(), "run", "--dir", f.path, "--tag_set", "serve",
       "--signature_def", "serving_default",
       "--inputs", f"images={tmp_path / 'images.npy'}", "--outdir", str(outdir)],
      capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for key in keys:
    check = compare.compare(f"saved_model_cli/{key}", np.load(outdir / f"{key}.npy"),
                            f.gold[f"infer/{f.signature}/{key}/{tag}"],
                            f.tolerance("golden_inference"))
    assert check.passed, str(check)


def test_tflite_names_the_ops_it_cannot_express(tmp_path):
  class Unsupported(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, 3], tf.float32)])
    def __call__(self, images):
      return {"out": tf.math.erfinv(tf.clip_by_value(images, -0.5, 0.5))}

  model = Unsupported()
  path = str(tmp_path / "erfinv")
  tf.saved_model.save(model, path, signatures={"serving_default": model.__call__})
  images = np.full((1, 4, 4, 3), 0.25, np.float32)
  result = consumers.tflite(path, {"b1": {"images": images}})
  assert result.not_applicable == "not convertible to TFLite: op Erfinv"
  assert not result.error and not result.outputs
  # The other consumers still run it.
  served = consumers.tf1_loader(path, {"b1": {"images": images}})
  np.testing.assert_allclose(served.outputs[("serving_default", "b1")]["out"],
                             tf.math.erfinv(images).numpy(), rtol=1e-6)


def _modes(path: str) -> dict[str, int]:
  modes = {}
  for root, dirs, files in os.walk(path):
    for entry in [root] + [os.path.join(root, f) for f in files]:
      modes[os.path.relpath(entry, path)] = stat.S_IMODE(os.stat(entry).st_mode)
  return modes


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_permissions_follow_the_umask(tmp_path, umask):
  # A module whose files only their owner may read (an asset among them):
  # the output's modes come from the umask, not from SRC's.
  import shutil  # pylint: disable=g-import-not-at-top
  src = shutil.copytree(conftest.module_path("inference_only_asset"),
                        str(tmp_path / "src"))
  for root, _, files in os.walk(src):
    for name in files:
      os.chmod(os.path.join(root, name), 0o600)
  previous = os.umask(umask)
  try:
    dst = str(tmp_path / "out")
    convert.convert(src, dst, verify=False)
  finally:
    os.umask(previous)
  modes = _modes(dst)
  assert {"saved_model.pb", "variables", "assets/labels.txt"} <= set(modes)
  for entry, mode in modes.items():
    is_dir = os.path.isdir(os.path.join(dst, entry))
    expected = (0o777 if is_dir else 0o666) & ~umask
    assert mode == expected, f"{entry}: mode {oct(mode)}, expected {oct(expected)}"
  if umask == 0o022:  # Another account (a serving user) reads every file.
    assert all(mode & stat.S_IROTH for mode in modes.values())


# ---- The README's "Using the converted model" snippets, run as written

QUICK_START_DST = "/tmp/resnet_v2_tiny_tf2"  # The snippets' model path.


def _readme_snippets() -> list[tuple[str, str]]:
  with open(os.path.join(conftest.REPO, "README.md"), encoding="utf-8") as f:
    text = f.read()
  section = text.split("\n## Using the converted model\n", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


SNIPPETS = _readme_snippets()


@pytest.fixture(scope="module")
def snippet_dir(convert_cached, tmp_path_factory):
  """One working directory for the snippets, in README order (the ONNX
  model that one writes, the next reads)."""
  return str(tmp_path_factory.mktemp("readme")), convert_cached("resnet_v2_tiny")


def test_readme_shows_every_consumer():
  text = "\n".join(code for _, code in SNIPPETS)
  for needle in ["saved_model_cli run", "TFLiteConverter", "TFSMLayer(",
                 "call_training_endpoint", "hub.KerasLayer(", "TF_USE_LEGACY_KERAS=1",
                 "tf2onnx.convert"]:
    assert needle in text, needle


@pytest.mark.parametrize("index", range(len(SNIPPETS)),
                         ids=[f"{i}-{lang}" for i, (lang, _) in enumerate(SNIPPETS)])
def test_readme_snippet_runs(snippet_dir, monkeypatch, index):
  cwd, dst = snippet_dir
  lang, code = SNIPPETS[index]
  assert QUICK_START_DST in code or "model.onnx" in code, code
  code = code.replace(QUICK_START_DST, dst)
  if "tf2onnx" in code or "onnxruntime" in code:
    pytest.importorskip("tf2onnx", reason="tf2onnx is not installed (README: ONNX)")
  if lang == "python":
    monkeypatch.chdir(cwd)
    exec(compile(code, f"README.md snippet {index}", "exec"), {})  # pylint: disable=exec-used
    return
  assert lang == "sh", lang
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep +
             os.environ.get("PATH", ""))
  proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
