"""The saver the export writes (`migrate/export_saver.py`): what the TF1
loader, the C++ loader and TFLite restore through.

The values are compared with the TF1 module's own checkpoint, by the module's
variable names, never with this converter's outputs. That every consumer
then computes the goldens is `tests/test_consumers.py`.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

import migrate
from migrate import build
from migrate import export
from migrate import export_saver
from migrate import legacy_format
from tests import conftest

# Resource variables with hparams, reference variables rewritten, an asset.
NAMES = ["mobilenet_v1_bn_hparams", "refvars_bn", "inference_only_asset"]


def _tf1_session(path: str):
  graph = tf.Graph()
  session = tf.compat.v1.Session(graph=graph)
  with graph.as_default():
    meta_graph = tf.compat.v1.saved_model.load(session, ["serve"], path)
  return session, meta_graph


def _graph_variables(session) -> dict[str, np.ndarray]:
  """Every variable of the session's graph, read after the loader's restore."""
  graph = session.graph
  handles = [op for op in graph.get_operations() if op.type == "VarHandleOp"]
  with graph.as_default():
    reads = [tf.raw_ops.ReadVariableOp(resource=op.outputs[0],
                                       dtype=op.get_attr("dtype"))
             for op in handles]
  return dict(zip([op.name for op in handles], session.run(reads)))


@pytest.mark.parametrize("name", NAMES)
def test_the_tf1_loader_restores_every_variable_to_the_module_s_value(
    convert_cached, name):
  path = convert_cached(name)
  module = legacy_format.read_module(conftest.module_path(name))
  source = tf.train.load_checkpoint(module.checkpoint_prefix)
  session, meta_graph = _tf1_session(path)
  with session:
    values = _graph_variables(session)
  assert meta_graph.saver_def.restore_op_name.startswith("save")  # This tool's.
  module_names = set(source.get_variable_to_shape_map())
  ours = {n for n in values if not n.startswith(build.METADATA_SCOPE + "/")}
  assert module_names <= ours
  # The others hold asset paths (TensorFlow's, set by the init op).
  assets = os.listdir(os.path.join(path, "assets"))
  for other in ours - module_names:
    assert os.path.basename(values[other].decode()) in assets, other
  for variable in module_names:
    np.testing.assert_array_equal(values[variable], source.get_tensor(variable),
                                  err_msg=variable)
  assert values[f"{build.METADATA_SCOPE}/tool_version"] == migrate.__version__.encode()


def test_the_saver_s_save_writes_the_checkpoint_it_restores(convert_cached, tmp_path):
  path = convert_cached("mobilenet_v1_bn_hparams")
  prefix = str(tmp_path / "ckpt")
  session, meta_graph = _tf1_session(path)
  with session:
    written = session.run(meta_graph.saver_def.save_tensor_name,
                          {meta_graph.saver_def.filename_tensor_name: prefix})
  assert written.decode() == prefix
  saved = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
  again = tf.train.load_checkpoint(prefix)
  keys = set(saved.get_variable_to_shape_map())
  assert set(again.get_variable_to_shape_map()) == keys
  assert export_saver.OBJECT_GRAPH_KEY in keys
  for key in keys:
    np.testing.assert_array_equal(again.get_tensor(key), saved.get_tensor(key),
                                  err_msg=key)


class _TwoOfOneName(tf.Module):
  """Two variables TensorFlow names alike: the saved graph calls the second
  `w_1`, so `export_saver` cannot pair it with the checkpoint by name."""

  def __init__(self):
    super().__init__()
    self.first = tf.Variable([1.0, 2.0], name="w")
    self.second = tf.Variable([3.0], name="w")

  @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
  def __call__(self, x):
    return x * tf.reduce_sum(self.first) + self.second


class _NamedLikeAnAssetPath(tf.Module):
  """A variable named as TensorFlow names the variable it makes per asset."""

  def __init__(self, asset_file: str):
    super().__init__()
    self.asset = tf.saved_model.Asset(asset_file)
    self.v = tf.Variable(b"x", name="Variable")


@pytest.mark.parametrize("case", ["two_of_one_name", "named_like_an_asset_path"])
def test_unpaired_variables_change_nothing(tmp_path, case):
  path = str(tmp_path / "model")
  if case == "two_of_one_name":
    root = _TwoOfOneName()
  else:
    (tmp_path / "vocab.txt").write_text("a\n")
    root = _NamedLikeAnAssetPath(str(tmp_path / "vocab.txt"))
  tf.saved_model.save(root, path, options=build.SAVE_OPTIONS)
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    before = f.read()
  assert not export_saver.add_saver(path)
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    assert f.read() == before


def test_unpaired_variables_get_tensorflow_s_saver(tmp_path):
  root = _TwoOfOneName()
  built = build.BuiltModel(
      root=root, plan=None, signatures={"serving_default": root.__call__.get_concrete_function()},
      notes=[], output_dropout_removed=None, output_dropout_kept=None,
      reference_variables_rewritten=(), train_output_random=False)
  staged = export.stage(built, str(tmp_path / "model"))
  try:
    session, meta_graph = _tf1_session(staged.path)
    with session:
      values = _graph_variables(session)
      out = session.run(meta_graph.signature_def["serving_default"].outputs["output_0"].name,
                        {meta_graph.signature_def["serving_default"].inputs["x"].name: [1.0]})
  finally:
    staged.discard()
  assert not meta_graph.saver_def.restore_op_name.startswith("save")  # TensorFlow's.
  assert sorted(map(list, values.values())) == [[1.0, 2.0], [3.0]]
  np.testing.assert_array_equal(out, [6.0])
