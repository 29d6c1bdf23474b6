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
- `inline_calls`: calls of library functions (by op type, as TF 1.x's
  `Defun`s are called, or through `(Stateful)PartitionedCall`) replaced by
  the functions' bodies.
- `repair_gradients`: gradients that a module's graph names but does not hold
  in a form TF2 can save. A call of a function whose gradient is another
  library function (`library.gradient`, as TF 1.x's `tf.nn.swish`) gets an
  `IdentityN` after it marked with `LIBRARY_GRADIENT_ATTR`, for the BUILD
  stage to give the library gradient to (`migrate.build`); an `IdentityN` made
  by `tf.custom_gradient` (`_gradient_op_type` "CustomGradient-<n>", whose
  Python function export never saved) loses the attribute, so that the
  forward computation it wraps is differentiated instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Callable, Container, Iterator, Optional, Sequence

from tensorflow.core.framework import graph_pb2
from tensorflow.core.framework import node_def_pb2
from tensorflow.core.framework import types_pb2
from tensorflow.python.framework import function_def_to_graph
from tensorflow.python.framework import importer
from tensorflow.python.framework import ops as tf_ops  # The gradient registry.

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
# Every op that writes a variable (ref or resource).
ASSIGN_OPS = frozenset(_REF_TO_RESOURCE_UPDATE) | frozenset(
    _REF_TO_RESOURCE_UPDATE.values())
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


def depends_on_random(graph_def: graph_pb2.GraphDef,
                      tensors: str | Sequence[str]) -> bool:
  """Whether the tensor (or any of the tensors or ops) depends on a random op."""
  dependent = _random_dependent(graph_def)
  names = [tensors] if isinstance(tensors, str) else tensors
  return any(legacy_format.node_name(t) in dependent for t in names)


# Ops that write the variable of their input 0 (reference and resource).
_VARIABLE_WRITES = frozenset(_REF_TO_RESOURCE_UPDATE) | frozenset(
    _REF_TO_RESOURCE_UPDATE.values())


def random_updated_variables(graph_def: graph_pb2.GraphDef,
                             update_ops: Sequence[str]) -> set[str]:
  """The variables that `update_ops` (UPDATE_OPS) write with a value that
  depends on a random op: the moving averages of the batch norms after a
  drop path, drop connect or dropout. (Initializers depend on random ops
  too, but are not on the update ops' path.)"""
  nodes = {n.name: n for n in graph_def.node}
  random_dep = _random_dependent(graph_def)
  variable_ops = REF_VARIABLE_OPS | RESOURCE_VARIABLE_OPS
  result: set[str] = set()
  seen: set[str] = set()
  todo = [u for u in update_ops if u in nodes]
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    node = nodes[name]
    if node.op in _VARIABLE_WRITES and name in random_dep and node.input:
      variable = nodes.get(legacy_format.node_name(node.input[0]))
      if variable is not None and variable.op in variable_ops:
        result.add(variable.name)
    todo.extend(n for n in map(legacy_format.node_name, node.input) if n in nodes)
  return result


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


# -- function calls ---------------------------------------------------------

CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})


def called_function(node: node_def_pb2.NodeDef, library: Container[str]
                    ) -> Optional[str]:
  """The function of `library` (its names) that `node` calls, by op type or
  through a call op, if any."""
  if node.op in CALL_OPS:
    name = node.attr["f"].func.name if "f" in node.attr else ""  # (Reading inserts.)
    return name if name in library else None
  return node.op if node.op in library else None


@contextlib.contextmanager
def _library_graph(graph_def: graph_pb2.GraphDef) -> Iterator[None]:
  """A default graph that holds `graph_def`'s function library: converting a
  FunctionDef whose nodes call library functions by op type needs their
  signatures (`function_def_to_graph_def` looks them up there)."""
  graph = tf_ops.Graph()
  library = graph_pb2.GraphDef()
  library.versions.CopyFrom(graph_def.versions)
  library.library.CopyFrom(graph_def.library)
  with graph.as_default():
    importer.import_graph_def(library, name="")
    yield


def _inline_prefix(call: str, body: graph_pb2.GraphDef, taken: set[str]) -> str:
  """`<call>/`, or `<call>/inlined_<k>/` if a body node would take a name the
  graph already has."""
  prefix, k = call + "/", 0
  while any(prefix + b.name in taken for b in body.node):
    k += 1
    prefix = f"{call}/inlined_{k}/"
  return prefix


def inline_calls(graph_def: graph_pb2.GraphDef,
                 select: Callable[[node_def_pb2.NodeDef], bool] = lambda node: True
                 ) -> graph_pb2.GraphDef:
  """A copy of `graph_def` with the calls of library functions that `select`
  accepts replaced by the functions' bodies, calls in those bodies too.

  A call is a node whose op type names a library function (how TF 1.x's
  `Defun`s are called; a SavedModel shows it as `LegacyCall`) or a
  `(Stateful)PartitionedCall`. The call node becomes an `IdentityN` over the
  function's results (with control inputs on its control outputs, a `NoOp` if
  it has no results), so that consumers keep their inputs; the body's nodes are
  named `<call>/<node>`. Functions with attributes of their own (polymorphic)
  are left called.
  """
  library = {f.signature.name: f for f in graph_def.library.function}
  out = graph_pb2.GraphDef()
  out.versions.CopyFrom(graph_def.versions)
  out.library.CopyFrom(graph_def.library)
  taken = {n.name for n in graph_def.node}
  with _library_graph(graph_def) if library else contextlib.nullcontext():
    queue = list(graph_def.node)
    while queue:
      node = queue.pop(0)
      fname = called_function(node, library)
      if fname is None or library[fname].signature.attr or not select(node):
        out.node.add().CopyFrom(node)
        continue
      fdef = library[fname]
      body, flat = function_def_to_graph.function_def_to_graph_def(fdef)
      prefix = _inline_prefix(node.name, body, taken)
      data_inputs = [i for i in node.input if not i.startswith("^")]
      control_inputs = [i for i in node.input if i.startswith("^")]
      args = dict(zip((a.name for a in fdef.signature.input_arg), data_inputs))

      def remap(ref: str, args=args, prefix=prefix) -> str:
        control = ref.startswith("^")
        op = legacy_format.node_name(ref)
        if op in args:
          return "^" + legacy_format.node_name(args[op]) if control else args[op]
        return ("^" if control else "") + prefix + ref.lstrip("^")

      new_nodes = []
      for b in body.node:
        if b.name in args:
          continue
        copy = node_def_pb2.NodeDef()
        copy.CopyFrom(b)
        copy.name = prefix + b.name
        taken.add(copy.name)
        del copy.input[:]
        copy.input.extend([remap(i) for i in b.input] + control_inputs)
        new_nodes.append(copy)
      rets = []
      for arg in fdef.signature.output_arg:
        ret = fdef.ret[arg.name]
        rets.append(args[ret] if ret in args else remap(flat.get(ret, ret)))
      result = node_def_pb2.NodeDef(name=node.name, device=node.device)
      if rets:
        result.op = "IdentityN"
        result.attr["T"].list.type.extend(a.type for a in fdef.signature.output_arg)
      else:
        result.op = "NoOp"
      result.input.extend(rets)
      result.input.extend("^" + prefix + n for n in fdef.control_ret.values())
      # `result` is no call: it is copied as it comes out of the queue.
      queue = new_nodes + [result] + queue
  return out


# -- gradients --------------------------------------------------------------

GRADIENT_OP_TYPE_ATTR = "_gradient_op_type"
# On an IdentityN added by `repair_gradients`, a function attribute: the library
# function that computes the gradient of the call feeding it, with attr
# `num_results` (how many leading inputs are the call's results; the others
# are its arguments). A function attribute, so that loading a SavedModel renames
# it along with the function: the op alone says how to differentiate it.
LIBRARY_GRADIENT_ATTR = "_migrate_library_gradient"
LIBRARY_FORWARD_SUFFIX = "/migrate_forward"
# What tf.custom_gradient names the gradient of its IdentityN (custom_gradient.generate_name).
_CUSTOM_GRADIENT_NAME = re.compile(r"^CustomGradient-\d+$")
# Ops whose registered gradient is None: a forward computation through them alone has no
# gradient, so differentiating it cannot stand in for a lost custom gradient.
_ZERO_GRADIENT_OPS = frozenset({
    "Round", "Floor", "Ceil", "Rint", "Sign", "ArgMax", "ArgMin", "Equal",
    "NotEqual", "Greater", "GreaterEqual", "Less", "LessEqual", "Shape",
    "Size", "Rank", "ZerosLike", "OnesLike", "StopGradient", "PreventGradient"})


def has_gradient(op_type: str) -> bool:
  """Whether this process's TensorFlow registers a (non-None) gradient under this
  name (an op type, or a `_gradient_op_type`)."""
  try:
    return tf_ops.gradient_registry.lookup(op_type) is not None
  except LookupError:
    return False


@dataclasses.dataclass(frozen=True)
class GradientRepairs:
  """What `repair_gradients` changed."""

  library: tuple[str, ...] = ()  # Calls now differentiated by their library gradient.
  forward: tuple[str, ...] = ()  # IdentityN nodes whose lost custom gradient was dropped.
  functions: dict = dataclasses.field(default_factory=dict)  # Called function -> gradient.

  def __bool__(self) -> bool:
    return bool(self.library or self.forward)


def _data_inputs(node) -> list[str]:
  return [r for r in node.input if not r.startswith("^")]


def _arg_types(arg, node) -> Optional[list[int]]:
  """The dtypes of one FunctionDef argument as called by `node` (None: unknown)."""
  if arg.number_attr or arg.type_list_attr:
    return None
  if arg.type != types_pb2.DT_INVALID:
    return [arg.type]
  if arg.type_attr and arg.type_attr in node.attr:
    return [node.attr[arg.type_attr].type]
  return None


def _forward_differentiable(node, nodes, consumers, has_gradient) -> Optional[str]:
  """None if the custom-gradient IdentityN `node` wraps a differentiable forward
  computation (some path from its arguments to its results through ops with a
  gradient); else why not."""
  results = set()
  inputs = _data_inputs(node)
  # tf.custom_gradient's IdentityN takes [results..., arguments..., variables...]
  # and its consumers use the results' outputs: those come first, the others after.
  used = {int(r.split(":")[1]) if ":" in r else 0
          for c in consumers.get(node.name, []) for r in _data_inputs(c)
          if legacy_format.node_name(r) == node.name}
  count = max(used) + 1 if used else 1
  results = {legacy_format.node_name(r) for r in inputs[:count]}
  arguments = {legacy_format.node_name(r) for r in inputs[count:]}
  seen, todo = set(arguments), list(arguments)
  while todo:
    name = todo.pop()
    if name in results:
      return None
    for consumer in consumers.get(name, []):
      if consumer.name in seen or consumer.name == node.name:
        continue
      if consumer.op in _ZERO_GRADIENT_OPS or not has_gradient(consumer.op):
        continue
      seen.add(consumer.name)
      todo.append(consumer.name)
  return ("no path from its arguments to its results runs through ops with a "
          "gradient")


def repair_gradients(graph_def: graph_pb2.GraphDef,
                     has_gradient: Callable[[str], bool],
                     where: str, *, wrap_library_calls: bool = True
                     ) -> tuple[graph_pb2.GraphDef, GradientRepairs]:
  """Makes every gradient the graph names available to a TF2 SavedModel.

  `has_gradient(op_type)` says whether TensorFlow registers a gradient for an
  op type (or gradient name). Raises `UnsupportedModuleError` naming the node
  when a gradient is lost and cannot be repaired: an override naming a Python
  gradient function that is not TensorFlow's, or a lost custom gradient whose
  forward computation has no gradient either. `wrap_library_calls=False`
  leaves calls with a library gradient alone (a TF1 Session differentiates
  them with it: `SymbolicGradient`).
  """
  library_gradients = {g.function_name: g.gradient_func for g in graph_def.library.gradient}
  functions = {f.signature.name: f for f in graph_def.library.function}
  op_has_gradient = has_gradient
  has_gradient = lambda op: op in functions or op_has_gradient(op)  # noqa: E731
  for fdef in graph_def.library.function:
    for node in fdef.node_def:
      if GRADIENT_OP_TYPE_ATTR in node.attr:
        grad = node.attr[GRADIENT_OP_TYPE_ATTR].s.decode(errors="replace")
        if not _CUSTOM_GRADIENT_NAME.match(grad) and not has_gradient(grad):
          raise errors.UnsupportedModuleError(
              f"{where}: node '{node.name}' (op {node.op}) in function "
              f"'{fdef.signature.name}' has the gradient '{grad}', a Python "
              f"function the module does not contain; cannot convert")
  custom, library = [], []
  nodes = {n.name: n for n in graph_def.node}
  consumers = _consumers(graph_def)
  for node in graph_def.node:
    if GRADIENT_OP_TYPE_ATTR in node.attr:
      grad = node.attr[GRADIENT_OP_TYPE_ATTR].s.decode(errors="replace")
      if _CUSTOM_GRADIENT_NAME.match(grad) and node.op == "IdentityN":
        why = _forward_differentiable(node, nodes, consumers, has_gradient)
        if why:
          raise errors.UnsupportedModuleError(
              f"{where}: node '{node.name}' (op IdentityN) lost its custom "
              f"gradient '{grad}' (a Python function export does not save) and "
              f"its forward computation cannot replace it: {why}; cannot convert")
        custom.append(node.name)
      elif not has_gradient(grad):
        raise errors.UnsupportedModuleError(
            f"{where}: node '{node.name}' (op {node.op}) has the gradient "
            f"'{grad}', a Python function the module does not contain; cannot "
            f"convert")
    elif node.op in library_gradients and wrap_library_calls:
      library.append(node.name)
  if not custom and not library:
    return graph_def, GradientRepairs()
  out = graph_pb2.GraphDef()
  out.CopyFrom(graph_def)
  by_name = {n.name: n for n in out.node}
  for name in custom:
    del by_name[name].attr[GRADIENT_OP_TYPE_ATTR]
  used_functions = {}
  for name in library:
    call = by_name[name]
    fdef = functions[call.op]
    out_types, in_types = [], []
    for arg in fdef.signature.output_arg:
      out_types += _arg_types(arg, call) or [None]
    for arg in fdef.signature.input_arg:
      in_types += _arg_types(arg, call) or [None]
    if None in out_types or None in in_types or len(in_types) != len(_data_inputs(call)):
      raise errors.UnsupportedModuleError(
          f"{where}: node '{name}' calls function '{call.op}' whose gradient "
          f"'{library_gradients[call.op]}' is in the library, but its "
          f"arguments are not plain tensors; cannot convert")
    forward = name + LIBRARY_FORWARD_SUFFIX
    if forward in by_name:
      raise errors.UnsupportedModuleError(
          f"{where}: node '{forward}' already exists; cannot add the library "
          f"gradient of node '{name}'")
    call.name = forward
    wrapper = out.node.add()
    wrapper.name = name
    wrapper.op = "IdentityN"
    wrapper.input.extend([f"{forward}:{i}" for i in range(len(out_types))] +
                         _data_inputs(call))
    wrapper.attr["T"].list.type.extend(out_types + in_types)
    wrapper.attr[LIBRARY_GRADIENT_ATTR].func.name = library_gradients[call.op]
    wrapper.attr[LIBRARY_GRADIENT_ATTR].func.attr["num_results"].i = len(out_types)
    if call.device:
      wrapper.device = call.device
    used_functions[call.op] = library_gradients[call.op]
  return out, GradientRepairs(library=tuple(library), forward=tuple(custom),
                              functions=used_functions)
