"""EXPORT, the saver: the SavedModel's `saver_def`, written as plain nodes.

The TF1 loader in a Session (`saved_model_cli run`), the C++
`LoadSavedModel` (TensorFlow Serving) and the TFLite converter restore the
variables through the MetaGraph's SaverDef, not through the object graph.
`tf.saved_model.save` makes that SaverDef by tracing two functions that read
and assign every variable, about 3 ms per variable: 0.9 s of ResNet-v2-50's
conversion, 13 s of a 100k-node graph's ~60 s.

`add_saver` writes the same restore into a SavedModel saved without it
(`experimental_skip_saver=True`), in the shape of a TF1 `Saver`: a string
Placeholder for the checkpoint prefix, one `RestoreV2` and an
`AssignVariableOp` per variable (the restore op), one `SaveV2` of every
variable plus the object graph (the save tensor). Each graph variable is
matched to its checkpoint key through the SavedModel's own object graph and
the checkpoint's (node ids agree), by name, dtype and shape. The match must
be one to one and cover every value of the checkpoint; where it is not (a
name TensorFlow made unique in the graph, a value that is not a variable's),
`add_saver` changes nothing and returns False, and the caller saves with
TensorFlow's own saver.
"""

from __future__ import annotations

import os
import re
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2
from tensorflow.core.framework import graph_pb2
from tensorflow.core.framework import node_def_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.core.protobuf import saver_pb2
from tensorflow.core.protobuf import trackable_object_graph_pb2
from tensorflow.python.framework import op_def_registry
from tensorflow.python.saved_model import fingerprinting_utils

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_VALUE_ATTRIBUTE = "VARIABLE_VALUE"
_CPU = "/device:CPU:0"
_ASSET_VARIABLE = re.compile(r"^Variable(_[0-9]+)?$")


class _Unmatched(Exception):
  """The graph's variables and the checkpoint's values do not pair up."""


def _string_list(values) -> attr_value_pb2.AttrValue:
  tensor = tf.make_tensor_proto([v.encode("utf-8") for v in values], tf.string,
                                shape=[len(values)])
  return attr_value_pb2.AttrValue(tensor=tensor)


class _Nodes:
  """Appends nodes under one scope to a GraphDef."""

  def __init__(self, graph_def: graph_pb2.GraphDef, scope: str):
    self.graph_def = graph_def
    self.scope = scope

  def add(self, name: str, op: str, inputs=(), device: str = "",
          **attrs: attr_value_pb2.AttrValue) -> str:
    node = node_def_pb2.NodeDef(name=f"{self.scope}/{name}", op=op,
                                input=list(inputs), device=device)
    for key, value in attrs.items():
      node.attr[key].CopyFrom(value)
    self.graph_def.node.append(node)
    return node.name


def _unused_scope(graph_def: graph_pb2.GraphDef, base: str) -> str:
  taken = {n.name.split("/", 1)[0] for n in graph_def.node}
  scope, i = base, 0
  while scope in taken:
    i += 1
    scope = f"{base}_{i}"
  return scope


def _type(dtype: int) -> attr_value_pb2.AttrValue:
  return attr_value_pb2.AttrValue(type=dtype)


def _types(dtypes) -> attr_value_pb2.AttrValue:
  return attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(type=dtypes))


def _match(meta_graph, reader) -> list[tuple[str, str, int]]:
  """(VarHandleOp node, checkpoint key, dtype) for every variable of the
  object graph; raises _Unmatched unless the pairing is certain."""
  object_graph = trackable_object_graph_pb2.TrackableObjectGraph.FromString(
      reader.get_tensor(OBJECT_GRAPH_KEY))
  saved = meta_graph.object_graph_def.nodes
  if len(object_graph.nodes) != len(saved):
    raise _Unmatched("object graphs of different sizes")
  by_name: dict[str, tuple[str, object]] = {}
  for i, node in enumerate(saved):
    if node.WhichOneof("kind") != "variable":
      continue
    keys = [a.checkpoint_key for a in object_graph.nodes[i].attributes
            if a.name == _VALUE_ATTRIBUTE]
    if len(keys) != 1 or node.variable.name in by_name:
      raise _Unmatched(f"variable '{node.variable.name}'")
    by_name[node.variable.name] = (keys[0], node.variable)
  # The saved graph names each variable as it was named (`shared_name`),
  # made unique: a name that is another's made unique would pair wrongly.
  # Besides the object graph's variables, the graph holds only the string
  # variables TensorFlow makes for asset paths ("Variable", "Variable_1", ...;
  # set by the init op, not saved), and no variable of ours may be named so.
  handles: dict[str, object] = {}
  for node in meta_graph.graph_def.node:
    if node.op == "VarHandleOp":
      name = node.attr["shared_name"].s.decode("utf-8", "replace")
      if name in handles:
        raise _Unmatched(f"graph variable '{name}'")
      handles[name] = node
  extra = set(handles) - set(by_name)
  if extra and (not all(map(_ASSET_VARIABLE.match, extra)) or
                any(map(_ASSET_VARIABLE.match, by_name))):
    raise _Unmatched(f"graph variables {sorted(extra)[:3]}")
  dtypes = reader.get_variable_to_dtype_map()
  shapes = reader.get_variable_to_shape_map()
  matched = []
  for name, (key, variable) in by_name.items():
    node = handles.get(name)
    if node is None or key not in dtypes:
      raise _Unmatched(f"variable '{name}'")
    dtype = node.attr["dtype"].type
    shape = [d.size for d in node.attr["shape"].shape.dim]
    if (variable.dtype != dtype or dtypes[key].as_datatype_enum != dtype or
        list(shapes[key]) != shape or
        [d.size for d in variable.shape.dim] != shape):
      raise _Unmatched(f"variable '{name}'")
    matched.append((node.name, key, dtype))
  if {key for _, key, _ in matched} != set(dtypes) - {OBJECT_GRAPH_KEY}:
    raise _Unmatched("checkpoint values no graph variable holds")
  return matched


def _add_nodes(graph_def: graph_pb2.GraphDef, matched, object_graph: bytes
               ) -> saver_pb2.SaverDef:
  nodes = _Nodes(graph_def, _unused_scope(graph_def, "save"))
  string = _type(tf.string.as_datatype_enum)
  prefix = nodes.add("filename", "Placeholder", dtype=string,
                     shape=attr_value_pb2.AttrValue(
                         shape=tf.TensorShape([]).as_proto()))
  keys = [key for _, key, _ in matched]
  dtypes = [dtype for _, _, dtype in matched]
  # Save: every variable and the object graph, as TensorFlow's saver does
  # (a checkpoint written this way loads into TF2 objects too).
  reads = [nodes.add(f"read_{i}", "ReadVariableOp", [handle], dtype=_type(dtype))
           for i, (handle, _, dtype) in enumerate(matched)]
  graph_const = nodes.add(
      "object_graph", "Const", device=_CPU, dtype=string,
      value=attr_value_pb2.AttrValue(tensor=tf.make_tensor_proto(object_graph)))
  save_keys = keys + [OBJECT_GRAPH_KEY]
  names = nodes.add("SaveV2/tensor_names", "Const", device=_CPU, dtype=string,
                    value=_string_list(save_keys))
  slices = nodes.add("SaveV2/shape_and_slices", "Const", device=_CPU,
                     dtype=string, value=_string_list([""] * len(save_keys)))
  save = nodes.add("SaveV2", "SaveV2", [prefix, names, slices, *reads, graph_const],
                   device=_CPU,
                   dtypes=_types(dtypes + [tf.string.as_datatype_enum]))
  saved = nodes.add("control_dependency", "Identity", [prefix, f"^{save}"],
                    device=_CPU, T=string)
  # Restore: every variable.
  assigns = []
  if matched:
    names = nodes.add("RestoreV2/tensor_names", "Const", device=_CPU,
                      dtype=string, value=_string_list(keys))
    slices = nodes.add("RestoreV2/shape_and_slices", "Const", device=_CPU,
                       dtype=string, value=_string_list([""] * len(keys)))
    restore = nodes.add("RestoreV2", "RestoreV2", [prefix, names, slices],
                        device=_CPU, dtypes=_types(dtypes))
    assigns = [nodes.add(f"Assign_{i}", "AssignVariableOp",
                         [handle, f"{restore}:{i}"], dtype=_type(dtype))
               for i, (handle, _, dtype) in enumerate(matched)]
  restore_all = nodes.add("restore_all", "NoOp", [f"^{a}" for a in assigns])
  return saver_pb2.SaverDef(filename_tensor_name=f"{prefix}:0",
                            save_tensor_name=f"{saved}:0",
                            restore_op_name=restore_all,
                            version=saver_pb2.SaverDef.V2)


def _add_op_defs(meta_graph) -> None:
  listed = {op.name for op in meta_graph.meta_info_def.stripped_op_list.op}
  for name in ("Placeholder", "Const", "ReadVariableOp", "SaveV2", "Identity",
               "RestoreV2", "AssignVariableOp", "NoOp"):
    if name not in listed:
      meta_graph.meta_info_def.stripped_op_list.op.append(op_def_registry.get(name))


def add_saver(path: str) -> bool:
  """Writes a SaverDef and its nodes into the SavedModel at `path` (saved
  with `experimental_skip_saver=True`) and its fingerprint again; False,
  with nothing changed, if its variables do not pair up with the checkpoint
  one to one (the caller then saves with TensorFlow's saver)."""
  pb_path = os.path.join(path, "saved_model.pb")
  with open(pb_path, "rb") as f:
    saved_model = saved_model_pb2.SavedModel.FromString(f.read())
  if len(saved_model.meta_graphs) != 1:
    return False
  meta_graph = saved_model.meta_graphs[0]
  if meta_graph.HasField("saver_def"):
    return True
  reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
  try:
    matched = _match(meta_graph, reader)
  except _Unmatched:
    return False
  saver_def = _add_nodes(meta_graph.graph_def, matched,
                         reader.get_tensor(OBJECT_GRAPH_KEY))
  meta_graph.saver_def.CopyFrom(saver_def)
  _add_op_defs(meta_graph)
  # In place: the directory is the export's staging directory, renamed into
  # DST only once complete.
  with open(pb_path, "wb") as f:
    f.write(saved_model.SerializeToString())
  fingerprinting_utils.write_fingerprint(path)
  return True

