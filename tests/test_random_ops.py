"""Random ops in verification: never run, fed the same values on both sides (issue 13).

Real drop path (NASNet) and drop connect (EfficientNet) are `RandomUniform` ops
without a seed, which op determinism (on during verification) refuses to run.
The reference side draws their values in numpy from their inputs; the converted
side runs a training function with random ops only with those values fed, in an
inlined copy. End-to-end parity against the goldens of `hub.Module` is in
test_parity (`test_verify_passes`, `test_training_mode_contract_of_stochastic_graphs`).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from migrate import graph_rewrite
from migrate import legacy_format
from migrate import reference
from migrate import verify_actual
from migrate import verify_expected
from migrate import verify_spec
from tests import conftest


def test_random_ops_are_drawn_from_their_inputs_without_running_any():
  graph = tf.Graph()
  with graph.as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None, 3])
    noise_shape = tf.concat([tf.shape(x)[:1], [1]], 0)  # Drop path's [batch, 1].
    uniform = tf.raw_ops.RandomUniform(shape=noise_shape, dtype=tf.float32)
    normal = tf.raw_ops.RandomStandardNormal(shape=tf.constant([2, 5]), dtype=tf.float64)
    truncated = tf.raw_ops.TruncatedNormal(shape=tf.constant([1000]), dtype=tf.float32)
    count = tf.raw_ops.RandomUniformInt(shape=tf.constant([], tf.int32), minval=1, maxval=4)
    # A shape that depends on another random op: drawn after it, with it fed.
    later = tf.raw_ops.RandomUniform(shape=tf.reshape(count, [1]), dtype=tf.float32)
    ops = sorted((op for op in graph.get_operations() if op.type in reference.RANDOM_OPS),
                 key=lambda op: op.name)
  assert len(ops) == 5
  feed = {x: np.zeros((4, 3), np.float32)}
  with verify_spec.deterministic_ops(), tf.compat.v1.Session(graph=graph) as session:
    with pytest.raises(tf.errors.InvalidArgumentError, match="seed"):
      session.run(uniform, feed)  # What is avoided.
    values = reference.draw_random(session, ops, feed, np.random.RandomState(0))
    again = reference.draw_random(session, ops, feed, np.random.RandomState(0))
  value = {t: values[t.op.name] for t in (uniform, normal, truncated, count, later)}
  assert value[uniform].shape == (4, 1) and value[uniform].dtype == np.float32
  assert ((0 <= value[uniform]) & (value[uniform] < 1)).all()
  assert value[normal].shape == (2, 5) and value[normal].dtype == np.float64
  assert np.abs(value[truncated]).max() <= 2.0 and value[truncated].std() > 0.5
  assert value[count].dtype == np.int32 and 1 <= value[count] < 4
  assert value[later].shape == (int(value[count]),)
  for name, v in values.items():
    np.testing.assert_array_equal(v, again[name])


def test_inline_calls_puts_library_functions_in_place():
  """TF 1.x's swish is a Defun called by op type: inlined, the graph computes the
  same, bit for bit (the serving functions are built this way, for TFLite)."""
  module = legacy_format.read_module(conftest.module_path("efficientnet_defun_swish"))
  graph_def = module.inference.graph_def
  library = {f.signature.name for f in graph_def.library.function}
  calls = [n.name for n in graph_def.node if n.op in library]
  assert len(calls) == 7
  inlined = graph_rewrite.inline_calls(graph_def)
  assert not [n for n in inlined.node if graph_rewrite.called_function(n, library)]
  nodes = {n.name: n for n in inlined.node}
  assert all(nodes[c].op == "IdentityN" for c in calls)  # Consumers keep their input.
  assert {n.op for n in inlined.node if n.name.startswith(calls[0] + "/")} >= {"Sigmoid",
                                                                              "Mul"}
  sig = module.inference.signatures["image_classification"]
  images = conftest.golden_arrays("efficientnet_defun_swish")["images/b4_32x32"]
  checkpoint = reference.read_checkpoint(module)
  outputs = []
  for g in (graph_def, inlined):
    with tf.Graph().as_default() as graph:
      tf.compat.v1.import_graph_def(g, name="")
      restore = [tf.raw_ops.AssignVariableOp(resource=op.outputs[0],
                                             value=checkpoint[op.name])
                 for op in graph.get_operations() if op.type == "VarHandleOp"]
      with tf.compat.v1.Session(graph=graph) as session:
        session.run(restore)
        outputs.append(session.run(sig.outputs["default"].tensor_name,
                                   {sig.inputs["images"].tensor_name: images}))
  np.testing.assert_array_equal(outputs[0], outputs[1])


def test_a_training_function_with_random_ops_waits_for_the_modules_values(convert_cached):
  """Before the reference side is known (it runs in a child process), the
  converted side does not run a training step that has random ops: it waits,
  and runs it once the module's values are there."""
  name = "efficientnet_defun_swish"
  src = conftest.module_path(name)
  model = tf.saved_model.load(convert_cached(name))
  module = legacy_format.read_module(src)
  spec = verify_spec.spec_from_metadata(verify_spec.read_metadata(model), module)
  facts = verify_spec.module_facts(module, spec)
  with verify_spec.run_conditions(False):
    converted = verify_actual.ConvertedModel(model, spec, facts)
    actual = converted.training(converted.describe())  # The values are not known.
    assert actual.steps["train"].waiting and actual.steps["train"].output is None
    expected = verify_expected.reference_side(src, spec)
    assert expected.steps["train"].random_values
    actual = converted.feed_random_ops(actual, expected)
  step = actual.steps["train"]
  assert not step.waiting and not step.error and step.random_ops.ok
  np.testing.assert_array_equal(step.output, expected.steps["train"].output)
