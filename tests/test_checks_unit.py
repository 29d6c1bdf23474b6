"""Fast unit tests of the parity machinery's pure parts (no conversion).

`compare` on edge cases, `tolerances.resolve` and the table's invariants,
`errors.first_line` on a real TensorFlow graph error, and each check of
`verify_checks.CHECKS` on hand-made `Expected`/`Actual` data: a check must
pass within its tolerance and fail beyond it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re

import numpy as np
import pytest

from migrate import compare
from migrate import consumers
from migrate import errors
from migrate import tolerances
from migrate import verify_checks
from migrate import verify_random_ops
from migrate import verify_spec
from migrate.verify import Actual, ActualStep, Expected, ExpectedStep
from migrate.verify_spec import ModuleFacts, SignatureFacts, Spec

# -- compare ---------------------------------------------------------------------------


def test_compare_identical_and_within_tolerance():
  e = np.array([1.0, -2.0, 3.0], np.float32)
  assert compare.compare("x", e.copy(), e, "variables").passed
  r = compare.compare("x", e + np.float32(5e-6), e, "inference")
  assert r.passed and 0 < r.max_abs_err < 1e-5, r


def test_compare_out_of_tolerance_names_the_worst_element():
  e = np.zeros((2, 3), np.float32)
  a = e.copy()
  a[1, 2] = 1.0
  r = compare.compare("x", a, e, "inference")
  assert not r.passed
  assert "1 of 6 values out of tolerance" in r.detail and "[1, 2]" in r.detail
  assert r.max_abs_err == 1.0


@pytest.mark.parametrize("actual,expected,passed", [
    ([np.nan, 1.0], [np.nan, 1.0], True),  # NaN where the other side is NaN.
    ([np.nan, 1.0], [0.0, 1.0], False),
    ([0.0, 1.0], [np.nan, 1.0], False),
    ([np.inf, -np.inf], [np.inf, -np.inf], True),  # The same infinity.
    ([np.inf, 1.0], [-np.inf, 1.0], False),
    ([np.inf, 1.0], [1e30, 1.0], False),
    ([1.0, 2.0], [np.inf, 2.0], False),
])
def test_compare_nan_and_inf(actual, expected, passed):
  r = compare.compare("x", np.array(actual, np.float32),
                      np.array(expected, np.float32), "inference")
  assert r.passed == passed, r


def test_compare_empty_arrays():
  e = np.zeros((0, 5), np.float32)
  r = compare.compare("x", e.copy(), e, "variables")
  assert r.passed and r.max_abs_err == 0.0 and r.detail == "empty"
  r = compare.compare("x", np.zeros((0, 4), np.float32), e, "variables")
  assert not r.passed and "shape" in r.detail


def test_compare_shape_mismatch():
  r = compare.compare("x", np.zeros((2, 3), np.float32),
                      np.zeros((3, 2), np.float32), "inference")
  assert not r.passed
  assert "shape [2, 3] != expected [3, 2]" in r.detail


def test_compare_dtype_mismatch():
  e = np.ones(3, np.float32)
  r = compare.compare("x", e.astype(np.float64), e, "inference")
  assert not r.passed and "dtype float64 != expected float32" in r.detail
  assert compare.compare("x", e.astype(np.float64), e, "inference",
                         check_dtype=False).passed


def test_compare_scale_multiplies_atol_only():
  e = np.array([0.0, 100.0], np.float32)
  a = e + np.float32(5e-3)
  tol = tolerances.get("gradients")  # rtol 1e-3, atol 1e-4.
  assert not compare.compare("x", a, e, "gradients").passed  # 5e-3 > 1e-4 at 0.
  r = compare.compare("x", a, e, "gradients", scale=100.0)  # atol 1e-2.
  assert r.passed and r.atol == pytest.approx(tol.atol * 100) and r.rtol == tol.rtol


def test_compare_many_missing_and_extra_names():
  e = {"a": np.zeros(2), "b": np.zeros(2)}
  r = compare.compare_many("v", {"a": np.zeros(2), "c": np.zeros(2)}, e, "variables")
  assert not r.passed
  assert "missing 1 (e.g. 'b')" in r.detail and "unexpected 1 (e.g. 'c')" in r.detail


def test_top_k_accepts_ties_only():
  e = np.array([[0.1, 0.5, 0.5, 0.2]])
  assert compare.top_k("t", np.array([[0.1, 0.5, 0.49999999, 0.2]]), e, 1).passed
  assert not compare.top_k("t", np.array([[0.6, 0.5, 0.4, 0.2]]), e, 1).passed


# -- tolerances ------------------------------------------------------------------------

def test_resolve_picks_the_variant_if_there_is_one():
  assert tolerances.resolve("inference", fake_quant=True) == "inference_fake_quant"
  assert tolerances.resolve("inference", fake_quant=False) == "inference"
  assert tolerances.resolve("regularization", fake_quant=True) == "regularization"
  with pytest.raises(KeyError, match="no tolerance 'nonsense'"):
    tolerances.resolve("nonsense", fake_quant=True)


def test_every_variant_names_an_existing_entry():
  for name in tolerances.TOLERANCES:
    for variant in tolerances.VARIANTS:
      if name.endswith("_" + variant):
        assert name[:-len(variant) - 1] in tolerances.TOLERANCES, name


def test_every_entry_has_a_reason_and_every_check_an_entry():
  for name, tol in tolerances.TOLERANCES.items():
    assert tol.reason and tol.rtol >= 0 and tol.atol >= 0, name
  for c in verify_checks.CHECKS:
    if c.tolerance is not None:
      tolerances.get(c.tolerance)


# -- errors.first_line -------------------------------------------------------------------

def test_first_line_names_the_cause_of_a_graph_execution_error():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  graph = tf.Graph()
  with graph.as_default():
    x = tf.compat.v1.placeholder(tf.float32, None)
    y = tf.reshape(x, [5])
  with tf.compat.v1.Session(graph=graph) as session:
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
      session.run(y, {x: np.zeros(3, np.float32)})
  text = str(raised.value)
  assert text.startswith("Graph execution error:")  # What first_line skips.
  line = errors.first_line(raised.value)
  assert line.startswith("Input to reshape is a tensor with 3 values"), line
  assert "\n" not in line


@pytest.mark.parametrize("text,line", [
    ("plain message\nsecond line", "plain message"),
    ("in user code:\n\n    File \"f.py\", line 1, in f  *\n\n    TypeError: bad",
     "TypeError: bad"),
    ("", "ValueError"),
])
def test_first_line(text, line):
  assert errors.first_line(ValueError(text)) == line


def test_first_line_limit():
  assert errors.first_line("x" * 500) == "x" * 300
  assert errors.first_line("x" * 500, limit=None) == "x" * 500


# -- the checks on hand-made data --------------------------------------------------------

SIZES = ((4, 4),)
TAGS = [t.name for t in verify_spec.batch_tags(SIZES)]  # b1_4x4, b2_4x4


def _rng(i: int) -> np.random.RandomState:
  return np.random.RandomState(i)


def _sides(fake_quant: bool = False):
  """(spec, expected, actual, facts) that agree on everything."""
  spec = Spec(signature="default", output_key="default")
  facts = ModuleFacts(
      saved_model_sha256="abc", has_train_graph=True,
      signatures={"default": {"default": "out:0"}},
      image_signatures={"default": SignatureFacts(
          outputs={"default": "out:0"}, images_tensor="images:0",
          other_inputs={}, sizes=SIZES)},
      variables=frozenset({"w", "mean"}), trainable=frozenset({"w"}),
      fake_quant=fake_quant, call_sizes=SIZES, train_signature=True)
  outputs = {t: _rng(i).uniform(0, 1, (b, 3)).astype(np.float32)
             for i, (t, b) in enumerate(zip(TAGS, (1, 2)))}
  w = _rng(5).standard_normal((3, 3)).astype(np.float32)
  mean0, mean1 = np.zeros(3, np.float32), np.full(3, 0.1, np.float32)
  out = _rng(6).standard_normal((2, 3)).astype(np.float32)
  grad = _rng(7).standard_normal((3, 3)).astype(np.float32)
  expected = Expected(
      spec=spec, outputs={t: {"out:0": v} for t, v in outputs.items()},
      steps={"train": ExpectedStep(output=out, variable_names=["mean", "w"],
                                   changed={"mean": mean1},
                                   gradients={"w": grad})},
      regularization=([0.5, 0.25], 0.75), variables={"w": w, "mean": mean0})
  actual = Actual(
      spec=spec,
      metadata={"source_signature": "default", "source_output_key": "default",
                "source_sha256": "abc", "has_train_graph": 1, "num_features": 3},
      signatures=["default", "serving_default"],
      signature_outputs={"serving_default": {t: {"default": v.copy()}
                                             for t, v in outputs.items()},
                         "default": {TAGS[0]: {"default": outputs[TAGS[0]].copy()}}},
      call_outputs={t: v.copy() for t, v in outputs.items()},
      serve_outputs={t: v.copy() for t, v in outputs.items()},
      steps={"train": ActualStep(output=out.copy(), changed={"mean": mean1.copy()},
                                 gradients={"w": grad.copy()})},
      regularization=[0.5, 0.25], variables={"w": w.copy(), "mean": mean0.copy()},
      trainable=["w"])
  return spec, expected, actual, facts


def _results(spec, expected, actual, facts) -> dict[str, compare.CheckResult]:
  results = verify_checks.run_checks(spec, expected, actual, facts)
  assert len({r.name for r in results}) == len(results)
  return {r.name: r for r in results}


def test_checks_pass_on_agreeing_sides_in_the_list_order():
  results = verify_checks.run_checks(*_sides())
  assert all(r.passed for r in results), [str(r) for r in results if not r.passed]
  assert [r.name for r in results] == [
      "metadata/source", "metadata/source_sha256", "metadata/has_train_graph",
      "variables/values", "variables/trainable", "signatures/names",
      "signature/default/default", "signature/serving_default/default",
      "call/inference", "call/serve_endpoint", "call/image_api",
      "call/output_width", "train/output", "train/moving_averages", "train/updated_variables",
      "train/gradients", "train/gradient_norms",
      "regularization/count", "regularization/total", "regularization/values"]


def test_each_result_carries_its_checks_name():
  spec, expected, actual, facts = _sides()
  for c in verify_checks.CHECKS:
    pattern = re.sub(r"<[^>]+>", "*", c.name)
    step = ("train",) if c.per_step else ()
    args = (spec, expected, actual, facts, c.tolerance) + step
    for r in c.fn(*args):
      assert fnmatch.fnmatchcase(r.name, pattern), (r.name, c.name)


def _bound(tol_name: str, e: float, scale: float = 1.0) -> float:
  tol = tolerances.get(tol_name)
  return tol.atol * scale + tol.rtol * abs(e)


def _nudge(array: np.ndarray, by: float) -> None:
  """Adds `by` to the first element, in place."""
  array.flat[0] = array.dtype.type(float(array.flat[0]) + by)


# (check, tolerance entry, where the value lives in `actual`, the scale).
NUMERIC = {
    "signature/serving_default/default": (
        "inference",
        lambda a: a.signature_outputs["serving_default"][TAGS[1]]["default"]),
    "call/inference": ("inference", lambda a: a.call_outputs[TAGS[1]]),
    "call/serve_endpoint": ("inference", lambda a: a.serve_outputs[TAGS[1]]),
    "train/output": ("training_output", lambda a: a.steps["train"].output),
    "train/moving_averages": ("moving_averages",
                              lambda a: a.steps["train"].changed["mean"]),
    "train/gradients": ("gradients", lambda a: a.steps["train"].gradients["w"]),
}


@pytest.mark.parametrize("name", sorted(NUMERIC))
@pytest.mark.parametrize("factor,passed", [(0.5, True), (2.0, False)])
def test_a_check_fails_beyond_its_tolerance_and_passes_within(name, factor, passed):
  spec, expected, actual, facts = _sides()
  tol_name, where = NUMERIC[name]
  value = where(actual)
  scale = 1.0
  if name == "train/gradients":  # atol relative to the largest gradient.
    scale = float(np.abs(expected.steps["train"].gradients["w"]).max())
  _nudge(value, factor * _bound(tol_name, float(value.flat[0]), scale))
  result = _results(spec, expected, actual, facts)[name]
  assert result.passed == passed, result
  assert result.rtol == tolerances.get(tol_name).rtol


@pytest.mark.parametrize("factor,passed", [(0.5, True), (2.0, False)])
def test_gradient_norms_fail_beyond_their_tolerance(factor, passed):
  spec, expected, actual, facts = _sides()
  grad = actual.steps["train"].gradients["w"]
  norm = float(np.linalg.norm(grad.astype(np.float64)))
  bound = _bound("gradient_norms", norm, scale=norm)
  grad *= np.float32(1 + factor * bound / norm)
  result = _results(spec, expected, actual, facts)["train/gradient_norms"]
  assert result.passed == passed, result


@pytest.mark.parametrize("factor,passed", [(0.5, True), (3.0, False)])
def test_regularization_total_fails_beyond_its_tolerance(factor, passed):
  spec, expected, actual, facts = _sides()
  actual.regularization[0] += factor * _bound("regularization", 0.75)
  result = _results(spec, expected, actual, facts)["regularization/total"]
  assert result.passed == passed, result


def test_variables_must_be_bit_for_bit():
  spec, expected, actual, facts = _sides()
  _nudge(actual.variables["w"], 1e-7)
  assert not _results(spec, expected, actual, facts)["variables/values"].passed


def test_fake_quant_modules_get_the_variant_entries():
  results = _results(*_sides(fake_quant=True))
  for name, entry in (("call/inference", "inference_fake_quant"),
                      ("train/output", "training_output_fake_quant"),
                      ("regularization/total", "regularization")):
    tol = tolerances.get(entry)
    assert (results[name].rtol, results[name].atol) == (tol.rtol, tol.atol), name


def _break(edit):
  spec, expected, actual, facts = _sides()
  spec, expected, actual, facts = edit(spec, expected, actual, facts) or (
      spec, expected, actual, facts)
  return _results(spec, expected, actual, facts)


def _set(obj, **changes):
  for k, v in changes.items():
    setattr(obj, k, v)


@pytest.mark.parametrize("edit,failed", [
    (lambda s, e, a, f: a.metadata.update(source_sha256="other"),
     "metadata/source_sha256"),
    (lambda s, e, a, f: a.metadata.update(has_train_graph=0),
     "metadata/has_train_graph"),
    (lambda s, e, a, f: (s, e, a, dataclasses.replace(f, requested=("other", None))),
     "metadata/requested_output"),
    (lambda s, e, a, f: _set(a, trainable=["w", "mean"]), "variables/trainable"),
    (lambda s, e, a, f: _set(a, signatures=["default"]), "signatures/names"),
    (lambda s, e, a, f: a.call_outputs.update(
        {TAGS[0]: a.call_outputs[TAGS[0]].astype(np.float64)}), "call/image_api"),
    (lambda s, e, a, f: a.metadata.update(num_features=7), "call/output_width"),
    (lambda s, e, a, f: _set(a, serve_errors={TAGS[0]: "the model has no 'serve' "
                                              "endpoint"}), "call/serve_endpoint"),
    (lambda s, e, a, f: a.steps["train"].changed.clear(), "train/updated_variables"),
    (lambda s, e, a, f: _set(a, regularization=[0.75]), "regularization/count"),
])
def test_a_yes_no_check_fails_when_its_property_does_not_hold(edit, failed):
  results = _break(edit)
  assert not results[failed].passed, results[failed]


def test_an_unknown_source_skips_the_checks_of_call():
  spec, expected, actual, facts = _sides()
  actual.metadata["source_signature"] = "nonsense"
  spec = Spec()  # What spec_from_metadata makes of an unknown output.
  results = _results(spec, expected, actual, dataclasses.replace(
      facts, call_sizes=(), train_signature=False))
  assert not results["metadata/source"].passed
  assert not any(n.startswith(("call/", "train")) for n in results)
  assert results["regularization/total"].passed


def test_a_failed_step_skips_its_comparisons():
  spec, expected, actual, facts = _sides()
  actual.steps["train"] = ActualStep(error="InvalidArgumentError: boom")
  results = _results(spec, expected, actual, facts)
  assert "boom" in results["train/run"].detail and not results["train/run"].passed
  assert not any(n in results for n in ("train/output", "train/gradients"))


def test_a_step_that_tensorflow_refused_names_the_cause():
  """What the CLI prints for a failed check ('check 'train/run' failed: ...')
  names the kernel's message, not TensorFlow's "Graph execution error:" header
  (issue 13: an unseeded random op under op determinism was reported so)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  graph = tf.Graph()
  with graph.as_default():
    noise = tf.raw_ops.RandomUniform(shape=tf.constant([2, 1]), dtype=tf.float32)
  with verify_spec.deterministic_ops(), tf.compat.v1.Session(graph=graph) as session:
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
      session.run(noise)
  spec, expected, actual, facts = _sides()
  expected.steps["train"] = ExpectedStep(error=verify_spec.error_text(raised.value))
  line = str(_results(spec, expected, actual, facts)["train/run"])
  assert line == ("check 'train/run' failed: the module's training step failed: "
                  "InvalidArgumentError: When determinism is enabled, random ops must "
                  "have a seed specified."), line


def test_unmatched_random_ops_fail_and_skip_the_step():
  spec, expected, actual, facts = _sides()
  actual.steps["train"] = ActualStep(random_ops=verify_random_ops.RandomOpsMatch(
      unmatched_reference=["dropout/random_uniform/RandomUniform"]))
  results = _results(spec, expected, actual, facts)
  assert not results["train/random_ops"].passed
  assert "train/run" not in results and "train/output" not in results


def test_top_k_for_classifiers():
  spec, expected, actual, facts = _sides()
  actual.metadata["output_kind"] = "image_classification"
  assert _results(spec, expected, actual, facts)["call/top1"].passed
  out = actual.call_outputs[TAGS[0]]
  out[0] = out[0][::-1] + np.arange(3, dtype=np.float32)  # Another argmax.
  results = _results(spec, expected, actual, facts)
  assert not results["call/top1"].passed and not results["call/inference"].passed


def test_train_steps_and_batch_tags():
  facts = ModuleFacts(train_signature=True,
                      hparam_tensors={"momentum": "m:0", "alpha": "a:0"})
  assert [p for p, _ in verify_spec.train_steps(facts)] == [
      "train", "train[alpha=0.5]", "train[momentum=0.5]"]
  assert verify_spec.train_steps(ModuleFacts()) == []
  tags = verify_spec.batch_tags(((8, 8), (16, 24)))
  assert [t.name for t in tags] == ["b1_8x8", "b2_8x8", "b1_16x24"]
  np.testing.assert_array_equal(tags[0].images(3), tags[0].images(3))
  assert tags[2].images(0).shape == (1, 16, 24, 3)


# -- the consumer rows --------------------------------------------------------------------

ALL_RUNS = list(consumers.selected(consumers.ALL).ran)


def _with_consumers(random_updates=frozenset()):
  """`_sides()` with every consumer run (`consumers="all"`) agreeing with the
  module: the TF1 loader every signature, the others `serving_default` or
  `__call__`'s output, the Keras fit steps the module's step."""
  spec, expected, actual, facts = _sides()
  facts = dataclasses.replace(facts, random_updates=frozenset(random_updates))
  call = {t: v for t, v in actual.call_outputs.items()}
  serving = {("serving_default", t): {"default": v.copy()} for t, v in call.items()}
  signatures = dict(serving)
  signatures[("default", TAGS[0])] = {"default": call[TAGS[0]].copy()}

  def keras(name, endpoint):
    return consumers.ConsumerResult(
        name, outputs={(endpoint, t): {consumers.CALL_OUTPUT: v.copy()}
                       for t, v in call.items()},
        fit=consumers.FitStep(
            non_trainable_after={"mean": expected.steps["train"].changed["mean"].copy()},
            moved=["w"], unmoved=[], no_gradient_warnings=[], trainable=["w"]))

  actual.consumers = {
      "tf1_loader": consumers.ConsumerResult("tf1_loader", outputs=signatures),
      "c_api_loader": consumers.ConsumerResult(
          "c_api_loader", outputs={k: dict(v) for k, v in serving.items()}),
      "tflite": consumers.ConsumerResult(
          "tflite", outputs={k: {"default": v["default"].copy()}
                             for k, v in serving.items()}),
      "keras3_tfsm_layer": keras("keras3_tfsm_layer", "serve"),
      "tf_keras_hub_layer": keras("tf_keras_hub_layer", "__call__"),
  }
  actual.consumer_runs = list(ALL_RUNS)
  return spec, expected, actual, facts


CONSUMER_ROWS = ["consumer/tf1_loader", "consumer/c_api_loader", "consumer/tflite",
                 "consumer/keras3_tfsm_layer", "consumer/keras3_tfsm_layer/fit",
                 "consumer/tf_keras_hub_layer", "consumer/tf_keras_hub_layer/fit"]


def test_selections_run_the_tf1_loader_by_default_and_all_with_all():
  default, everything = consumers.selected(), consumers.selected(consumers.ALL)
  assert default.ran == ("tf1_loader",)
  assert default.skipped == ("c_api_loader", "keras3_tfsm_layer",
                             "keras3_tfsm_layer/fit", "tf_keras_hub_layer",
                             "tf_keras_hub_layer/fit", "tflite")
  assert everything.skipped == ()
  assert set(everything.ran) == set(default.ran) | set(default.skipped)
  with pytest.raises(ValueError, match="expected one of default, all"):
    consumers.selected("some")


def test_consumer_rows_pass_when_the_consumers_agree_in_the_list_order():
  results = verify_checks.run_checks(*_with_consumers())
  assert all(r.passed for r in results), [str(r) for r in results if not r.passed]
  assert [r.name for r in results if r.name.startswith("consumer/")] == CONSUMER_ROWS
  by_name = {r.name: r for r in results}
  assert "3 entries" in by_name["consumer/tf1_loader"].detail  # Every signature.
  for c in verify_checks.CHECKS:  # Each row carries its check's name.
    assert c.name in by_name or not c.name.startswith("consumer/"), c.name


def test_the_default_selection_has_no_rows_for_what_it_skips():
  spec, expected, actual, facts = _with_consumers()
  for skipped in consumers.selected().skipped:
    actual.consumers.pop(skipped, None)
  actual.consumer_runs = list(consumers.selected().ran)
  names = [r.name for r in verify_checks.run_checks(spec, expected, actual, facts)
           if r.name.startswith("consumer/")]
  assert names == ["consumer/tf1_loader"]


# (row, tolerance entry, where a consumer's value lives in `actual`).
CONSUMER_NUMERIC = {
    "consumer/tf1_loader": ("consumer_loader", lambda a: a.consumers["tf1_loader"].outputs[
        ("default", TAGS[0])]["default"]),
    "consumer/c_api_loader": ("consumer_loader", lambda a: a.consumers["c_api_loader"].outputs[
        ("serving_default", TAGS[1])]["default"]),
    "consumer/tflite": ("consumer_tflite", lambda a: a.consumers["tflite"].outputs[
        ("serving_default", TAGS[1])]["default"]),
    "consumer/keras3_tfsm_layer": ("consumer_loader", lambda a: a.consumers[
        "keras3_tfsm_layer"].outputs[("serve", TAGS[0])][consumers.CALL_OUTPUT]),
    "consumer/tf_keras_hub_layer/fit": ("moving_averages", lambda a: a.consumers[
        "tf_keras_hub_layer"].fit.non_trainable_after["mean"]),
}


@pytest.mark.parametrize("name", sorted(CONSUMER_NUMERIC))
@pytest.mark.parametrize("factor,passed", [(0.5, True), (2.0, False)])
def test_a_consumer_row_fails_beyond_its_tolerance(name, factor, passed):
  spec, expected, actual, facts = _with_consumers()
  tol_name, where = CONSUMER_NUMERIC[name]
  value = where(actual)
  # Consumer outputs (not TFLite's, nor the fit's variables) are compared
  # within atol of their own largest value, at least 1.
  scale = (max(float(np.abs(value).max()), 1.0)
           if tol_name == "consumer_loader" else 1.0)
  _nudge(value, factor * _bound(tol_name, float(value.flat[0]), scale))
  result = _results(spec, expected, actual, facts)[name]
  assert result.passed == passed, result
  assert (result.rtol, result.atol) == (tolerances.get(tol_name).rtol,
                                        tolerances.get(tol_name).atol)


def test_a_consumer_that_cannot_take_the_model_passes_and_one_that_fails_fails():
  spec, expected, actual, facts = _with_consumers()
  actual.consumers["tflite"] = consumers.ConsumerResult(
      "tflite", not_applicable="not convertible to TFLite: op Erfinv")
  actual.consumers["c_api_loader"] = consumers.ConsumerResult(
      "c_api_loader", error="the C API loader failed: Could not find variable x")
  results = _results(spec, expected, actual, facts)
  assert results["consumer/tflite"].passed
  assert results["consumer/tflite"].detail == "not convertible to TFLite: op Erfinv"
  assert not results["consumer/c_api_loader"].passed
  assert "Could not find variable x" in results["consumer/c_api_loader"].detail


def test_a_signature_or_output_a_consumer_did_not_give_fails():
  spec, expected, actual, facts = _with_consumers()
  del actual.consumers["tf1_loader"].outputs[("default", TAGS[0])]
  actual.consumers["c_api_loader"].outputs[("serving_default", TAGS[0])]["extra"] = (
      np.zeros(1, np.float32))
  results = _results(spec, expected, actual, facts)
  assert "missing 1 (e.g. 'default/default/b1_4x4')" in results["consumer/tf1_loader"].detail
  assert "unexpected 1" in results["consumer/c_api_loader"].detail
  assert not results["consumer/tf1_loader"].passed


@pytest.mark.parametrize("edit,words", [
    (lambda fit, ref: fit.no_gradient_warnings.append(
        "Gradients do not exist for variables ['w']"), "Gradients do not exist"),
    (lambda fit, ref: setattr(fit, "trainable", ["w", "mean"]), "trains 2 variables"),
    (lambda fit, ref: setattr(fit, "moved", []), "changed no weight"),
    (lambda fit, ref: fit.non_trainable_after.pop("mean"), "missing 1"),
])
def test_a_fit_step_fails_when_keras_does_not_train_what_it_should(edit, words):
  spec, expected, actual, facts = _with_consumers()
  edit(actual.consumers["keras3_tfsm_layer"].fit, expected.steps["train"])
  results = _results(spec, expected, actual, facts)
  row = results["consumer/keras3_tfsm_layer/fit"]
  assert not row.passed and words in row.detail, row
  assert results["consumer/tf_keras_hub_layer/fit"].passed


def test_a_fit_step_after_random_ops_must_move_its_moving_averages_and_stay_finite():
  # 'mean' is updated after a random op (a drop path): the fit step's own
  # random values give it another value than the module's step.
  spec, expected, actual, facts = _with_consumers(random_updates={"mean"})
  fit = actual.consumers["keras3_tfsm_layer"].fit
  fit.non_trainable_after["mean"] += np.float32(0.05)
  row = _results(spec, expected, actual, facts)["consumer/keras3_tfsm_layer/fit"]
  assert row.passed and "1 updated after random ops: moved and finite" in row.detail
  fit.non_trainable_after["mean"][0] = np.nan
  row = _results(spec, expected, actual, facts)["consumer/keras3_tfsm_layer/fit"]
  assert not row.passed and "'mean' is not finite" in row.detail
  fit.non_trainable_after["mean"] = expected.variables["mean"].copy()  # Not moved.
  row = _results(spec, expected, actual, facts)["consumer/keras3_tfsm_layer/fit"]
  assert not row.passed and "left 'mean', the module's step changes it" in row.detail
  # Without a random op before it, the same value fails the exact comparison.
  spec, expected, actual, facts = _with_consumers()
  actual.consumers["keras3_tfsm_layer"].fit.non_trainable_after["mean"] += np.float32(0.05)
  assert not _results(spec, expected, actual, facts)[
      "consumer/keras3_tfsm_layer/fit"].passed


def test_a_fit_step_without_the_modules_step_fails_and_one_not_asked_for_has_no_row():
  spec, expected, actual, facts = _with_consumers()
  expected.steps["train"] = ExpectedStep(error="InvalidArgumentError: boom")
  row = _results(spec, expected, actual, facts)["consumer/keras3_tfsm_layer/fit"]
  assert not row.passed and "module's training step failed" in row.detail
  spec, expected, actual, facts = _with_consumers()
  actual.consumer_runs.remove("keras3_tfsm_layer/fit")
  assert "consumer/keras3_tfsm_layer/fit" not in _results(spec, expected, actual, facts)


def test_a_check_that_raises_becomes_a_failed_row():
  def broken(spec, expected, actual, facts, tol):
    yield compare.check("broken/first", True, "given before the error")
    raise KeyError("signature 'x'")

  checks = (verify_checks.Check("broken/<step>", broken),
            verify_checks.CHECKS[0])
  results = verify_checks.run_checks(*_sides(), checks=checks)
  assert [(r.name, r.passed) for r in results] == [
      ("broken/first", True), ("broken/<step>", False), ("metadata/source", True)]
  assert results[1].detail == "the check raised KeyError: \"signature 'x'\""


def test_the_report_escapes_module_text_on_every_line():
  from migrate import verify as verify_lib  # pylint: disable=g-import-not-at-top
  name = "signature/evil\nFAKE ROW ok/\x1b[31mkey\u202e"
  report = verify_lib.ParityReport(
      old_path="old", new_path="new",
      checks=[compare.check("metadata/source", True, "fine"),
              compare.check(name, False, "output 'a\nb' differs")],
      warnings=["signature 'x\ny' failed"], consumers_ran=["tf1_loader"],
      consumers_skipped=["tflite"])
  table = report.format_table()
  lines = table.split("\n")
  assert all(line.isprintable() for line in lines)
  assert sum("FAKE ROW" in line for line in lines) == 2  # Its row and its FAIL line.
  assert lines[2].startswith(errors.printable(name))
  assert "consumers (default): ran tf1_loader; skipped as expensive: tflite" in table
  summary = report.summary()
  assert summary.isprintable() and "\\n" in summary and "\\x1b" in summary
  assert "consumers: 1 ran, 1 skipped as expensive" in summary
  data = json.loads(report.to_json())
  assert data["checks"][1]["name"] == errors.printable(name)
  assert data["checks"][1]["detail"] == "output 'a\\nb' differs"
  assert data["first_failure"] == errors.printable(name)
  assert data["warnings"] == ["signature 'x\\ny' failed"]
  assert data["consumers"] == {"selection": "default", "ran": ["tf1_loader"],
                               "skipped": ["tflite"]}


def test_compare_many_scale_each_takes_atol_from_each_entrys_largest_value():
  # Logits of -2.3 beside 1000s: a reordered sum errs by a fraction of the
  # largest terms. Each entry has its own scale; a floor of 1 below.
  e = {"big": np.array([1000.0, -2.3], np.float32), "small": np.array([0.5], np.float32)}
  a = {"big": np.array([1000.0, -2.3 + 0.05], np.float32),
       "small": np.array([0.5 + 5e-5], np.float32)}
  assert not compare.compare_many("x", a, e, "consumer_loader").passed
  r = compare.compare_many("x", a, e, "consumer_loader", scale_each=True)
  assert r.passed, r
  a["small"][0] = 0.5 + 3e-4  # 1e-4 (floor 1) + 1e-4 * 0.5 < 3e-4.
  assert not compare.compare_many("x", a, e, "consumer_loader", scale_each=True).passed
  a["small"][0] = np.nan
  assert not compare.compare_many("x", a, e, "consumer_loader", scale_each=True).passed
