"""SCAN's classification on tiny hand-made graphs: what passes, what is
refused and with which reason, by node (functions and attributes followed).

Fast: `safety.scan_meta_graphs` reads protos only; nothing runs. The real
savers, the forgeries of their parts and the registry-wide classification are
in tests/test_safety.py.
"""

from __future__ import annotations

import pytest
from tensorflow.core.protobuf import meta_graph_pb2

from migrate import errors
from migrate import safety


def _meta_graph(nodes, functions=(), tags=("serve",)) -> meta_graph_pb2.MetaGraphDef:
  """A MetaGraphDef of `nodes` given as (name, op, inputs[, {attr: function}])."""
  mg = meta_graph_pb2.MetaGraphDef()
  mg.meta_info_def.tags.extend(tags)
  for name, op, inputs, *attrs in nodes:
    node = mg.graph_def.node.add(name=name, op=op, input=inputs)
    for key, func in (attrs[0] if attrs else {}).items():
      node.attr[key].func.name = func
  for fname, body in functions:
    fdef = mg.graph_def.library.function.add()
    fdef.signature.name = fname
    for name, op, inputs in body:
      fdef.node_def.add(name=name, op=op, input=inputs)
  return mg


def _found(mg) -> list[tuple[str, str, str]]:
  return [(u.node, u.op, u.reaches) for u in safety.scan_meta_graphs([mg])]


def test_a_graph_of_image_model_ops_passes():
  mg = _meta_graph([("images", "Placeholder", []), ("w", "VarHandleOp", []),
                    ("read", "ReadVariableOp", ["w"]),
                    ("conv", "Conv2D", ["images", "read"]), ("relu", "Relu", ["conv"]),
                    ("pool", "Mean", ["relu", "axes"]), ("axes", "Const", []),
                    ("drop", "RandomUniform", ["shape"]), ("shape", "Shape", ["relu"])])
  assert _found(mg) == []


@pytest.mark.parametrize("op, family", [
    ("ReadFile", "file system"), ("WriteFile", "file system"),
    ("PyFunc", "Python"), ("HashTableV2", "table"),
])
def test_ops_that_reach_outside_are_refused_by_family(op, family):
  mg = _meta_graph([("x", "Placeholder", []), ("bad", op, ["x"])])
  ((node, found_op, reaches),) = _found(mg)
  assert (node, found_op) == ("bad", op)
  assert family.lower() in reaches.lower(), reaches
  assert safety.classify_op(op)[0] == "refused"


def test_an_op_nobody_classified_is_refused_as_unknown():
  mg = _meta_graph([("x", "Placeholder", []), ("new", "SomeFutureOp", ["x"])])
  assert _found(mg) == [("new", "SomeFutureOp", "not in the allowlist")]
  assert safety.classify_op("SomeFutureOp") == ("unknown", "not in the allowlist")
  assert safety.classify_op("Conv2D")[0] == "allowed"
  assert safety.classify_op("RestoreV2")[0] == "checkpoint"


def test_library_functions_and_function_attributes_are_followed():
  body = [("x", "Identity", ["a"]), ("leak", "WriteFile", ["x", "x"])]
  mg = _meta_graph([("a", "Placeholder", []),
                    ("call", "PartitionedCall", ["a"], {"f": "fn"}),
                    ("ghost", "PartitionedCall", ["a"], {"f": "Relu"})],
                   functions=[("fn", body)])
  found = _found(mg)
  assert ("fn/leak", "WriteFile") in [(n, o) for n, o, _ in found]
  assert ("ghost", "PartitionedCall",
          "attribute 'f' names 'Relu', not a function of the library") in found
  assert len(found) == 2, found


def test_a_checkpoint_op_outside_a_saver_is_refused():
  mg = _meta_graph([("prefix", "Const", []), ("names", "Const", []),
                    ("slices", "Const", []),
                    ("restore", "RestoreV2", ["prefix", "names", "slices"])])
  assert _found(mg) == [
      ("restore", "RestoreV2", "file system: no SaverDef filename tensor of a saver feeds it"),
      ("restore", "RestoreV2", "file system: not a saver's checkpoint op")]


def test_check_module_refuses_with_one_line_naming_the_nodes():
  class Module:  # What check_module reads of a LegacyModule.
    path = "m"
    variants = {frozenset(): type("V", (), {"meta_graph": _meta_graph(
        [("x", "Placeholder", []), ("bad\nline", "ReadFile", ["x"])])})()}
  with pytest.raises(errors.UnsafeOpsError) as info:
    safety.check_module(Module(), allow_unsafe_ops=False)
  message = str(info.value)
  assert "\n" not in message and "ReadFile at 'bad\\nline'" in message, message
  assert message.startswith("m: expected a graph of pure computations, found 1 op(s)")
  assert len(safety.check_module(Module(), allow_unsafe_ops=True)) == 1
