"""Parity of every converted fixture with the goldens recorded by hub.Module.

Each fixture of the corpus (the text module is refused, see test_convert) is
converted once; the converted model is then compared with the goldens of
`legacy_fixtures/goldens/` (see docs/CONTRACT.md) using the one comparison
helper and tolerance table, and `verify()` must pass on it.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

from migrate import compare
from migrate import legacy_format
from migrate import tolerances
from migrate import verify as verify_lib
from migrate import verify_random_ops
from migrate import verify_spec
from tests import conftest

NAMES = conftest.convertible_fixture_names()


@pytest.fixture(autouse=True)
def _deterministic_ops():
  """Op determinism on for each test here, as verify() has it.

  Some CPU kernels add the parts of a threaded reduction in the order they
  finish, so one run differs from the next by an ulp, which FakeQuant* ops
  can turn into a whole quantization step (mobilenet_quantops' training
  output against its golden: 2 distinct results in 30 runs). Only here:
  with determinism on, building a random op without a seed raises, which
  other tests (Keras fit) do.
  """
  previous = tf_config.is_op_determinism_enabled()
  tf_config.enable_op_determinism()
  yield
  if not previous:
    tf_config.disable_op_determinism()


def _assert_ok(result: compare.CheckResult) -> None:
  assert result.passed, str(result)


class _Converted:
  """A converted fixture, loaded once, with its goldens."""

  def __init__(self, name: str, path: str):
    self.name = name
    self.path = path
    self.model = tf.saved_model.load(path)
    self.meta = conftest.golden_meta(name)
    self.arrays = conftest.golden_arrays(name)
    self.variables = {v.name.rsplit(":", 1)[0]: v for v in self.model.variables}
    self.initial = {n: v.numpy() for n, v in self.variables.items()}

  def restore(self) -> None:
    for n, v in self.variables.items():
      v.assign(self.initial[n])

  def text(self, key: str) -> str:
    return self.model.metadata.__getattribute__(key).numpy().decode()

  @property
  def train_images(self) -> np.ndarray:
    return self.arrays["images/" + self.meta["train_batch"]]


@pytest.fixture(scope="module")
def converted(convert_cached):
  cache: dict = {}

  def get(name: str, **options) -> _Converted:
    key = (name, tuple(sorted(options.items())))
    if key not in cache:
      cache[key] = _Converted(name, convert_cached(name, **options))
    return cache[key]

  return get


def _hparam_feeds(meta, sig_inputs) -> dict[str, np.ndarray]:
  return {k: np.float32(v) for k, v in meta["infer_feeds"].items() if k in sig_inputs}


@pytest.mark.parametrize("name", NAMES)
def test_every_signature_output_matches_goldens(converted, name):
  c = converted(name)
  checked = 0
  for sig, info in c.meta["signatures"].items():
    fn = c.model.signatures[sig]
    for tag in c.meta["batches"]:
      inputs = {"images": tf.constant(c.arrays["images/" + tag])}
      inputs.update({k: tf.constant(v) for k, v in
                     _hparam_feeds(c.meta, info["inputs"]).items()})
      outputs = fn(**inputs)
      assert set(outputs) == set(info["outputs"]), sig
      for key, value in outputs.items():
        _assert_ok(compare.compare(f"{sig}/{key}/{tag}", value.numpy(),
                                   c.arrays[f"infer/{sig}/{key}/{tag}"],
                                   _tolerance(name, "golden_inference")))
        checked += 1
  assert checked == sum(k.startswith("infer/") for k in c.arrays)


@pytest.mark.parametrize("name", NAMES)
def test_call_matches_goldens(converted, name):
  c = converted(name)
  sig, key = c.text("source_signature"), c.text("source_output_key")
  for tag in c.meta["batches"]:
    out = c.model(tf.constant(c.arrays["images/" + tag]))
    _assert_ok(compare.compare(f"__call__/{tag}", out.numpy(),
                               c.arrays[f"infer/{sig}/{key}/{tag}"],
                               _tolerance(name, "golden_inference")))


def _train_expected(c: _Converted, sig: str, key: str) -> np.ndarray:
  if key in c.meta["nodropout"].get(sig, {}):
    return c.arrays[f"train_nodropout/{sig}/{key}"]
  if c.meta["train_signatures"]:
    return c.arrays[f"train/{sig}/{key}"]
  return c.arrays[f"infer/{sig}/{key}/{c.meta['train_batch']}"]


def _tolerance(name: str, entry: str) -> str:
  """`entry`, or its fake-quant variant for modules with FakeQuant* ops."""
  module = legacy_format.read_module(conftest.module_path(name))
  return tolerances.resolve(entry, fake_quant=verify_spec.has_fake_quant(module))


def _training_call(c: _Converted, sig: str, shape):
  """__call__(training=True), or a copy fed the golden random values."""
  prefix = f"train_random/{sig}/"
  randoms = {k[len(prefix):]: v for k, v in c.arrays.items() if k.startswith(prefix)}
  if not randoms:
    return lambda x: c.model(x, training=True), 0
  function = verify_random_ops.training_function(c.model, [])
  fed = verify_random_ops.FedTrainFunction(function, randoms, shape)
  # Random ops of the golden run that are not on __call__'s path are fine
  # (other outputs of the signature, the output dropout the conversion
  # removed); every random op on it must be fed.
  assert not fed.match.unmatched_converted, fed.match.unmatched_converted
  if not fed.match.matched:
    return lambda x: c.model(x, training=True), 0
  if fed.match.unmatched_reference:
    fed = verify_random_ops.FedTrainFunction(
        function, {r: randoms[r] for r in fed.match.matched.values()}, shape)
  return fed, len(fed.match.matched)


@pytest.mark.parametrize("name", NAMES)
def test_training_step_matches_goldens(converted, name):
  c = converted(name)
  sig, key = c.text("source_signature"), c.text("source_output_key")
  x = tf.constant(c.train_images)
  call, _ = _training_call(c, sig, x.shape)
  try:
    out = call(x)
    after = {n: v.numpy() for n, v in c.variables.items()}
  finally:
    c.restore()
  _assert_ok(compare.compare("train output", out.numpy(),
                             _train_expected(c, sig, key),
                             _tolerance(name, "golden_training")))
  before = {n[len("moving_before/"):]: v for n, v in c.arrays.items()
            if n.startswith("moving_before/")}
  expected = {n[len("moving_after/"):]: v for n, v in c.arrays.items()
              if n.startswith("moving_after/")}
  if not c.meta["train_signatures"]:
    assert not expected
    expected = {n: c.initial[n] for n in c.meta["non_trainable_variables"]}
  _assert_ok(compare.compare_many(
      "moving_before", {n: c.initial[n] for n in before}, before, "variables"))
  _assert_ok(compare.compare_many(
      "moving_after", {n: after[n] for n in expected}, expected,
      _tolerance(name, "golden_moving_averages")))
  # A check that cannot fail is a defect: the step must move what TF1 moved.
  moved = [n for n in expected if not np.array_equal(expected[n], c.initial[n])]
  assert bool(moved) == bool(c.meta["train_signatures"] and c.meta["num_update_ops"])


# Drop path (NASNet) and drop connect (EfficientNet) from unseeded random ops.
STOCHASTIC = [n for n in NAMES if conftest.golden_meta(n).get("unseeded_random_ops")]


@pytest.mark.parametrize("name", STOCHASTIC)
def test_training_mode_contract_of_stochastic_graphs(converted, name):
  """README "Verification": obj(x, training=True) is random by design, and so are
  the moving averages it updates (drop path and drop connect feed later batch
  norms); given the same random values, output, moving averages and gradients are
  deterministic and the module's; inference is deterministic."""
  c = converted(name)
  assert STOCHASTIC  # The corpus has such fixtures.
  sig = c.text("source_signature")
  key = c.text("source_output_key")
  moving = [n for n in c.meta["non_trainable_variables"] if "moving" in n]

  def step(call, x):
    trainable = list(c.model.trainable_variables)
    try:
      with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(trainable)  # The fed copy reads them through captured handles.
        out = call(x)
        loss = tf.reduce_sum(out)
      grads = tape.gradient(loss, trainable)
      assert sum(g is not None for g in grads) > len(grads) // 2
      return (out.numpy(), {n: c.variables[n].numpy() for n in moving},
              [None if g is None else g.numpy() for g in grads])
    finally:
      c.restore()

  tf_config.disable_op_determinism()  # Unseeded random ops refuse to run under it.
  try:
    # 16 images: two draws of every drop-path mask agreeing is out of question.
    x16 = tf.constant(np.concatenate([c.train_images] * 4))
    free = [step(lambda images: c.model(images, training=True), x16) for _ in range(2)]
  finally:
    tf_config.enable_op_determinism()
  assert not np.array_equal(free[0][0], free[1][0]), "training output is not random"
  assert any(not np.array_equal(free[0][1][n], free[1][1][n]) for n in moving), (
      "moving averages do not depend on the random values")
  # The same random values (the module's, recorded by hub.Module) fed: deterministic.
  x = tf.constant(c.train_images)
  call, fed_count = _training_call(c, sig, x.shape)
  assert fed_count
  fed = [step(call, x) for _ in range(2)]
  np.testing.assert_array_equal(fed[0][0], fed[1][0])
  for n in moving:
    np.testing.assert_array_equal(fed[0][1][n], fed[1][1][n])
  for a, b in zip(fed[0][2], fed[1][2]):
    assert (a is None) == (b is None) and (a is None or np.array_equal(a, b))
  _assert_ok(compare.compare("fed train output", fed[0][0],
                             _train_expected(c, sig, key),
                             _tolerance(name, "golden_training")))
  _assert_ok(compare.compare_many(
      "fed moving averages", fed[0][1],
      {n: c.arrays[f"moving_after/{n}"] for n in moving},
      _tolerance(name, "golden_moving_averages")))
  # Inference: deterministic, and the module's.
  first, second = (c.model(x).numpy() for _ in range(2))
  np.testing.assert_array_equal(first, second)
  _assert_ok(compare.compare("inference", first,
                             c.arrays[f"infer/{sig}/{key}/{c.meta['train_batch']}"],
                             _tolerance(name, "golden_inference")))


@pytest.mark.parametrize("name", [n for n in NAMES if conftest.golden_meta(n)["hparams"]])
def test_training_step_with_hparams_matches_goldens(converted, name):
  c = converted(name)
  x = tf.constant(c.train_images)
  kwargs = {k: tf.constant(v, tf.float32) for k, v in c.meta["hparams"].items()}
  try:
    c.model(x, training=True, **kwargs)
    after = {n: v.numpy() for n, v in c.variables.items()}
  finally:
    c.restore()
  expected = {n[len("moving_after_hparams/"):]: v for n, v in c.arrays.items()
              if n.startswith("moving_after_hparams/")}
  assert expected
  _assert_ok(compare.compare_many("moving_after_hparams",
                                  {n: after[n] for n in expected}, expected,
                                  _tolerance(name, "golden_moving_averages")))
  default = {n[len("moving_after/"):]: v for n, v in c.arrays.items()
             if n.startswith("moving_after/")}
  assert not compare.compare_many("hparams matter", expected, default,
                                  "golden_moving_averages").passed


@pytest.mark.parametrize("name", NAMES)
def test_regularization_total_matches_golden(converted, name):
  c = converted(name)
  total = np.float32(sum(float(f()) for f in c.model.regularization_losses))
  _assert_ok(compare.compare("regularization", total,
                             c.arrays["regularization_loss"],
                             "golden_regularization"))


@pytest.mark.parametrize("name", [n for n in NAMES if conftest.golden_meta(n)["grad_signature"]])
def test_gradient_norms_match_goldens(converted, name):
  meta = conftest.golden_meta(name)
  sig, key = meta["grad_signature"], meta["grad_output_key"]
  c = converted(name, signature=sig, output_key=key)
  x = tf.constant(c.train_images)
  call, _ = _training_call(c, sig, x.shape)
  probe = c.arrays["grad_probe"]
  trainable = list(c.model.trainable_variables)
  try:
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(trainable)  # The fed copy reads them through captured handles.
      out = call(x)
      loss = tf.reduce_sum(tf.reshape(out, probe.shape) * probe)
    grads = tape.gradient(loss, trainable)
  finally:
    c.restore()
  norms = {v.name.rsplit(":", 1)[0]: np.float32(tf.norm(g).numpy())
           for v, g in zip(trainable, grads) if g is not None}
  expected = {n[len("grad_norm/"):]: v for n, v in c.arrays.items()
              if n.startswith("grad_norm/")}
  assert set(expected) == set(meta["trainable_variables"])
  scale = max(float(v) for v in expected.values())
  _assert_ok(compare.compare_many("grad_norm", norms, expected,
                                  _tolerance(name, "golden_gradient_norms"), scale=scale))


@pytest.mark.parametrize("name", NAMES)
def test_verify_passes(converted, verified_all, name):
  # verify(..., consumers="all"), shared with tests/test_consumers.py.
  c = converted(name)
  verified = verified_all(name)
  report = verified.report
  assert report is not None, verified.error
  assert report.passed, report.format_table()
  # The module's own gradients, or (lost custom gradients: TF 2.x swish) those of
  # the forward computation, as the report says.
  assert report.method_for_gradients.startswith(
      "forward computation" if c.meta.get("grad_source") else "the module's")
  names = {r.name for r in report.checks}
  assert {"variables/values", "call/inference", "regularization/total",
          "train/output", "train/moving_averages", "train/gradients"} <= names
  assert all(f"signature/{s}/{k}" in names
             for s, info in c.meta["signatures"].items() for k in info["outputs"])
  if c.meta["hparams"]:
    assert any(n.startswith("train[batch_norm_momentum=") for n in names)
  # verify() left the loaded variables and the files as they were.
  reloaded = tf.saved_model.load(c.path)
  for v in reloaded.variables:
    np.testing.assert_array_equal(v.numpy(), c.initial[v.name.rsplit(":", 1)[0]])


def test_verify_passes_when_the_output_ignores_some_variables(convert_cached):
  # inference_only_asset's feature vector does not read the logits variables:
  # the TF1 Session gives them no gradient, the TF2 function (whose other
  # outputs read them) an exact zero. Both are zero; verification must pass.
  path = convert_cached("inference_only_asset", signature="image_feature_vector")
  report = verify_lib.verify(conftest.module_path("inference_only_asset"), path)
  assert report.passed, report.format_table()
  assert report.check("train/gradients").passed


@pytest.mark.parametrize("name,suffix", [("mobilenet_quantops", "_fake_quant"),
                                         ("resnet_v2_tiny", "")])
def test_tolerances_are_quantization_aware_only_for_fake_quant(convert_cached, name, suffix):
  report = verify_lib.verify(conftest.module_path(name), convert_cached(name))
  assert report.check("train/gradients").rtol == tolerances.get(
      "gradients" + suffix).rtol  # Its atol is scaled by the largest gradient.
  for check, entry in (("train/output", "training_output"),
                       ("train/moving_averages", "moving_averages"),
                       ("call/inference", "inference")):
    wanted = tolerances.get(entry + suffix)
    assert (report.check(check).rtol, report.check(check).atol) == (
        wanted.rtol, wanted.atol), check


@pytest.mark.parametrize("name", NAMES)
def test_verify_passes_with_grappler_on(converted, name):
  # verify() runs both sides with Grappler off by default; the tolerance
  # table must hold for the graphs as Grappler rewrites them too, and the
  # process-wide optimizer option must be put back.
  c = converted(name)
  report = verify_lib.verify(conftest.module_path(name), c.path,
                             optimize_graphs=True)
  assert report.passed, report.format_table()


def _grappler_disabled() -> bool:
  return tf.config.optimizer.get_experimental_options().get(
      "disable_meta_optimizer", False)


def test_determinism_blocks_overlapping_in_threads_leave_it_on_until_the_last():
  # The reference side's block (in a thread) may close while verification's
  # is open, or the other way round: neither may turn determinism off under
  # the other.
  tf_config.disable_op_determinism()  # The autouse fixture turned it on.
  first_open, second_open, first_closed = (threading.Event() for _ in range(3))
  seen = []

  def reference():
    with verify_spec.deterministic_ops():
      first_open.set()
      second_open.wait(10)
    first_closed.set()

  thread = threading.Thread(target=reference)
  thread.start()
  first_open.wait(10)
  with verify_spec.deterministic_ops():
    second_open.set()
    first_closed.wait(10)
    seen.append(tf_config.is_op_determinism_enabled())
  thread.join()
  assert seen == [True]
  assert not tf_config.is_op_determinism_enabled()


def test_verify_puts_tensorflow_settings_back(converted):
  # verify() turns Grappler off and op determinism on while it runs; both
  # are process-wide settings of the caller's TensorFlow.
  tf_config.disable_op_determinism()  # The autouse fixture turned it on.
  c = converted("resnet_v2_tiny")
  report = verify_lib.verify(conftest.module_path("resnet_v2_tiny"), c.path)
  assert report.passed, report.format_table()
  assert not tf_config.is_op_determinism_enabled()
  assert not _grappler_disabled()
  tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
  try:
    verify_lib.verify(conftest.module_path("resnet_v2_tiny"), c.path,
                      optimize_graphs=True)
    assert _grappler_disabled()
  finally:
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": False})


@pytest.mark.parametrize("name", NAMES)
def test_spec_for_plan_is_what_the_converted_model_says(converted, name):
  # convert() starts the reference side from the plan, before the model
  # exists; verify() runs it again if the model's metadata says otherwise.
  # For every fixture the two must agree, or that head start is lost.
  from migrate import plan as plan_lib  # pylint: disable=g-import-not-at-top
  module = legacy_format.read_module(conftest.module_path(name))
  c = converted(name)
  from_plan = verify_lib.spec_for_plan(module, plan_lib.make_plan(module))
  from_model = verify_spec.spec_from_metadata(verify_spec.read_metadata(c.model),
                                              module)
  assert from_plan == from_model
  kept = plan_lib.make_plan(module, remove_output_dropout=False)
  assert verify_lib.spec_for_plan(module, kept).output_dropout_removed == ""


@pytest.mark.parametrize("name,options", [
    ("mobilenet_v1_bn_hparams", {}),  # Hyperparameter steps.
    ("inception_v2_tiny", {"signature": "image_classification"}),  # Random ops fed.
])
def test_reference_in_a_thread_gives_the_same_report(converted, name, options):
  c = converted(name, **options)
  src = conftest.module_path(name)
  here = verify_lib.verify(src, c.path, parallel=False)
  there = verify_lib.verify(src, c.path, parallel=True)
  # A reference started earlier (as `convert` does, while it builds), still
  # running or done when verification needs it.
  module = legacy_format.read_module(src)
  spec = verify_spec.spec_from_metadata(verify_spec.read_metadata(c.model), module)
  early = verify_lib.start_reference(src, spec, parallel=True, module=module)
  early.result()
  split = verify_lib.verify(src, c.path, reference=early)
  this, aside = "this thread", "another thread"
  consumers = "consumers (each loads the saved files)"
  assert here.processes == {"module (TF1 Session)": this, "converted model": this,
                            consumers: this}
  for report in (there, split):
    assert report.processes == {"module (TF1 Session)": aside,
                                "converted model": this, consumers: aside}
    assert report.passed, report.format_table()
    assert [(r.name, r.max_abs_err) for r in report.checks] == [
        (r.name, r.max_abs_err) for r in here.checks]
    assert report.method_for_random_ops == here.method_for_random_ops
    assert report.warnings == here.warnings


def test_a_reference_started_for_another_spec_is_not_used(converted):
  name = "resnet_v2_tiny"
  c = converted(name)
  src = conftest.module_path(name)
  module = legacy_format.read_module(src)
  from migrate import plan as plan_lib  # pylint: disable=g-import-not-at-top
  right = verify_lib.spec_for_plan(module, plan_lib.make_plan(module))
  wrong = dataclasses.replace(right, seed=right.seed + 1)
  pending = verify_lib.start_reference(src, wrong, parallel=False)
  report = verify_lib.verify(src, c.path, reference=pending)
  assert report.passed, report.format_table()
  # Had it been used, the report would have failed: its inputs differ.
  ours, theirs = (verify_lib.reference_side(src, s).outputs for s in (right, wrong))
  tag = sorted(ours)[0]
  assert not any(np.allclose(ours[tag][k], theirs[tag][k]) for k in ours[tag])


def test_the_reference_holds_no_copy_of_the_weights(tmp_path):
  # Expected.variables reads each value from the checkpoint when a check
  # asks: verification's peak holds no weight-sized copy for it.
  import pickle  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from migrate import errors  # pylint: disable=g-import-not-at-top
  from migrate import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from migrate import reference as reference_lib  # pylint: disable=g-import-not-at-top
  src = str(tmp_path / "module")
  shutil.copytree(conftest.module_path("resnet_v2_tiny"), src)
  module = legacy_format.read_module(src)
  spec = verify_lib.spec_for_plan(module, plan_lib.make_plan(module))
  values = verify_lib.reference_side(src, spec, module=module).variables
  assert isinstance(values, reference_lib.CheckpointValues)
  checkpoint = reference_lib.read_checkpoint(module)
  assert values and set(values) <= set(checkpoint)
  for name in values:
    np.testing.assert_array_equal(values[name], checkpoint[name])
  assert "no such variable" not in values
  copy = pickle.loads(pickle.dumps(values))
  name = next(iter(values))
  np.testing.assert_array_equal(copy[name], checkpoint[name])
  # The module's files gone before the checks read them: one clear error.
  shutil.rmtree(tmp_path / "module" / "variables")
  with pytest.raises(errors.CorruptModuleError, match="reading '.*' again"):
    pickle.loads(pickle.dumps(values))[name]


def test_verification_threads_run_inside_an_isolated_worker(tmp_path):
  # The CLI converts in a worker process (isolation); with 2 CPUs that
  # worker runs the reference side of verification in a thread of its own.
  from migrate import isolation  # pylint: disable=g-import-not-at-top
  result = isolation.run_isolated(
      "migrate.convert:convert_to_dict", conftest.module_path("resnet_v2_tiny"),
      str(tmp_path / "out"), parallel_verify=True, what="resnet_v2_tiny")
  assert result["verified"], result["parity"]["table"]
