"""VERIFY: the converted model's training function with its random ops fed.

Random ops on the training path (dropout before the logits, drop path) are
fed the same seeded values on both sides: in the reference Session by
feeding their outputs (`reference.ReferenceModule.train_step`), and here in
a copy of the saved training function whose calls are inlined into one
graph (`graph_rewrite.inline_calls`), re-imported with `input_map` sending
the random ops' outputs to the values and its captured inputs to the loaded
variables. The copy reads and updates the loaded model's variables, so a
training step through it is the same step as through `__call__`,
differentiated the same way (`verify_actual`): the library gradients of
TF 1.x Defuns (swish) are registered for the copy's own wrappers
(`build.library_gradient`), as the converter registered them for the saved
function. A training function with random ops is never run unfed: with op
determinism on, an unseeded random op raises (`random_ops` says whether
there are any).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

from migrate import build
from migrate import graph_rewrite
from migrate import reference as reference_lib


def random_ops(concrete: Any) -> list[str]:
  """The random ops of a saved function and the functions it calls (node names)."""
  graph_def = concrete.graph.as_graph_def()
  nodes = list(graph_def.node) + [n for f in graph_def.library.function
                                  for n in f.node_def]
  return sorted(n.name for n in nodes if n.op in reference_lib.RANDOM_OPS)


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
    graph_def = graph_rewrite.inline_calls(concrete.graph.as_graph_def())
    # The gradients saved with the model for the library calls' wrappers read
    # the tensors of the functions they were saved from: this copy registers
    # its own (the wrappers still name their library gradient function).
    library_gradients = build.mark_library_gradients(graph_def)
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
    self.arg_names = [s.name for s in
                      tf.nest.flatten(concrete.structured_input_signature)
                      if isinstance(s, tf.TensorSpec)]
    self._fn = None
    if not self.match.ok:
      return  # Not to be run: 'random_ops' fails.
    # Each random op becomes a constant holding its value: an op that is
    # merely bypassed would still run (a function keeps its stateful ops), and
    # an unseeded one raises under op determinism.
    for node in graph_def.node:
      if node.name in self.match.matched:
        value = np.asarray(random_values[self.match.matched[node.name]])
        node.op = "Const"
        del node.input[:]
        node.attr.clear()
        node.attr["dtype"].type = tf.as_dtype(value.dtype).as_datatype_enum
        node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
    n_args = len(concrete.inputs) - len(concrete.captured_inputs)
    arg_names = [t.name for t in concrete.inputs[:n_args]]
    captures = list(zip(concrete.inputs[n_args:], concrete.captured_inputs))
    outputs = [t.name for t in concrete.outputs]
    specs = [tf.TensorSpec(t.shape, t.dtype) for t in concrete.inputs[:n_args]]
    specs[0] = tf.TensorSpec(images_shape, tf.float32)

    def fn(*args):
      graph = tf.compat.v1.get_default_graph()
      input_map = dict(zip(arg_names, args))
      for placeholder, value in captures:
        input_map[placeholder.name] = graph.capture(value)
      results = tf.compat.v1.import_graph_def(
          graph_def, input_map=input_map, return_elements=outputs, name="")
      build.register_library_gradients(graph, library_gradients)
      return results

    self._fn = tf.compat.v1.wrap_function(fn, specs)

  def __call__(self, images, **hparams) -> tf.Tensor:
    if self._fn is None:
      raise ValueError(f"the random ops are not all matched: {self.match}")
    values = [images] + [hparams[n] for n in self.arg_names[1:]]
    return self._fn(*values)[0]
