"""REWRITE on tiny hand-made GraphDefs: each rewrite's structure, and what the
rewritten graph computes when TensorFlow runs it (a TF1 Session, graph mode).

Fast: a few nodes per graph, no module, no conversion.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from tensorflow.python.framework import function as tf1_function

from migrate import errors
from migrate import graph_rewrite

v1 = tf.compat.v1


def _run(graph_def: graph_pb2.GraphDef, fetches, targets=(), feeds=None):
  """Imports `graph_def` into a fresh graph and runs it in a TF1 Session."""
  with tf.Graph().as_default() as g:
    tf.graph_util.import_graph_def(graph_def, name="")
    with v1.Session(graph=g) as sess:
      for target in targets:
        sess.run(target)
      return sess.run(fetches, feed_dict=feeds)


def _copy(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
  out = graph_pb2.GraphDef()
  out.CopyFrom(graph_def)
  return out


# -- reference -> resource variables --------------------------------------------------

def _ref_variable_graph() -> graph_pb2.GraphDef:
  """w (VariableV2) = c; w -= c; read after the update; IsVariableInitialized."""
  with tf.Graph().as_default() as g:
    w = v1.Variable([1.0, 2.0], name="w", use_resource=False)
    c = tf.constant([0.5, 0.5], name="c")
    v1.assign(w, [3.0, 4.0], name="init")
    update = v1.assign_sub(w, c, name="update")
    tf.identity(update, name="after")
    tf.identity(w, name="read")
    tf.identity(v1.is_variable_initialized(w), name="initialized")
  return g.as_graph_def()


def test_reference_variables_become_resource_variables():
  graph_def = _ref_variable_graph()
  before = _copy(graph_def)
  out = graph_rewrite.to_resource_variables(graph_def)
  assert graph_def == before, "the input is never changed"
  nodes = {n.name: n for n in out.node}
  assert graph_rewrite.ref_variables(out) == []
  assert nodes["w"].op == "VarHandleOp" and nodes["w"].attr["shared_name"].s == b"w"
  assert nodes["w/migrate_read"].op == "ReadVariableOp"
  assert list(nodes["w/read"].input) == ["w/migrate_read"]  # The Variable's own read.
  assert nodes["IsVariableInitialized"].op == "VarIsInitializedOp"
  assert nodes["init"].op == "AssignVariableOp"
  assert nodes["update"].op == "AssignSubVariableOp"
  # What consumed the updated ref reads the variable after the update.
  assert list(nodes["update/migrate_read"].input) == ["w", "^update"]
  assert list(nodes["after"].input) == ["update/migrate_read"]
  # The same values as the reference-variable graph.
  fetches = ["after:0", "initialized:0"]
  for graph in (out, before):
    after, initialized = _run(graph, fetches, targets=["init"])
    assert np.array_equal(after, [2.5, 3.5]) and initialized


def test_a_graph_without_reference_variables_is_returned_as_is():
  with tf.Graph().as_default() as g:
    tf.identity(tf.constant(1.0), name="x")
  graph_def = g.as_graph_def()
  assert graph_rewrite.to_resource_variables(graph_def) is graph_def


def test_an_op_that_cannot_be_rewritten_is_refused_before_anything_changes():
  with tf.Graph().as_default() as g:
    w = v1.Variable([1.0, 2.0], name="w", use_resource=False)
    v1.scatter_add(w, [0], [1.0], name="scatter")
  graph_def = g.as_graph_def()
  before = _copy(graph_def)
  with pytest.raises(errors.UnsupportedModuleError, match="node 'scatter'.*ScatterAdd.*'w'"):
    graph_rewrite.to_resource_variables(graph_def)
  assert graph_def == before


# -- output dropout ------------------------------------------------------------------

def _dropout_graph(pattern: str) -> graph_pb2.GraphDef:
  """x -> dropout (rate 0.5) -> Squeeze -> Identity 'out'; 'logits' also uses it."""
  with tf.Graph().as_default() as g:
    x = v1.placeholder(tf.float32, [None, 1, 1, 4], name="x")
    if pattern == "div_floor":  # What TF 1.x's nn.dropout emitted.
      keep = tf.constant(0.5)
      noise = keep + v1.random_uniform(tf.shape(x))
      dropped = tf.math.divide(x, keep) * tf.floor(noise)
    else:  # TF 2's nn.dropout in a graph.
      dropped = tf.nn.dropout(x, rate=0.5)
    tf.identity(tf.squeeze(dropped, [1, 2], name="squeeze"), name="out")
    tf.reduce_sum(dropped, name="logits")
  return g.as_graph_def()


@pytest.mark.parametrize("pattern", ["div_floor", "select_v2"])
def test_output_dropout_is_found_and_bypassed(pattern):
  graph_def = _dropout_graph(pattern)
  match = graph_rewrite.find_output_dropout(graph_def, "out:0")
  assert match is not None and match.pattern == pattern, match
  assert match.input_tensor == "x" and match.pass_through == ("squeeze", "out")
  before = _copy(graph_def)
  out, tensor = graph_rewrite.bypass_output_dropout(graph_def, "out:0", match)
  assert graph_def == before
  assert tensor == "out/migrate_nodropout:0"
  x = np.arange(1, 9, dtype=np.float32).reshape(2, 1, 1, 4)
  kept, dropped = _run(out, [tensor, "out:0"], feeds={"x:0": x})
  assert np.array_equal(kept, x.reshape(2, 4)), "the bypass is the dropout's input"
  assert not np.array_equal(dropped, kept), "the original output still drops"
  # Every other consumer (the logits) keeps the dropout: nothing else changed.
  added = [n for n in out.node if n.name not in {m.name for m in graph_def.node}]
  assert [n.name for n in added] == ["squeeze/migrate_nodropout", "out/migrate_nodropout"]
  assert list(out.node)[:len(graph_def.node)] == list(graph_def.node)


def test_no_output_dropout_where_the_output_does_not_end_in_one():
  with tf.Graph().as_default() as g:
    x = v1.placeholder(tf.float32, [None, 4], name="x")
    tf.identity(tf.nn.relu(tf.nn.dropout(x, rate=0.5)), name="out")  # Relu after it.
    tf.identity(x * 2.0, name="plain")
  graph_def = g.as_graph_def()
  assert graph_rewrite.find_output_dropout(graph_def, "out:0") is None
  assert graph_rewrite.find_output_dropout(graph_def, "plain:0") is None
  assert graph_rewrite.depends_on_random(graph_def, "out:0")
  assert not graph_rewrite.depends_on_random(graph_def, "plain:0")


def test_dropout_after_other_random_ops_is_not_output_dropout():
  with tf.Graph().as_default() as g:
    x = v1.placeholder(tf.float32, [None, 4], name="x")
    noisy = x + v1.random_normal(tf.shape(x))
    tf.identity(tf.nn.dropout(noisy, rate=0.5), name="out")
  assert graph_rewrite.find_output_dropout(g.as_graph_def(), "out:0") is None


# -- gradients -----------------------------------------------------------------------

def _swish_defun_graph() -> graph_pb2.GraphDef:
  """TF 1.x's tf.nn.swish: a Defun whose gradient is another library function."""
  @tf1_function.Defun(tf.float32, tf.float32, func_name="swish_grad")
  def swish_grad(x, dy):
    s = tf.sigmoid(x)
    return dy * s * (1 + x * (1 - s))

  @tf1_function.Defun(tf.float32, grad_func=swish_grad, func_name="swish")
  def swish(x):
    return x * tf.sigmoid(x)

  with tf.Graph().as_default() as g:
    x = v1.placeholder(tf.float32, [3], name="x")
    tf.identity(swish(x, name="call"), name="y")
  return g.as_graph_def()


def test_a_call_with_a_library_gradient_gets_an_identity_that_names_it():
  graph_def = _swish_defun_graph()
  assert [(gd.function_name, gd.gradient_func) for gd in graph_def.library.gradient] == [
      ("swish", "swish_grad")]
  before = _copy(graph_def)
  out, repairs = graph_rewrite.repair_gradients(graph_def, graph_rewrite.has_gradient, "m")
  assert graph_def == before
  assert repairs.library == ("call",) and repairs.forward == ()
  assert repairs.functions == {"swish": "swish_grad"}
  nodes = {n.name: n for n in out.node}
  forward = "call" + graph_rewrite.LIBRARY_FORWARD_SUFFIX
  assert nodes[forward].op == "swish"
  wrapper = nodes["call"]
  assert wrapper.op == "IdentityN" and list(wrapper.input) == [f"{forward}:0", "x"]
  gradient = wrapper.attr[graph_rewrite.LIBRARY_GRADIENT_ATTR].func
  assert gradient.name == "swish_grad" and gradient.attr["num_results"].i == 1
  # Forward values unchanged.
  x = np.array([-1.0, 0.0, 2.0], np.float32)
  assert np.allclose(_run(out, "y:0", feeds={"x:0": x}), x / (1 + np.exp(-x)))
  # A TF1 Session differentiates the call itself: left alone on request.
  same, none = graph_rewrite.repair_gradients(graph_def, graph_rewrite.has_gradient, "m",
                                              wrap_library_calls=False)
  assert same is graph_def and not none


def _custom_gradient_graph(forward: str) -> graph_pb2.GraphDef:
  """tf.custom_gradient's shape as TF 2.x exported it: IdentityN(result, x)
  with `_gradient_op_type` naming a Python function that was not saved."""
  with tf.Graph().as_default() as g:
    x = v1.placeholder(tf.float32, [3], name="x")
    result = x * tf.sigmoid(x) if forward == "swish" else tf.round(x)
    tf.identity(tf.raw_ops.IdentityN(input=[result, x], name="swish")[0], name="y")
  graph_def = g.as_graph_def()
  node = next(n for n in graph_def.node if n.name == "swish")
  node.attr[graph_rewrite.GRADIENT_OP_TYPE_ATTR].s = b"CustomGradient-42"
  return graph_def


def test_a_lost_custom_gradient_is_replaced_by_its_forward_computation():
  graph_def = _custom_gradient_graph("swish")
  x = np.array([-1.0, 0.0, 2.0], np.float32)

  def gradient(gd):
    with tf.Graph().as_default() as g:
      tf.graph_util.import_graph_def(gd, name="")
      grad = tf.gradients(g.get_tensor_by_name("y:0"), g.get_tensor_by_name("x:0"))[0]
      with v1.Session(graph=g) as sess:
        return sess.run(grad, {"x:0": x})

  with pytest.raises(LookupError):  # Not even hub.Module could differentiate it.
    gradient(graph_def)
  out, repairs = graph_rewrite.repair_gradients(graph_def, graph_rewrite.has_gradient, "m")
  assert repairs.forward == ("swish",) and repairs.library == ()
  assert graph_rewrite.GRADIENT_OP_TYPE_ATTR not in {
      k for n in out.node if n.name == "swish" for k in n.attr}
  s = 1 / (1 + np.exp(-x))
  assert np.allclose(gradient(out), s * (1 + x * (1 - s)), atol=1e-6)


def test_a_lost_gradient_that_cannot_be_repaired_is_refused_naming_the_node():
  with pytest.raises(errors.UnsupportedModuleError,
                     match=r"m: node 'swish' \(op IdentityN\) lost its custom gradient"):
    graph_rewrite.repair_gradients(_custom_gradient_graph("round"),
                                   graph_rewrite.has_gradient, "m")
  graph_def = _custom_gradient_graph("swish")
  node = next(n for n in graph_def.node if n.name == "swish")
  node.attr[graph_rewrite.GRADIENT_OP_TYPE_ATTR].s = b"MyPythonGradient"
  with pytest.raises(errors.UnsupportedModuleError,
                     match="'MyPythonGradient', a Python function the module does not contain"):
    graph_rewrite.repair_gradients(graph_def, graph_rewrite.has_gradient, "m")


def test_a_graph_without_lost_gradients_is_returned_as_is():
  with tf.Graph().as_default() as g:
    tf.nn.relu(v1.placeholder(tf.float32, [3], name="x"), name="y")
  graph_def = g.as_graph_def()
  out, repairs = graph_rewrite.repair_gradients(graph_def, graph_rewrite.has_gradient, "m")
  assert out is graph_def and not repairs
  assert graph_rewrite.has_gradient("Relu") and not graph_rewrite.has_gradient("NoSuchOp")
