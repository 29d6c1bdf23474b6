"""Gradients the TF1 module names but cannot carry into TF2 are repaired (issue 13).

Two forms of swish, as real EfficientNet modules hold it: TF 1.x's Defun
`swish_f32` whose gradient `swish_grad_f32f32` is in the function library
(`library.gradient`), and TF 2.x's `tf.nn.swish`, an `IdentityN` whose Python
custom gradient export lost. Expected values are the goldens that `hub.Module`
recorded in the legacy environment (for the TF 2.x form, which `hub.Module`
cannot differentiate, the analytic gradient of the forward computation, see
the golden json's `grad_source`), never this converter's.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub
import tf_keras
from tensorflow.core.protobuf import saved_model_pb2

from migrate import errors
from migrate import graph_rewrite
from migrate import legacy_format
from tests.conftest import golden_arrays, golden_meta, module_path

DEFUN = "efficientnet_defun_swish"
TF2 = "efficientnet_tf2_swish"
FAMILIES = [DEFUN, TF2, "nasnet_cell_droppath"]
RTOL, ATOL = 1e-4, 1e-6


def _classifier(convert_cached, name: str) -> str:
  """The module converted with `__call__` = the golden gradients' output."""
  meta = golden_meta(name)
  assert meta["grad_output_key"] == "default"
  return convert_cached(name, signature=meta["grad_signature"])


def _by_name(variables) -> dict[str, tf.Variable]:
  return {v.name.rsplit(":", 1)[0]: v for v in variables}


@pytest.mark.parametrize("name", FAMILIES)
def test_gradient_tape_on_the_loaded_model_matches_hub_module(convert_cached, name):
  meta, gold = golden_meta(name), golden_arrays(name)
  obj = tf.saved_model.load(_classifier(convert_cached, name))
  batch = meta["train_batch"]
  variables = _by_name(obj.trainable_variables)
  assert sorted(variables) == sorted(meta["trainable_variables"])
  with tf.GradientTape() as tape:
    out = obj(gold[f"images/{batch}"], training=False)
    loss = tf.reduce_sum(out * gold["grad_probe"])
  grads = tape.gradient(loss, list(variables.values()))
  np.testing.assert_allclose(
      out, gold[f"infer/{meta['grad_signature']}/default/{batch}"], rtol=1e-5, atol=1e-5)
  assert not [n for n, g in zip(variables, grads) if g is None]
  actual = np.array([float(tf.norm(g)) for g in grads])
  expected = np.array([float(gold[f"grad_norm_infer/{n}"]) for n in variables])
  np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def _backward_op_types(obj, images) -> set[str]:
  """Op types of a traced gradient of `obj`, its called functions included."""
  @tf.function
  def gradients(x):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(obj(x, training=False))
    return tape.gradient(loss, obj.trainable_variables)

  graph_def = gradients.get_concrete_function(
      tf.TensorSpec(images.shape, tf.float32)).graph.as_graph_def()
  ops = {n.op for n in graph_def.node}
  for function in graph_def.library.function:
    ops.update(n.op for n in function.node_def)
  return ops


def test_library_gradient_is_what_the_converted_model_differentiates_with(convert_cached):
  path = _classifier(convert_cached, DEFUN)
  meta, gold = golden_meta(DEFUN), golden_arrays(DEFUN)
  sm = saved_model_pb2.SavedModel()
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    sm.ParseFromString(f.read())
  library = sm.meta_graphs[0].graph_def.library
  functions = {f.signature.name: f for f in library.function}
  saved = [g.gradient_func for g in library.registered_gradients]
  assert saved, "no gradient saved with the model"
  assert all({n.op for n in functions[g].node_def} & {"swish_grad_f32f32"} for g in saved)
  ops = _backward_op_types(tf.saved_model.load(path),
                           gold[f"images/{meta['train_batch']}"])
  # Loading renames library functions (e.g. __inference_swish_grad_f32f32_32).
  assert any("swish_grad_f32f32" in op for op in ops), sorted(ops)
  assert "SymbolicGradient" not in ops


def test_lost_custom_gradient_differentiates_the_forward_computation(convert_cached):
  path = _classifier(convert_cached, TF2)
  meta, gold = golden_meta(TF2), golden_arrays(TF2)
  ops = _backward_op_types(tf.saved_model.load(path),
                           gold[f"images/{meta['train_batch']}"])
  assert "SigmoidGrad" in ops  # d/dx of x * sigmoid(x), differentiated op by op.
  card = open(os.path.join(path, "MODEL_CARD.md"), encoding="utf-8").read()
  assert "custom gradients were lost" in card and "forward computation" in card
  assert "analytic gradient of that forward computation" in card  # What verification does.
  notes = tf.saved_model.load(path).metadata.notes.numpy().decode()
  assert "custom gradients were lost" in notes


@pytest.mark.parametrize("name", FAMILIES)
def test_keras_layer_fine_tunes(convert_cached, name):
  """hub.KerasLayer(trainable=True) in tf_keras: one fit step through the training
  graph (drop path / drop connect and all) moves weights and moving averages."""
  meta, gold = golden_meta(name), golden_arrays(name)
  layer = hub.KerasLayer(convert_cached(name), trainable=True)
  size = meta["expected_image_size"]
  model = tf_keras.Sequential([tf_keras.layers.InputLayer(input_shape=(*size, 3)), layer,
                               tf_keras.layers.Dense(3)])
  model.compile(optimizer=tf_keras.optimizers.SGD(0.1),
                loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  variables = _by_name(layer.resolved_object.variables)
  trainable = [n for n in meta["trainable_variables"] if variables[n].trainable]
  moving = [n for n in meta["non_trainable_variables"] if n.endswith("moving_mean")]
  before = {n: variables[n].numpy().copy() for n in trainable + moving}
  # Drop connect draws one coin per image and block, unseeded: with the train batch's 4
  # images, a block of survival 0.6 drops its branch for all of them 2.6% of the time and
  # then trains none of its kernels. Four copies of the batch make that 4e-7.
  images = np.tile(gold[f"images/{meta['train_batch']}"], (4, 1, 1, 1))
  history = model.fit(images, np.tile([0, 1, 2, 0], 4), epochs=1, batch_size=16, verbose=0)
  assert np.isfinite(history.history["loss"][0])
  # Every convolution kernel below the feature vector is trained: the gradient passed every
  # swish (or drop path). (The classification head is not on the feature vector's path, and
  # a batch-norm beta right before a training-mode batch norm may get a zero gradient.)
  kernels = [n for n in trainable if "kernel" in n.rsplit("/", 1)[-1] or "weights" in
             n.rsplit("/", 1)[-1]]
  kernels = [n for n in kernels if "/dense/" not in n and "/FC/" not in n]
  unchanged = [n for n in kernels if np.array_equal(variables[n].numpy(), before[n])]
  assert len(kernels) > 10 and not unchanged, unchanged
  assert all(not np.array_equal(variables[n].numpy(), before[n]) for n in moving)


@pytest.mark.parametrize("name,library,forward", [(DEFUN, 7, 0), (TF2, 0, 7)])
def test_repair_gradients_rewrites_each_swish(name, library, forward):
  module = legacy_format.read_module(module_path(name))
  for variant in module.variants.values():
    graph_def, repairs = graph_rewrite.repair_gradients(
        variant.graph_def, graph_rewrite.has_gradient, "test")
    assert (len(repairs.library), len(repairs.forward)) == (library, forward)
    nodes = {n.name: n for n in graph_def.node}
    for name_ in repairs.library:
      wrapper, call = nodes[name_], nodes[name_ + graph_rewrite.LIBRARY_FORWARD_SUFFIX]
      assert wrapper.op == "IdentityN" and call.op == "swish_f32"
      gradient = wrapper.attr[graph_rewrite.LIBRARY_GRADIENT_ATTR].func
      assert (gradient.name, gradient.attr["num_results"].i) == ("swish_grad_f32f32", 1)
      assert list(wrapper.input) == [call.name + ":0", call.input[0]]
    for name_ in repairs.forward:
      assert graph_rewrite.GRADIENT_OP_TYPE_ATTR not in nodes[name_].attr
    assert not any(graph_rewrite.GRADIENT_OP_TYPE_ATTR in n.attr for n in graph_def.node)
  # The input is not changed.
  assert any(graph_rewrite.GRADIENT_OP_TYPE_ATTR in n.attr or n.op == "swish_f32"
             for n in module.inference.graph_def.node)


def test_gradient_override_that_tensorflow_knows_is_kept():
  graph = tf.Graph()
  with graph.as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None])
    with graph.gradient_override_map({"Round": "Identity"}):  # A straight-through estimator.
      tf.round(x, name="ste")
  graph_def, repairs = graph_rewrite.repair_gradients(
      graph.as_graph_def(), graph_rewrite.has_gradient, "test")
  assert not repairs
  assert {n.name: n for n in graph_def.node}["ste"].attr["_gradient_op_type"].s == b"Identity"
  with graph.as_default():
    graph.get_operation_by_name("ste")._set_attr(  # pylint: disable=protected-access
        "_gradient_op_type", tf.compat.v1.AttrValue(s=b"NotRegisteredAnywhere"))
  with pytest.raises(errors.UnsupportedModuleError,
                     match=r"node 'ste' \(op Round\) has the gradient 'NotRegisteredAnywhere'"):
    graph_rewrite.repair_gradients(graph.as_graph_def(), graph_rewrite.has_gradient, "test")


def test_saved_wrappers_still_say_which_gradient_they_need(convert_cached):
  """After loading, each IdentityN still names its (renamed) library gradient, so
  that a copy of a saved function can be differentiated (`build.library_gradient`):
  the saved gradient itself only works inside the function it was saved from."""
  obj = tf.saved_model.load(convert_cached(DEFUN))
  graph_def = obj.__call__.get_concrete_function(
      tf.TensorSpec([None, 32, 32, 3], tf.float32), True).graph.as_graph_def()
  functions = {f.signature.name for f in graph_def.library.function}
  marked = [n.attr[graph_rewrite.LIBRARY_GRADIENT_ATTR].func
            for f in graph_def.library.function for n in f.node_def
            if graph_rewrite.LIBRARY_GRADIENT_ATTR in n.attr]
  assert len(marked) == 7  # Each swish of the training function.
  assert all(m.name in functions and "swish_grad_f32f32" in m.name and
             m.attr["num_results"].i == 1 for m in marked)


def test_a_tf1_session_can_use_the_repair_for_lost_gradients_alone():
  """With wrap_library_calls=False (a Session needs no wrapper for library gradients),
  only lost custom gradients are dropped: the TF1 graph then differentiates."""
  module = legacy_format.read_module(module_path(TF2))
  graph_def, repairs = graph_rewrite.repair_gradients(
      module.train.graph_def, graph_rewrite.has_gradient, "test", wrap_library_calls=False)
  assert len(repairs.forward) == 7
  defun = legacy_format.read_module(module_path(DEFUN)).train.graph_def
  assert graph_rewrite.repair_gradients(defun, graph_rewrite.has_gradient, "test",
                                        wrap_library_calls=False)[1].library == ()
  with tf.Graph().as_default():
    tf.compat.v1.import_graph_def(graph_def, name="")
    graph = tf.compat.v1.get_default_graph()
    out = graph.get_tensor_by_name(
        module.train.signatures["image_classification"].outputs["default"].tensor_name)
    weights = [op.outputs[0] for op in graph.get_operations() if op.type == "VarHandleOp"]
    assert all(g is not None for g in tf.gradients(tf.reduce_sum(out), weights)[:3])
