"""The SCAN stage's allowlist (issue #14): static checks, no process per case.

- every op the installed TensorFlow registers is classified (allowed, a
  checkpoint op, refused by family, or reviewed by hand in
  tests/reviewed_ops.txt): a TensorFlow upgrade that adds ops fails here
  until someone classifies them;
- checkpoint ops pass only in the shape of a real saver: TF1
  `tf.compat.v1.train.Saver` subgraphs (sharded or not, resource or
  reference variables) and the TF2 saver functions that
  `tf.saved_model.save` writes; forgeries of each part are refused;
- function-valued attributes, gradient functions and the object graph are
  followed; ops that read files through an attribute are refused;
- a module with a real saver converts and verifies.
"""

from __future__ import annotations

import os

import pytest
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2
from tensorflow.core.framework import function_pb2
from tensorflow.core.protobuf import config_pb2
from tensorflow.python.client import pywrap_tf_session
from tensorflow.core.framework import op_def_pb2
from tensorflow.python.framework import meta_graph

from migrate import errors
from migrate import legacy_format
from migrate import safety
from tests import bad_inputs as bi

SMALL = "classifier_probabilities"  # Resource variables, train graph.
REFVARS = "refvars_bn"  # Reference variables (VariableV2, Assign).
REVIEWED = os.path.join(os.path.dirname(__file__), "reviewed_ops.txt")
# Registered only after the first TFLite conversion in the process (by the
# converter's library), so present or not depending on the tests run before.
LAZILY_REGISTERED = {"TFLite_Detection_PostProcess", "UnidirectionalSequenceLstm",
                     "UnidirectionalSequenceRnn"}


def _registered_ops() -> list[str]:
  buffer = pywrap_tf_session.TF_GetAllOpList()
  ops = op_def_pb2.OpList()
  ops.ParseFromString(bytes(pywrap_tf_session.TF_GetBuffer(buffer)))
  return sorted(op.name for op in ops.op)


def _reviewed() -> set[str]:
  with open(REVIEWED, encoding="utf-8") as f:
    return {line.strip() for line in f
            if line.strip() and not line.startswith("#")}


def test_every_registered_op_is_classified():
  registered = _registered_ops()
  assert len(registered) > 1500, len(registered)
  reviewed = _reviewed()
  verdicts = {op: safety.classify_op(op)[0] for op in registered}
  needs_review = sorted(op for op, v in verdicts.items()
                        if v == "unknown" and op not in reviewed)
  assert not needs_review, (
      f"{len(needs_review)} op(s) of TensorFlow {tf.__version__} are not "
      f"classified: allow them in migrate/safety.py (with a reason), give "
      f"them a refusal family, or list them in {REVIEWED} after review: "
      f"{needs_review}")
  # The lists name real ops: a typo or a removed op shows here.
  assert not sorted(set(safety.ALLOWED_OPS) - set(registered))
  assert not sorted(set(safety.CHECKPOINT_OPS) - set(registered))
  assert not sorted(reviewed - set(registered) - LAZILY_REGISTERED)
  assert not sorted(reviewed & {op for op, v in verdicts.items() if v != "unknown"})
  # What reaches outside is never on the allowlist.
  for op in ("ReadFile", "WriteFile", "PyFunc", "EagerPyFunc", "PrintV2",
             "Print", "FixedUnigramCandidateSampler", "MatchingFiles",
             "InitializeTableFromTextFileV2", "TFRecordDataset", "RemoteCall",
             "_Send", "Save", "Restore", "ImmutableConst", "DecodeProtoV2",
             "DebugIdentityV2", "Skipgram", "Abort", "LoadAndRemapMatrix"):
    assert verdicts[op] == "refused", (op, verdicts[op])


# -- modules with savers ------------------------------------------------------------

def _with_tf1_saver(src: str, sharded: bool) -> str:
  """Adds a real tf.compat.v1.train.Saver to every MetaGraph of the module."""
  def add(sm):
    for mg in sm.meta_graphs:
      graph = tf.Graph()
      with graph.as_default():
        # (tf.compat.v1.train.import_meta_graph would add a saver of its own.)
        meta_graph.import_scoped_meta_graph(mg, clear_devices=True)
        saver = tf.compat.v1.train.Saver(sharded=sharded)
        mg.graph_def.CopyFrom(graph.as_graph_def())
        mg.saver_def.CopyFrom(saver.as_saver_def())
  bi.edit_saved_model(src, add)
  return src


@pytest.fixture(scope="module")
def saver_modules(tmp_path_factory):
  base = tmp_path_factory.mktemp("savers")
  result = {}
  for name in (SMALL, REFVARS):
    for sharded in (False, True):
      key = f"{name}_{'sharded' if sharded else 'single'}"
      result[key] = _with_tf1_saver(
          bi.copy_fixture(name, str(base / key)), sharded)
  return result


def _scan(src: str) -> list[safety.UnsafeOp]:
  return safety.find_unsafe_ops(legacy_format.read_module(src))


@pytest.mark.parametrize("key", [f"{n}_{s}" for n in (SMALL, REFVARS)
                                 for s in ("single", "sharded")])
def test_a_real_tf1_saver_passes(saver_modules, key):
  sm = bi.read_saved_model(saver_modules[key])
  ops = {n.op for mg in sm.meta_graphs for n in mg.graph_def.node}
  assert {"RestoreV2", "SaveV2"} <= ops
  assert not _scan(saver_modules[key])


def _forge(src: str, dest: str, fn) -> str:
  """A copy of `src` whose inference MetaGraph `fn(mg, nodes)` changed."""
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dest)

  def apply(sm):
    for mg in sm.meta_graphs:
      if not mg.meta_info_def.tags:
        fn(mg, {n.name: n for n in mg.graph_def.node})
  bi.edit_saved_model(dest, apply)
  return dest


def _const(mg, name: str, value) -> None:
  node = mg.graph_def.node.add()
  node.CopyFrom(tf.constant(value, name=name).op.node_def
                if False else _const_node(name, value))


def _const_node(name, value):
  graph = tf.Graph()
  with graph.as_default():
    tf.constant(value, name=name)
  return graph.as_graph_def().node[0]


def _set_input(node, i, ref):
  data = [k for k, r in enumerate(node.input) if not r.startswith("^")]
  node.input[data[i]] = ref


def _output_node(mg) -> str:
  sig = mg.signature_def["default"]
  return next(iter(sig.outputs.values())).name.split(":")[0]


def _forgeries():
  def prefix_const(mg, nodes):  # SaveV2 writes where the module says.
    mg.graph_def.node.append(_const_node("save/evil_path", "/tmp/evil_ckpt"))
    _set_input(nodes["save/SaveV2"], 0, "save/evil_path")

  def suffix_escape(mg, nodes):  # The shard suffix climbs out of the prefix.
    const = nodes.get("save/Const_2") or nodes["save/Const_1"]
    const.attr["value"].tensor.string_val[0] = b"/../../../tmp/evil"

  def merge_destination(mg, nodes):
    mg.graph_def.node.append(_const_node("save/evil_dest", "/tmp/evil_merged"))
    _set_input(nodes["save/MergeV2Checkpoints"], 1, "save/evil_dest")

  def restore_from_const(mg, nodes):  # Reads a file the module names.
    mg.graph_def.node.append(_const_node("save/evil_src", "/etc/evil"))
    _set_input(nodes["save/RestoreV2"], 0, "save/evil_src")

  def restored_value_on_output(mg, nodes):
    nodes[_output_node(mg)].input.append("^save/RestoreV2")

  def restore_in_update_ops(mg, nodes):
    mg.collection_def["update_ops"].node_list.value.append("save/restore_all")

  def restore_in_table_initializer(mg, nodes):
    mg.collection_def["table_initializer"].node_list.value.append(
        "save/restore_all")

  def restore_as_main_op(mg, nodes):
    mg.collection_def["saved_model_main_op"].node_list.value.append(
        "save/restore_all")

  def filename_tensor_is_a_path(mg, nodes):
    nodes["save/filename/input"].attr["value"].tensor.string_val[0] = b"/tmp/x"

  def no_saver_def(mg, nodes):
    mg.ClearField("saver_def")

  def saver_def_elsewhere(mg, nodes):  # The SaverDef's names do not matter.
    mg.graph_def.node.append(_const_node("other/Const", "model"))
    mg.saver_def.filename_tensor_name = "other/Const:0"

  def assigns_a_non_variable(mg, nodes):
    restore_assigns = [n for n in mg.graph_def.node
                       if n.name.startswith("save/Assign")]
    restore_assigns[0].input[0] = _output_node(mg)

  def assigns_a_constant(mg, nodes):
    mg.graph_def.node.append(_const_node("save/zero", 0.0))
    assign = next(n for n in mg.graph_def.node if n.name.startswith("save/Assign")
                  and n.op in ("Assign", "AssignVariableOp"))
    assign.input[1] = "save/zero"
    assign.input.append("^save/RestoreV2")

  def tensor_names_not_const(mg, nodes):
    _set_input(nodes["save/RestoreV2"], 1, "save/Const")

  # The TF1 loader and TF Serving run the restore op, feeding the model's own
  # variables/ path: a save there would replace the weights.
  def restore_runs_a_save(mg, nodes):
    nodes["save/restore_all"].input.append("^save/SaveV2")

  def restore_op_is_the_save(mg, nodes):
    mg.saver_def.restore_op_name = "save/MergeV2Checkpoints"

  def save_runs_a_restore(mg, nodes):
    nodes[mg.saver_def.save_tensor_name.split(":")[0]].input.append(
        "^save/restore_all")

  return {f.__name__: f for f in (
      prefix_const, suffix_escape, merge_destination, restore_from_const,
      restored_value_on_output, restore_in_update_ops,
      restore_in_table_initializer, restore_as_main_op,
      filename_tensor_is_a_path, no_saver_def, saver_def_elsewhere,
      assigns_a_non_variable, assigns_a_constant, tensor_names_not_const,
      restore_runs_a_save, restore_op_is_the_save, save_runs_a_restore)}


FORGERIES = _forgeries()


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_savers_are_refused(saver_modules, tmp_path, name):
  key = f"{SMALL}_sharded"
  if name == "assigns_a_constant":
    key = f"{REFVARS}_single"
  src = _forge(saver_modules[key], str(tmp_path / "src"), FORGERIES[name])
  found = _scan(src)
  assert found, f"{name}: a forged saver passed the scan"
  assert all("(" not in op.op for op in found)
  with pytest.raises(errors.UnsafeOpsError) as info:
    safety.check_module(legacy_format.read_module(src), allow_unsafe_ops=False)
  assert "\n" not in str(info.value)


def test_a_module_with_a_real_saver_converts_and_verifies(saver_modules, tmp_path):
  from migrate import convert  # pylint: disable=g-import-not-at-top
  src = saver_modules[f"{SMALL}_sharded"]
  digest = bi.tree_digest(src)
  result = convert.convert(src, str(tmp_path / "out"))
  assert result.verified
  assert bi.tree_digest(src) == digest


# -- TF2 SavedModels (the output, and NEW of verify) ------------------------------

@pytest.fixture(scope="module")
def tf2_with_saver(tmp_path_factory):
  # Saved with TensorFlow's defaults: with the saver (_traced_save/restore).
  return bi.make_tf2_saved_model(str(tmp_path_factory.mktemp("tf2") / "model"))


def test_the_tf2_saver_passes(tf2_with_saver):
  sm = bi.read_saved_model(tf2_with_saver)
  fops = {n.op for f in sm.meta_graphs[0].graph_def.library.function
          for n in f.node_def}
  assert {"RestoreV2", "SaveV2", "MergeV2Checkpoints"} <= fops
  assert not safety.check_saved_model(tf2_with_saver, allow_unsafe_ops=False)
  before = sm.SerializeToString()
  assert not safety.scan_meta_graphs(sm.meta_graphs)
  assert sm.SerializeToString() == before  # The scan changes nothing it reads.


def _edit_tf2(src: str, dest: str, fn) -> str:
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dest)
  bi.edit_saved_model(dest, lambda sm: fn(sm.meta_graphs[0]))
  return dest


def _function(mg, part: str):
  return next(f for f in mg.graph_def.library.function
              if part in f.signature.name)


def test_tf2_saver_function_called_from_a_signature_is_refused(tf2_with_saver,
                                                               tmp_path):
  def call_restore(mg):
    restore = _function(mg, "_traced_restore").signature.name
    call = next(f for f in mg.graph_def.library.function
                if "__call__" in f.signature.name)
    node = call.node_def.add(name="sneaky", op="StatefulPartitionedCall")
    node.attr["f"].func.name = restore
  path = _edit_tf2(tf2_with_saver, str(tmp_path / "m"), call_restore)
  found = safety.check_saved_model(path, allow_unsafe_ops=True)
  assert any("calls the checkpoint function" in op.reaches for op in found), found


def test_tf2_save_to_a_constant_path_is_refused(tf2_with_saver, tmp_path):
  def constant_prefix(mg):
    save = _function(mg, "_traced_save")
    save.node_def.append(_const_node("evil", "/tmp/evil"))
    merge = next(n for n in save.node_def if n.op == "MergeV2Checkpoints")
    merge.input[1] = "evil:output:0"
  path = _edit_tf2(tf2_with_saver, str(tmp_path / "m"), constant_prefix)
  with pytest.raises(errors.UnsafeOpsError, match="MergeV2Checkpoints"):
    safety.check_saved_model(path, allow_unsafe_ops=False)


@pytest.mark.parametrize("how", ["restore_op_is_the_save", "restore_saves_too"])
def test_tf2_restore_that_writes_a_checkpoint_is_refused(tf2_with_saver, tmp_path,
                                                         how):
  def edit(mg):
    if how == "restore_op_is_the_save":
      mg.saver_def.restore_op_name = mg.saver_def.save_tensor_name.split(":")[0]
      return
    save, restore = _function(mg, "_traced_save"), _function(mg, "_traced_restore")
    for node in save.node_def:
      if node.op == "MergeV2Checkpoints":
        merge = restore.node_def.add()
        merge.CopyFrom(node)
        merge.ClearField("input")
        pack = restore.node_def.add(name="evil_pack", op="Pack")
        pack.attr["T"].type = 7  # DT_STRING
        pack.attr["N"].i = 1
        pack.attr["axis"].i = 0
        pack.input.append(restore.signature.input_arg[0].name)
        merge.input.extend(["evil_pack:output:0",
                            restore.signature.input_arg[0].name])
  path = _edit_tf2(tf2_with_saver, str(tmp_path / "m"), edit)
  with pytest.raises(errors.UnsafeOpsError,
                     match="restore op runs it|also restores a checkpoint"):
    safety.check_saved_model(path, allow_unsafe_ops=False)


def test_tf2_checkpoint_function_in_the_object_graph_is_refused(tf2_with_saver,
                                                                tmp_path):
  def expose(mg):
    restore = _function(mg, "_traced_restore").signature.name
    mg.object_graph_def.concrete_functions[restore].SetInParent()
  path = _edit_tf2(tf2_with_saver, str(tmp_path / "m"), expose)
  assert safety.check_saved_model(path, allow_unsafe_ops=True)


def test_tf2_model_writing_a_file_is_refused(tmp_path):
  canary = str(tmp_path / "CANARY")

  class Evil(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def __call__(self, x):
      tf.io.write_file(canary, "x")
      return x
  path = str(tmp_path / "evil")
  tf.saved_model.save(Evil(), path)
  with pytest.raises(errors.UnsafeOpsError, match="WriteFile"):
    safety.check_saved_model(path, allow_unsafe_ops=False)
  assert not os.path.exists(canary)


# -- function attributes, gradients, attribute-borne files ------------------------

def _module_with(tmp_path, nodes=(), functions=(), gradients=()) -> str:
  """A copy of the small module whose inference graph has these additions."""
  src = bi.copy_fixture(SMALL, str(tmp_path / "src"))

  def add(sm):
    graph_def = next(mg for mg in sm.meta_graphs if not mg.meta_info_def.tags).graph_def
    graph_def.node.extend(nodes)
    graph_def.library.function.extend(functions)
    graph_def.library.gradient.extend(gradients)
  bi.edit_saved_model(src, add)
  return src


def _call(name: str, op: str, **funcs):
  node = bi.raw_node(name, op)
  for key, fname in funcs.items():
    node.attr[key].func.name = fname
  return node


def _fdef(fn, *specs):
  return tf.function(fn).get_concrete_function(*specs).function_def


def test_function_attribute_naming_an_op_is_refused(tmp_path):
  """PartitionedCall(f=ReadFile) would run ReadFile itself."""
  src = _module_with(tmp_path, [_call("call", "StatefulPartitionedCall",
                                      f="ReadFile")])
  found = _scan(src)
  assert [op.node for op in found] == ["call"], found
  assert "not a function of the library" in found[0].reaches


def test_branches_are_followed(tmp_path):
  canary = str(tmp_path / "CANARY")

  def write(x):
    tf.io.write_file(canary, x)
    return x
  writer = _fdef(write, tf.TensorSpec([], tf.string))
  src = _module_with(tmp_path, [_call("cond", "If", then_branch=writer.signature.name,
                                      else_branch="NoSuchFunction")],
                     functions=[writer])
  found = {(op.op, op.node.split("/")[0]) for op in _scan(src)}
  assert ("WriteFile", writer.signature.name) in found
  assert ("If", "cond") in found  # else_branch names no function.


def test_gradient_functions_are_scanned(tmp_path):
  reader = _fdef(lambda x: tf.io.read_file(x), tf.TensorSpec([], tf.string))
  forward = _fdef(lambda x: x * 2.0, tf.TensorSpec([], tf.float32))
  gradient = function_pb2.GradientDef(function_name=forward.signature.name,
                                      gradient_func=reader.signature.name)
  missing = function_pb2.GradientDef(function_name=forward.signature.name,
                                     gradient_func="NoSuchGradient")
  src = _module_with(tmp_path, functions=[reader, forward],
                     gradients=[gradient, missing])
  found = _scan(src)
  assert any(op.op == "ReadFile" for op in found), found
  assert any(op.op == "NoSuchGradient" for op in found), found


def test_ops_reading_files_through_attributes_are_refused(tmp_path):
  sampler = bi.raw_node("sampler", "FixedUnigramCandidateSampler",
                        vocab_file=b"/etc/passwd")
  skipgram = bi.raw_node("skipgram", "Skipgram", filename=b"/etc/passwd")
  proto = bi.raw_node("proto", "DecodeProtoV2", descriptor_source=b"/etc/x")
  src = _module_with(tmp_path, [sampler, skipgram, proto])
  found = {op.node: op.reaches for op in _scan(src)}
  assert set(found) == {"sampler", "skipgram", "proto"}, found
  assert "vocabulary file" in found["sampler"]


def test_function_call_with_a_cluster_config_is_refused(tmp_path):
  identity = _fdef(lambda x: x, tf.TensorSpec([], tf.float32))
  config = config_pb2.ConfigProto()
  config.cluster_def.job.add(name="worker").tasks[0] = "evil.example:2222"
  call = _call("call", "PartitionedCall", f=identity.signature.name)
  call.attr["config_proto"].CopyFrom(
      attr_value_pb2.AttrValue(s=config.SerializeToString()))
  src = _module_with(tmp_path, [call], functions=[identity])
  found = _scan(src)
  assert [op.node for op in found] == ["call"] and "cluster_def" in found[0].reaches


def test_unknown_and_internal_ops_are_refused(tmp_path):
  src = _module_with(tmp_path, [bi.raw_node("a", "NoSuchOp"),
                                bi.raw_node("b", "_Recv"),
                                bi.raw_node("c", "Print")])
  found = {op.node: op.reaches for op in _scan(src)}
  assert found["a"] == "not in the allowlist"
  assert found["b"] == "network or other processes"
  assert found["c"] == "file system"


def test_names_in_messages_are_escaped(tmp_path):
  src = _module_with(tmp_path, [bi.raw_node("evil\nmigrate-hub-module: ok\x1b[2J",
                                            "WriteFile")])
  with pytest.raises(errors.UnsafeOpsError) as info:
    safety.check_module(legacy_format.read_module(src), allow_unsafe_ops=False)
  text = str(info.value)
  assert "\n" not in text and "\x1b" not in text
  assert "evil\\nmigrate-hub-module: ok\\x1b[2J" in text


def test_printable():
  assert errors.printable("plain é 中") == "plain é 中"
  assert errors.printable("a\nb\r\t\x1b[31m\u202e\x7f") == (
      "a\\nb\\r\\t\\x1b[31m\\u202e\\x7f")
  assert errors.printable(os.fsdecode(b"caf\xe9")) == "caf\\xe9"
  once = errors.printable("x\ny")
  assert errors.printable(once) == once
