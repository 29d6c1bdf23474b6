"""REWRITE stage: GraphDef rewrites applied before a graph is imported.

Each rewrite takes a GraphDef and returns a new one (the input is never
changed), or raises `UnsupportedModuleError` before producing anything: a
rewrite is never half-applied.

- `to_resource_variables`: reference variables (VariableV2 with Assign,
  AssignSub, ... on `float_ref` edges) become resource variables
  (VarHandleOp, AssignVariableOp, AssignSubVariableOp, ReadVariableOp), so
  that `import_graph_def(input_map=...)` can feed them a shared handle.
- `bypass_output_dropout`: an output that is computed through dropout in the
  train graph is recomputed from the dropout's input.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from tensorflow.core.framework import graph_pb2
from tensorflow.core.framework import node_def_pb2

from migrate import errors
from migrate import legacy_format

REF_VARIABLE_OPS = frozenset({"VariableV2", "Variable"})
RESOURCE_VARIABLE_OPS = frozenset({"VarHandleOp"})
# Ref op -> resource op; the ref is input 0, the value input 1.
_REF_TO_RESOURCE_UPDATE = {
    "Assign": "AssignVariableOp",
    "AssignAdd": "AssignAddVariableOp",
    "AssignSub": "AssignSubVariableOp",
}
RANDOM_OPS = frozenset({
    "RandomUniform", "RandomUniformInt", "RandomStandardNormal",
    "TruncatedNormal", "RandomShuffle", "Multinomial", "RandomGamma",
    "RandomPoisson", "RandomPoissonV2",
})
# Ops that only reshape or rename their first input on the way to an output.
_PASS_THROUGH_OPS = frozenset({"Identity", "Squeeze", "Reshape",
                               "PreventGradient", "StopGradient"})


def _consumers(graph_def: graph_pb2.GraphDef) -> dict[str, list[node_def_pb2.NodeDef]]:
  result: dict[str, list[node_def_pb2.NodeDef]] = {}
  for node in graph_def.node:
    for ref in node.input:
      result.setdefault(legacy_format.node_name(ref), []).append(node)
  return result


def ref_variables(graph_def: graph_pb2.GraphDef) -> list[str]:
  return [n.name for n in graph_def.node if n.op in REF_VARIABLE_OPS]


def to_resource_variables(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
  """Rewrites reference variables and the ops on their refs to resource ops.

  Reads of a reference (any consumer other than an update op) go through one
  `ReadVariableOp` per variable, named `<variable>/migrate_read`. An update op
  keeps its name; if something consumed its output (the updated ref), it gets
  a `ReadVariableOp` that runs after the update.
  """
  variables = set(ref_variables(graph_def))
  if not variables:
    return graph_def
  out = graph_pb2.GraphDef()
  out.CopyFrom(graph_def)
  # First pass: decide everything, so that an unsupported op aborts cleanly.
  nodes = list(out.node)
  for node in nodes:
    if node.op in ("IsVariableInitialized",) or node.op in _REF_TO_RESOURCE_UPDATE:
      continue
    if node.op in REF_VARIABLE_OPS:
      continue
    for i, ref in enumerate(node.input):
      if ref.startswith("^") or legacy_format.node_name(ref) not in variables:
        continue
      if node.op.startswith(("Scatter", "Apply", "ResourceApply", "CountUpTo")):
        raise errors.UnsupportedModuleError(
            f"node '{node.name}': op {node.op} on the reference variable "
            f"'{legacy_format.node_name(ref)}' cannot be rewritten to a resource "
            f"variable")
  dtypes = {}
  read_nodes = []
  update_outputs = {}
  for node in nodes:
    if node.op in REF_VARIABLE_OPS:
      dtype = node.attr["dtype"].type
      dtypes[node.name] = dtype
      shape = node.attr["shape"]
      container = node.attr["container"].s if "container" in node.attr else b""
      node.op = "VarHandleOp"
      for key in list(node.attr):
        if key not in ("_class",):
          del node.attr[key]
      node.attr["dtype"].type = dtype
      node.attr["shape"].CopyFrom(shape)
      node.attr["container"].s = container
      node.attr["shared_name"].s = node.name.encode()
      read = out.node.add()
      read.name = f"{node.name}/migrate_read"
      read.op = "ReadVariableOp"
      read.input.append(node.name)
      read.attr["dtype"].type = dtype
      read_nodes.append(read.name)
  for node in nodes:
    first = legacy_format.node_name(node.input[0]) if node.input else ""
    if node.op in _REF_TO_RESOURCE_UPDATE and first in variables:
      var = first
      node.op = _REF_TO_RESOURCE_UPDATE[node.op]
      for key in list(node.attr):
        if key not in ("_class",):
          del node.attr[key]
      node.attr["dtype"].type = dtypes[var]
      update_outputs[node.name] = var
    elif node.op == "IsVariableInitialized" and first in variables:
      node.op = "VarIsInitializedOp"
      del node.attr["dtype"]
  # Consumers of an updated ref read the variable after the update.
  consumed = {legacy_format.node_name(ref) for node in out.node
              for ref in node.input if not ref.startswith("^")}
  for update, var in update_outputs.items():
    if update not in consumed:
      continue
    read = out.node.add()
    read.name = f"{update}/migrate_read"
    read.op = "ReadVariableOp"
    read.input.extend([var, "^" + update])
    read.attr["dtype"].type = dtypes[var]
    read_nodes.append(read.name)
  skip = set(update_outputs) | set(read_nodes)
  for node in out.node:
    if node.name in skip or node.op in RESOURCE_VARIABLE_OPS:
      continue
    if node.op == "VarIsInitializedOp":
      continue
    for i, ref in enumerate(node.input):
      if ref.startswith("^"):
        continue
      src = legacy_format.node_name(ref)
      if src in variables:
        node.input[i] = f"{src}/migrate_read"
      elif src in update_outputs:
        node.input[i] = f"{src}/migrate_read"
  return out


@dataclasses.dataclass(frozen=True)
class DropoutMatch:
  """A dropout found on the path to an output."""

  output_node: str  # The node whose value is the dropout's result.
  input_tensor: str  # The dropout's input (what is kept without it).
  pattern: str  # Which entry of DROPOUT_PATTERNS matched.
  pass_through: tuple[str, ...]  # Nodes between the dropout and the output.


def _random_dependent(graph_def: graph_pb2.GraphDef) -> set[str]:
  """Names of nodes whose value depends on a random op (forward closure)."""
  consumers = _consumers(graph_def)
  todo = [n.name for n in graph_def.node if n.op in RANDOM_OPS]
  seen = set(todo)
  while todo:
    for consumer in consumers.get(todo.pop(), []):
      if consumer.name not in seen:
        seen.add(consumer.name)
        todo.append(consumer.name)
  return seen


def _match_dropout(node, nodes, random_dep) -> Optional[tuple[str, str]]:
  """(pattern, input tensor) if `node` is the last op of a known dropout.

  The known patterns (what each TensorFlow version's `nn.dropout` emits):
  - `select_v2` (TF >= 2.4): SelectV2(mask, Mul(x, scale), zeros) with the
    mask depending on a random op.
  - `mul_cast` (TF 2.0-2.3): Mul(Mul(x, scale), Cast(mask)), either order.
  - `div_floor` (TF 1.x): Mul(RealDiv(x, keep_prob), Floor(keep_prob +
    uniform)), either order.
  """
  def data_input(n, scale_ops):
    if n is None or n.op not in scale_ops or n.name in random_dep:
      return None
    return n.input[0]

  if node.op == "SelectV2" and len(node.input) == 3:
    mask, kept = (nodes.get(legacy_format.node_name(r)) for r in node.input[:2])
    if mask is not None and mask.name in random_dep:
      x = data_input(kept, ("Mul",))
      if x is not None:
        return "select_v2", x
  if node.op == "Mul" and len(node.input) == 2:
    a, b = (nodes.get(legacy_format.node_name(r)) for r in node.input)
    for data, mask in ((a, b), (b, a)):
      if mask is None or mask.name not in random_dep:
        continue
      if mask.op == "Cast":
        x = data_input(data, ("Mul",))
        if x is not None:
          return "mul_cast", x
      if mask.op == "Floor":
        x = data_input(data, ("RealDiv", "Div"))
        if x is not None:
          return "div_floor", x
  return None


def find_output_dropout(graph_def: graph_pb2.GraphDef,
                        output_tensor: str) -> Optional[DropoutMatch]:
  """The dropout that `output_tensor` is computed through last, if any."""
  random_dep = _random_dependent(graph_def)
  nodes = {n.name: n for n in graph_def.node}
  node = nodes.get(legacy_format.node_name(output_tensor))
  path = []
  while node is not None and node.name in random_dep:
    match = _match_dropout(node, nodes, random_dep)
    if match is not None:
      if legacy_format.node_name(match[1]) in random_dep:
        return None  # Dropout after other random ops: not only output dropout.
      return DropoutMatch(output_node=node.name, input_tensor=match[1],
                          pattern=match[0], pass_through=tuple(reversed(path)))
    if node.op not in _PASS_THROUGH_OPS:
      return None
    path.append(node.name)
    node = nodes.get(legacy_format.node_name(node.input[0]))
  return None


def depends_on_random(graph_def: graph_pb2.GraphDef, tensor: str) -> bool:
  return legacy_format.node_name(tensor) in _random_dependent(graph_def)


def bypass_output_dropout(graph_def: graph_pb2.GraphDef, output_tensor: str,
                          match: DropoutMatch) -> tuple[graph_pb2.GraphDef, str]:
  """Adds a copy of the output's path that skips the dropout.

  Other consumers of the dropout (e.g. the classification logits) keep it.
  Returns the new GraphDef and the name of the new output tensor.
  """
  out = graph_pb2.GraphDef()
  out.CopyFrom(graph_def)
  nodes = {n.name: n for n in out.node}
  source = match.input_tensor
  for name in match.pass_through:
    clone = out.node.add()
    clone.CopyFrom(nodes[name])
    clone.name = f"{name}/migrate_nodropout"
    clone.input[0] = source
    source = clone.name + ":0"
  if match.pass_through:
    port = output_tensor.split(":")[1] if ":" in output_tensor else "0"
    return out, f"{source.split(':')[0]}:{port}"
  return out, source
