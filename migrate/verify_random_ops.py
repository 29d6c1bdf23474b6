"""VERIFY: the converted model's training function with its random ops fed.

Random ops on the training path (dropout before the logits, drop path) are
fed the same seeded values on both sides: in the reference Session by
feeding their outputs (`reference.ReferenceModule.train_step`), and here in
a copy of the saved training function whose calls are inlined into one
graph, re-imported with `input_map` sending the random ops' outputs to the
values and its captured inputs to the loaded variables. The copy reads and
updates the loaded model's variables, so a training step through it is the
same step as through `__call__`, differentiated the same way
(`verify_actual`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from tensorflow.python.framework import function_def_to_graph

from migrate import legacy_format
from migrate import reference as reference_lib

_CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})


def inline_calls(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
  """A copy of `graph_def` with every (Stateful)PartitionedCall inlined.

  The call node becomes an `IdentityN` over the function's results (with
  control inputs on its control outputs), so that consumers keep their
  inputs; the body's nodes are named `<call>/<node>`.
  """
  library = {f.signature.name: f for f in graph_def.library.function}
  out = graph_pb2.GraphDef()
  out.versions.CopyFrom(graph_def.versions)
  out.library.CopyFrom(graph_def.library)
  queue = list(graph_def.node)
  while queue:
    node = queue.pop(0)
    fname = node.attr["f"].func.name if node.op in _CALL_OPS else ""
    if fname not in library:
      out.node.add().CopyFrom(node)
      continue
    fdef = library[fname]
    body, flat = function_def_to_graph.function_def_to_graph_def(fdef)
    prefix = node.name + "/"
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
      copy = graph_pb2.GraphDef().node.add()
      copy.CopyFrom(b)
      copy.name = prefix + b.name
      del copy.input[:]
      copy.input.extend([remap(i) for i in b.input] + control_inputs)
      new_nodes.append(copy)
    rets = []
    for arg in fdef.signature.output_arg:
      ret = fdef.ret[arg.name]
      rets.append(args[ret] if ret in args else remap(flat.get(ret, ret)))
    result = graph_pb2.GraphDef().node.add()
    result.name = node.name
    if rets:
      result.op = "IdentityN"
      result.attr["T"].list.type.extend(a.type for a in fdef.signature.output_arg)
    else:
      result.op = "NoOp"
    result.input.extend(rets)
    result.input.extend("^" + prefix + n for n in fdef.control_ret.values())
    queue = new_nodes + [result] + queue
    # `result` is no call node: it is appended as it comes out of the queue.
  return out


def training_function(model: Any, hparam_names: Sequence[str]) -> Any:
  """The saved `__call__` for training=True with exactly these hparams."""
  for cf in model.__call__.concrete_functions:
    args, kwargs = cf.structured_input_signature
    training = args[1] if len(args) > 1 else kwargs.get("training")
    specs = [s for s in tf.nest.flatten((args[1:], kwargs))
             if isinstance(s, tf.TensorSpec)]
    if training is True and {s.name for s in specs} == set(hparam_names):
      return cf
  raise ValueError(f"no saved training function with hparams {sorted(hparam_names)}")


@dataclasses.dataclass
class RandomOpsMatch:
  """How the module's random ops were matched to the converted function's."""

  matched: dict[str, str] = dataclasses.field(default_factory=dict)  # Ours -> module's.
  unmatched_reference: list[str] = dataclasses.field(default_factory=list)
  unmatched_converted: list[str] = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    """Every random op on either side has its counterpart: all are fed."""
    return not self.unmatched_reference and not self.unmatched_converted


class FedTrainFunction:
  """The saved training function, with its random ops fed fixed values.

  `FedTrainFunction(training_function(model, hparam_names), values, shape)`
  is called like `model(images, training=True, **hparams)`; `match` says
  which random ops were fed.
  """

  def __init__(self, concrete: Any, random_values: Mapping[str, np.ndarray],
               images_shape: Sequence[int]):
    graph_def = inline_calls(concrete.graph.as_graph_def())
    randoms = [n.name for n in graph_def.node
               if n.op in reference_lib.RANDOM_OPS]
    self.match = RandomOpsMatch()
    for ref_name in random_values:
      hits = [n for n in randoms if n == ref_name or n.endswith("/" + ref_name)]
      if len(hits) == 1:
        self.match.matched[hits[0]] = ref_name
      else:
        self.match.unmatched_reference.append(ref_name)
    self.match.unmatched_converted = sorted(set(randoms) - set(self.match.matched))
    n_args = len(concrete.inputs) - len(concrete.captured_inputs)
    arg_names = [t.name for t in concrete.inputs[:n_args]]
    captures = list(zip(concrete.inputs[n_args:], concrete.captured_inputs))
    outputs = [t.name for t in concrete.outputs]
    specs = [tf.TensorSpec(t.shape, t.dtype) for t in concrete.inputs[:n_args]]
    specs[0] = tf.TensorSpec(images_shape, tf.float32)
    matched = dict(self.match.matched)

    def fn(*args):
      graph = tf.compat.v1.get_default_graph()
      input_map = dict(zip(arg_names, args))
      for placeholder, value in captures:
        input_map[placeholder.name] = graph.capture(value)
      for node, ref_name in matched.items():
        input_map[node + ":0"] = tf.constant(random_values[ref_name])
      return tf.compat.v1.import_graph_def(
          graph_def, input_map=input_map, return_elements=outputs, name="")

    self._fn = tf.compat.v1.wrap_function(fn, specs)
    self.arg_names = [s.name for s in
                      tf.nest.flatten(concrete.structured_input_signature)
                      if isinstance(s, tf.TensorSpec)]

  def __call__(self, images, **hparams) -> tf.Tensor:
    values = [images] + [hparams[n] for n in self.arg_names[1:]]
    return self._fn(*values)[0]
