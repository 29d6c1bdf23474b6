"""Every consumer of the converted model computes the goldens (issue 12).

Each convertible fixture is converted once (`convert_cached`) and run
through each runner of `migrate/consumers.py`: the TF1 loader in a Session,
the C++ loader through TensorFlow's C API, TFLite, Keras 3's `TFSMLayer` and
tf_keras' `hub.KerasLayer`, plus the real `saved_model_cli run`. Expected
values are the goldens recorded by `hub.Module` (legacy_fixtures/goldens),
never this converter's own outputs; tolerances come from
`migrate/tolerances.py` through `migrate/compare.py`.
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
from migrate import legacy_format
from tests import conftest

NAMES = conftest.convertible_fixture_names()


def _fake_quant(name: str) -> bool:
  module = legacy_format.read_module(conftest.module_path(name))
  return any(node.op.startswith("FakeQuant") for v in module.variants.values()
             for node in v.graph_def.node)


class _Fixture:
  """A converted fixture, its goldens, and each consumer's result (run once)."""

  def __init__(self, name: str, path: str):
    self.name = name
    self.path = path
    self.meta = conftest.golden_meta(name)
    self.gold = conftest.golden_arrays(name)
    self.fake_quant = _fake_quant(name)
    model = tf.saved_model.load(path)
    self.signature = model.metadata.source_signature.numpy().decode()
    self.output_key = model.metadata.source_output_key.numpy().decode()
    self.trainable = sorted(v.name.rsplit(":", 1)[0]
                            for v in model.trainable_variables)
    self.inputs = {
        tag: {"images": self.gold[f"images/{tag}"],
              **{k: np.float32(v) for k, v in self.meta["infer_feeds"].items()}}
        for tag in self.meta["batches"]}
    self.train_images = self.gold["images/" + self.meta["train_batch"]]
    self._results: dict[str, consumers.ConsumerResult] = {}

  def tolerance(self, entry: str) -> str:
    return f"{entry}_fake_quant" if self.fake_quant else entry

  def result(self, consumer: str) -> consumers.ConsumerResult:
    if consumer not in self._results:
      run = consumers.CONSUMERS[consumer].run
      if consumer in ("keras3_tfsm_layer", "tf_keras_hub_layer"):
        self._results[consumer] = run(self.path, self.inputs,
                                      fit_images=self.train_images)
      else:
        self._results[consumer] = run(self.path, self.inputs)
    return self._results[consumer]

  def golden_key(self, signature: str, key: str, tag: str) -> str:
    if signature in (consumers.SERVING_DEFAULT, build.SERVE_ENDPOINT, "__call__"):
      if key == consumers.CALL_OUTPUT:
        key = self.output_key
      signature = self.signature
    return f"infer/{signature}/{key}/{tag}"

  def check_outputs(self, result: consumers.ConsumerResult,
                    tolerance: str = "golden_inference") -> int:
    assert result.ran, f"{result.consumer}: {result.not_applicable or result.error}"
    checked = 0
    for (signature, tag), outputs in sorted(result.outputs.items()):
      assert outputs, (signature, tag)
      for key, value in outputs.items():
        check = compare.compare(
            f"{result.consumer}/{signature}/{key}/{tag}", value,
            self.gold[self.golden_key(signature, key, tag)],
            self.tolerance(tolerance))
        assert check.passed, str(check)
        checked += 1
    return checked

  def check_fit(self, result: consumers.ConsumerResult) -> None:
    fit = result.fit
    assert fit is not None, result.consumer
    assert not fit.no_gradient_warnings, fit.no_gradient_warnings
    assert fit.trainable == self.trainable, (
        f"{result.consumer} trains other variables than trainable_variables")
    assert fit.moved, "fit() changed no weight"
    if self.meta["train_signatures"]:
      expected = {var: self.gold[f"moving_after/{var}"]
                  for var in self.meta["non_trainable_variables"]}
    else:  # No train graph: training changes nothing (the module's values).
      reader = tf.train.load_checkpoint(os.path.join(
          conftest.module_path(self.name), "variables", "variables"))
      expected = {var: reader.get_tensor(var)
                  for var in self.meta["non_trainable_variables"]}
    actual = {n: fit.non_trainable_after[n] for n in expected}
    check = compare.compare_many(f"{result.consumer}/fit/moving_averages",
                                 actual, expected,
                                 self.tolerance("golden_moving_averages"))
    assert check.passed, str(check)


@pytest.fixture(scope="module")
def fixture(convert_cached):
  cache: dict[str, _Fixture] = {}

  def get(name: str) -> _Fixture:
    if name not in cache:
      cache[name] = _Fixture(name, convert_cached(name))
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


@pytest.mark.parametrize("consumer", ["keras3_tfsm_layer", "tf_keras_hub_layer"])
@pytest.mark.parametrize("name", NAMES)
def test_keras_predicts_and_fits_like_the_goldens(fixture, name, consumer):
  f = fixture(name)
  result = f.result(consumer)
  assert f.check_outputs(result) == len(f.meta["batches"])
  f.check_fit(result)


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
  previous = os.umask(umask)
  try:
    dst = str(tmp_path / "out")
    convert.convert(conftest.module_path("classifier_probabilities"), dst,
                    verify=False)
  finally:
    os.umask(previous)
  modes = _modes(dst)
  assert "saved_model.pb" in modes and "variables" in modes
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
