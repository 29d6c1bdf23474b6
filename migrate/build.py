"""BUILD stage: one TF2 object over the module's graphs and one set of variables.

The module's checkpoint is restored once into eager resource variables
(reference-variable graphs are first rewritten to resource ops:
`graph_rewrite.to_resource_variables`). For each function the model needs,
`_GraphIndex` cuts from the MetaGraph's GraphDef the subgraph its fetches
need and imports only that inside `tf.compat.v1.wrap_function`, with
`input_map` sending the feeds to the function's inputs and every
VarHandleOp to the captured handle of the shared variable, so that all
functions read and update the same variables:

- inference (tag set `set()`): every output of every signature, in one
  function;
- train (`{"train"}`, if present): the chosen output plus the update ops
  (UPDATE_OPS, or the in-place updates of rewritten reference variables),
  without the output dropout unless it is kept (`graph_rewrite`);
- regularization losses: one zero-argument function per
  REGULARIZATION_LOSSES tensor.

Gradients: each graph first goes through `graph_rewrite.repair_gradients`;
every IdentityN it puts after a call with a library gradient gets, at import,
a gradient of its own (`library_gradient`, registered like what
`tf.custom_gradient` registers), which `tf.saved_model.save` saves with the
model.

The root object implements the Reusable SavedModel API:
`__call__(images, training=False, **hparams)`, `variables`,
`trainable_variables` (those `__call__`'s training computation reaches with
a gradient), `regularization_losses`, plus `metadata` and the endpoints that
Keras 3's `TFSMLayer` calls, `serve(images)` and `call_training(images)`.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops  # The gradient registry.
# The context `tf.saved_model.save` traces in (see `_traced_as_saved`).
from tensorflow.python.saved_model import save_context

import migrate
from migrate import errors
from migrate import graph_rewrite
from migrate import legacy_format
from migrate import plan as plan_lib

TOOL_VERSION = migrate.__version__
# The name scope of the metadata variables.
METADATA_SCOPE = "migrate_metadata"
# Names the Keras 3 endpoints: `keras.layers.TFSMLayer(path)` calls `serve`
# by default; `call_training` is the name Keras's own `ExportArchive`
# documentation gives a training-mode forward pass, for
# `TFSMLayer(path, call_training_endpoint="call_training")`.
SERVE_ENDPOINT = "serve"
TRAINING_ENDPOINT = "call_training"
# TensorFlow's registry of gradient functions (`ops.NotDifferentiable` puts
# None there); read to know which variables a gradient reaches.
_GRADIENT_REGISTRY = tf_ops.gradient_registry


class MigratedModel(tf.__internal__.tracking.AutoTrackable):
  """Root of a converted model (an AutoTrackable: `variables` stays writable).

  The saved `__call__` is an instance attribute (a tf.function); Python looks
  special methods up on the type, hence this forwarder.
  """

  def __call__(self, *args, **kwargs):
    return self.__dict__["__call__"](*args, **kwargs)


class Metadata(tf.__internal__.tracking.AutoTrackable):
  """Read-only facts about the conversion, saved as non-trainable variables."""


@dataclasses.dataclass
class BuiltModel:
  """The TF2 object and what was decided while building it."""

  root: MigratedModel
  plan: plan_lib.MigrationPlan
  signatures: Mapping[str, tf.types.experimental.ConcreteFunction]
  notes: Sequence[str]  # Human-readable facts for the summary and model card.
  output_dropout_removed: Optional[graph_rewrite.DropoutMatch]
  output_dropout_kept: Optional[graph_rewrite.DropoutMatch]
  reference_variables_rewritten: int
  train_output_random: bool  # The training-mode output still depends on random ops.


def _function(fn, **kwargs):
  """`tf.function` without AutoGraph: these functions have no Python control
  flow on tensors, and converting their source (and every function they
  call) was 14% of the Python calls of a 30k-node conversion."""
  return tf.function(fn, autograph=False, **kwargs)


def _graph_variables(graph_def) -> dict[str, tuple[tf.DType, tf.TensorShape]]:
  result = {}
  for node in graph_def.node:
    if node.op in graph_rewrite.RESOURCE_VARIABLE_OPS | graph_rewrite.REF_VARIABLE_OPS:
      result[node.name] = (tf.as_dtype(node.attr["dtype"].type),
                           tf.TensorShape(node.attr["shape"].shape))
  return result


def _module_trainable(module: legacy_format.LegacyModule) -> set[str]:
  return {v.name for variant in module.variants.values()
          for v in variant.variables if v.trainable}


def _variables_with_gradient(graph_def, tensor: str) -> set[str]:
  """The variables a gradient of `tensor` reaches: those it reads through
  data edges and ops that have a gradient (not through, e.g., `Shape` or
  `StopGradient`, which TensorFlow registers as not differentiable)."""
  nodes = {n.name: n for n in graph_def.node}
  variable_ops = graph_rewrite.RESOURCE_VARIABLE_OPS | graph_rewrite.REF_VARIABLE_OPS
  found, seen, todo = set(), set(), [legacy_format.node_name(tensor)]
  while todo:
    name = todo.pop()
    node = nodes.get(name)
    if name in seen or node is None:
      continue
    seen.add(name)
    if node.op in variable_ops:
      found.add(name)
    elif not _not_differentiable(node.op):
      todo.extend(legacy_format.node_name(r) for r in node.input if not r.startswith("^"))
  return found


class Checkpoint:
  """The module's checkpoint, holding `names` (the BUILD stages' one reader).

  Every failure (unreadable, a name missing, a value that cannot be read) is
  a `CorruptModuleError` naming the checkpoint.
  """

  def __init__(self, module: legacy_format.LegacyModule, names: Sequence[str]):
    self.prefix = module.checkpoint_prefix
    try:
      self.reader = tf.train.load_checkpoint(self.prefix)
      self.shapes = self.reader.get_variable_to_shape_map()
      self.dtypes = self.reader.get_variable_to_dtype_map()
    except (tf.errors.OpError, ValueError, IndexError, RuntimeError) as e:
      raise errors.CorruptModuleError(
          f"{self.prefix}: expected a readable checkpoint, found "
          f"{type(e).__name__}: {errors.first_line(e)}") from None
    missing = [n for n in names if n not in self.shapes]
    if missing:
      inference = {v.name for v in module.inference.variables}
      only_train = (module.train is not None and
                    not any(n in inference for n in missing))
      raise errors.CorruptModuleError(
          f"{self.prefix}: the variables index does not match the graph: "
          f"expected {len(names)} variables, missing {len(missing)} (e.g. "
          f"'{missing[0]}')" + (
              ", all of them the train graph's only: the module was exported "
              "from its inference graph, and hub.Module cannot load its train "
              "graph either" if only_train else ""))

  def value(self, name: str):
    """The value of variable `name` (a NumPy array)."""
    try:
      return self.reader.get_tensor(name)
    except (tf.errors.OpError, ValueError, IndexError, RuntimeError) as e:
      raise errors.CorruptModuleError(
          f"{self.prefix}: expected a value for variable '{name}', found "
          f"{type(e).__name__}: {errors.first_line(e)}") from None


def _create_variables(module: legacy_format.LegacyModule,
                      trainable: set[str]) -> dict[str, tf.Variable]:
  """One eager variable per graph variable, restored from the checkpoint;
  those named in `trainable` are trainable."""
  in_graph: dict[str, tuple[tf.DType, tf.TensorShape]] = {}
  order: list[str] = []
  for tags in sorted(module.variants, key=len, reverse=True):
    try:
      graph_variables = _graph_variables(module.variants[tags].graph_def)
    except (TypeError, ValueError) as e:  # A dtype or shape attr out of range.
      raise errors.CorruptModuleError(
          f"{module.path} (tags {sorted(tags)}): expected variables with a "
          f"valid dtype and shape, found {type(e).__name__}: "
          f"{errors.first_line(e)}") from None
    for name, spec in graph_variables.items():
      if name not in in_graph:
        in_graph[name] = spec
        order.append(name)
  if not in_graph:
    return {}
  checkpoint = Checkpoint(module, order)
  variables = {}
  for name in order:
    dtype, shape = in_graph[name]
    if shape.rank is not None and list(shape) != list(checkpoint.shapes[name]):
      raise errors.CorruptModuleError(
          f"{module.checkpoint_prefix}: the variables index does not match the "
          f"graph: variable '{name}' has shape {list(checkpoint.shapes[name])} "
          f"in the checkpoint, {shape.as_list()} in the graph")
    if checkpoint.dtypes[name] != dtype:
      raise errors.CorruptModuleError(
          f"{module.checkpoint_prefix}: the variables index does not match the "
          f"graph: variable '{name}' has dtype {checkpoint.dtypes[name].name} in "
          f"the checkpoint, {dtype.name} in the graph")
    value = checkpoint.value(name)
    variables[name] = tf.Variable(value, dtype=dtype, name=name,
                                  trainable=name in trainable)
  return variables


def _assets(module: legacy_format.LegacyModule) -> dict[str, tf.saved_model.Asset]:
  """One tf.saved_model.Asset per asset file: saving copies it, loading rewires it."""
  result = {}
  for variant in module.variants.values():
    for filename in variant.asset_files.values():
      path = os.path.join(module.path, "assets", filename)
      if not os.path.isfile(path):
        raise errors.CorruptModuleError(
            f"{path}: expected the asset file '{filename}' that the graph "
            f"refers to, found none")
      result.setdefault(filename, tf.saved_model.Asset(path))
  return result


_GRADIENT_NAMES = itertools.count()


def _unused_gradient_name() -> str:
  while True:
    name = f"MigrateLibraryGradient-{next(_GRADIENT_NAMES)}"
    try:
      tf_ops.gradient_registry.lookup(name)
    except LookupError:
      return name


def library_gradient(wrapper: tf.Operation) -> Callable:
  """The gradient of an IdentityN added by `graph_rewrite.repair_gradients`.

  Made from the op alone (its inputs and `LIBRARY_GRADIENT_ATTR`), in the graph
  it is in, also a copy of a loaded function: the gradient saved with the
  model reads the forward tensors of the function it was saved from, so a copy
  (verification inlines the training function to feed its random ops) needs
  this one. Like what `tf.custom_gradient` registers, it ignores its `op`
  argument (`tf.saved_model.save` passes None when it saves the gradient) and
  calls the library gradient function on (arguments..., result gradients...).
  """
  attr = wrapper.get_attr(graph_rewrite.LIBRARY_GRADIENT_ATTR)
  grad_function = wrapper.graph._get_function(attr.name)  # pylint: disable=protected-access
  if grad_function is None:
    raise ValueError(f"{wrapper.name}: the graph has no function '{attr.name}'")
  num_results = attr.attr["num_results"].i
  results = list(wrapper.inputs[:num_results])
  arguments = list(wrapper.inputs[num_results:])

  def gradient(unused_op, *grads):
    dys = [g if g is not None else tf.zeros_like(r)
           for g, r in zip(grads[:num_results], results)]
    dxs = grad_function(*arguments, *dys)
    dxs = list(dxs) if isinstance(dxs, (list, tuple)) else [dxs]
    return [None] * num_results + dxs

  return gradient


def mark_library_gradients(graph_def) -> list[tuple[str, str]]:
  """Gives every IdentityN that `graph_rewrite.repair_gradients` added after a
  library call (`LIBRARY_GRADIENT_ATTR`) a `_gradient_op_type` of its own, one
  no gradient is registered under yet, in place. Returns (node name, gradient
  name) pairs for `register_library_gradients`, once the graph is imported."""
  marked = []
  for node in graph_def.node:
    if graph_rewrite.LIBRARY_GRADIENT_ATTR in node.attr:
      name = _unused_gradient_name()
      node.attr[graph_rewrite.GRADIENT_OP_TYPE_ATTR].s = name.encode()
      marked.append((node.name, name))
  return marked


def register_library_gradients(graph: tf.Graph,
                               marked: Sequence[tuple[str, str]]) -> None:
  """Registers `library_gradient` of each op that `mark_library_gradients`
  marked, now imported into `graph`, under the name it was given."""
  for node, name in marked:
    tf.RegisterGradient(name)(library_gradient(graph.get_operation_by_name(node)))


class _GraphIndex:
  """One MetaGraph's GraphDef, indexed once, cut into functions on demand.

  Each function is made by importing only the subgraph its fetches need
  inside `tf.compat.v1.wrap_function`, with `input_map` sending the feeds to
  the function's inputs and every variable handle to the captured handle of
  the shared eager variable. (Importing the whole graph and then calling
  `prune` would copy it again per function and keep every capture.)
  """

  def __init__(self, graph_def, variables: Mapping[str, tf.Variable],
               asset_paths: Mapping[str, tf.Tensor], where: str):
    self.graph_def = graph_def
    self.nodes = {n.name: n for n in graph_def.node}
    # Each function's cut keeps the graph's node order, found by sorting its
    # nodes by position: walking the whole graph per function (one per
    # regularization loss) made the stage quadratic in the graph's size.
    self.position = {n.name: i for i, n in enumerate(graph_def.node)}
    self.variables = variables
    self.asset_paths = dict(asset_paths)
    self.where = where
    self.handles = {n.name for n in graph_def.node
                    if n.op in graph_rewrite.RESOURCE_VARIABLE_OPS}

  def _subgraph(self, roots: Sequence[str], stop: set[str]):
    keep, todo = set(), [r for r in roots if r not in stop]
    while todo:
      name = todo.pop()
      if name in keep:
        continue
      node = self.nodes.get(name)
      if node is None:
        raise errors.CorruptModuleError(
            f"{self.where}: expected a node '{name}' in the graph, found none")
      keep.add(name)
      todo.extend(n for n in map(legacy_format.node_name, node.input)
                  if n not in keep and n not in stop)
    sub = tf.compat.v1.GraphDef()
    sub.versions.CopyFrom(self.graph_def.versions)
    sub.library.CopyFrom(self.graph_def.library)
    used: set[str] = set()
    for name in sorted(keep, key=self.position.__getitem__):
      node = self.nodes[name]
      copy = sub.node.add()
      copy.CopyFrom(node)
      del copy.input[:]
      for ref in node.input:
        if legacy_format.node_name(ref) in stop:
          if ref.startswith("^"):
            continue  # Control edges to fed tensors or variable handles.
          used.add(legacy_format.tensor_name(ref))
        copy.input.append(ref)
      if "_class" in copy.attr:  # Colocation with nodes that may be cut away.
        del copy.attr["_class"]
    return sub, used

  def _importer(self, feed_names: Sequence[str], fetches: Sequence[str],
                ops: Sequence[str]) -> Callable:
    """`import_fn(*feeds)`: imports the cut that computes `fetches` and runs
    `ops` into the graph being traced, with the feeds and variable handles
    mapped in; returns the fetched tensors."""
    asset_nodes = {legacy_format.node_name(t) for t in self.asset_paths}
    stop = ({legacy_format.node_name(n) for n in feed_names} | self.handles |
            asset_nodes)
    roots = [legacy_format.node_name(r) for r in [*fetches, *ops]]
    sub, used = self._subgraph(roots, stop)
    library_gradients = mark_library_gradients(sub)
    missing = sorted({legacy_format.node_name(k) for k in used} & self.handles -
                     set(self.variables))
    if missing:
      raise errors.CorruptModuleError(
          f"{self.where}: the graph reads variable '{missing[0]}', which the "
          f"module's checkpoint does not hold")

    def import_fn(*args):
      graph = tf.compat.v1.get_default_graph()
      input_map = {}
      for name, arg in zip(feed_names, args):
        if legacy_format.tensor_name(name) in used:
          input_map[legacy_format.tensor_name(name)] = arg
      for key in used:
        node = legacy_format.node_name(key)
        if node in self.handles:
          input_map[key] = graph.capture(self.variables[node].handle)
        elif key in self.asset_paths:
          input_map[key] = graph.capture(self.asset_paths[key])
      results = tf.compat.v1.import_graph_def(
          sub, input_map=input_map, name="",
          return_elements=[legacy_format.tensor_name(t) for t in fetches] +
          [legacy_format.node_name(o) for o in ops])
      register_library_gradients(graph, library_gradients)
      outputs, updates = results[:len(fetches)], results[len(fetches):]
      if updates:
        with tf.control_dependencies(updates):
          outputs = [tf.identity(t) for t in outputs]
      return outputs

    return import_fn

  def _traced(self, trace: Callable[[], Any]) -> Any:
    try:
      return trace()
    except (ValueError, TypeError, KeyError, tf.errors.OpError) as e:
      raise errors.CorruptModuleError(
          f"{self.where}: expected an importable graph, found "
          f"{type(e).__name__}: {errors.first_line(e)}") from None

  def function(self, feeds: Sequence[tuple[str, tf.TensorSpec]],
               fetches: Sequence[str], ops: Sequence[str] = ()) -> Callable:
    """A function of `feeds` computing `fetches` and running `ops`."""
    import_fn = self._importer([name for name, _ in feeds], fetches, ops)
    return self._traced(lambda: tf.compat.v1.wrap_function(
        import_fn, [spec for _, spec in feeds]))

  def zero_arg_function(self, fetch: str) -> Callable:
    """A concrete function of no arguments computing `fetch`, traced once:
    saved as it is (a `tf.function` would be traced again under
    `tf.saved_model.save`'s context, whose cache key differs; for the one
    function per regularization loss that doubled their cost), and loaded as
    a zero-argument callable, which is what the Reusable SavedModel API asks
    of `regularization_losses`."""
    import_fn = self._importer([], [fetch], ())
    fn = _function(lambda: import_fn()[0], input_signature=[])
    return self._traced(fn.get_concrete_function)


def _not_differentiable(op_type: str) -> bool:
  """Whether TensorFlow registers `op_type` as having no gradient
  (`ops.NotDifferentiable`). Ops without any registration (function calls,
  library functions) count as differentiable: their inputs are followed."""
  try:
    return _GRADIENT_REGISTRY.lookup(op_type) is None
  except LookupError:
    return False


def _inline_library_calls(graph_def, where: str):
  """(graph_def with its calls of library functions by op type inlined, how
  many there were). `(Stateful)PartitionedCall`s stay: every consumer runs them."""
  library = {f.signature.name for f in graph_def.library.function}
  select = lambda node: node.op not in graph_rewrite.CALL_OPS  # noqa: E731
  calls = sum(1 for n in graph_def.node
              if graph_rewrite.called_function(n, library) and select(n))
  if not calls:
    return graph_def, 0
  try:
    return graph_rewrite.inline_calls(graph_def, select), calls
  except (ValueError, TypeError, KeyError, tf.errors.OpError) as e:
    raise errors.CorruptModuleError(
        f"{where}: expected library functions whose bodies can be inlined, found "
        f"{type(e).__name__}: {errors.first_line(e)}") from None


def _gradient_notes(repairs: Sequence[graph_rewrite.GradientRepairs]) -> list[str]:
  notes = []
  library = max((len(r.library) for r in repairs), default=0)
  if library:
    functions = sorted({f"{f} (gradient {g})" for r in repairs
                        for f, g in r.functions.items()})
    notes.append(
        f"{library} calls of library functions are differentiated by the gradient "
        f"functions the module's function library registers for them, as in TF1: "
        f"{', '.join(functions)}.")
  forward = max((len(r.forward) for r in repairs), default=0)
  if forward:
    notes.append(
        f"{forward} custom gradients were lost before conversion: the module's "
        f"IdentityN ops name Python gradient functions (tf.custom_gradient, e.g. "
        f"TF 2.x's tf.nn.swish) that hub.Module's export did not save, so not even "
        f"hub.Module could differentiate them. The converted model differentiates "
        f"the forward computation instead (for swish: the same values as its "
        f"custom gradient), and verification compares its gradients with the "
        f"analytic gradient of that forward computation in the module's graph.")
  return notes


# The training-mode contract of a graph with random ops (README, "Verification").
_STOCHASTIC_TRAINING_NOTE = (
    "In training mode {what} depend on random ops (dropout, drop path, drop "
    "connect), by design: two calls of obj(x, training=True) differ.{moving} "
    "Deterministic, and verified against the module with the same random values "
    "fed to both sides: the training output, the moving averages after a step and "
    "the gradients, given those values; and every inference output.")


def _spec(info: legacy_format.TensorSpecInfo) -> tf.TensorSpec:
  return tf.TensorSpec(info.shape, info.dtype)


def _inference_feeds(module: legacy_format.LegacyModule
                     ) -> list[tuple[str, tf.TensorSpec]]:
  feeds: dict[str, tf.TensorSpec] = {}
  for sig in module.inference.signatures.values():
    for info in sig.inputs.values():
      feeds.setdefault(info.tensor_name, _spec(info))
  return list(feeds.items())


def _metadata(plan: plan_lib.MigrationPlan, module: legacy_format.LegacyModule,
              notes: Sequence[str],
              removed: Optional[graph_rewrite.DropoutMatch],
              train_output: str) -> Metadata:
  size = plan.default_image_size or (0, 0)
  width = plan.output_width or 0
  fields = {
      "default_image_size": (list(size), tf.int32),
      "output_kind": (plan.kind, tf.string),
      "num_features": (width if plan.kind == plan_lib.FEATURE_VECTOR else 0,
                       tf.int32),
      "num_classes": (width if plan.kind == plan_lib.CLASSIFICATION else 0,
                      tf.int32),
      "source_signature": (plan.signature, tf.string),
      "source_output_key": (plan.output_key, tf.string),
      "source_path": (module.path, tf.string),
      "source_sha256": (module.saved_model_sha256, tf.string),
      "tool_version": (TOOL_VERSION, tf.string),
      "has_train_graph": (plan.has_train_graph, tf.bool),
      "hparams": (",".join(h.name for h in plan.hparams), tf.string),
      "output_dropout_removed": (removed.output_node if removed else "",
                                 tf.string),
      "train_output_tensor": (train_output, tf.string),
      "notes": ("\n".join(notes), tf.string),
  }
  meta = Metadata()
  # Named apart from the module's variables: `export_saver` pairs the saved
  # graph's variables with the checkpoint by name.
  for field, (value, dtype) in fields.items():
    setattr(meta, field, tf.Variable(value, dtype=dtype, trainable=False,
                                     name=f"{METADATA_SCOPE}/{field}"))
  return meta


def _regularization_losses(index: _GraphIndex,
                           loss_tensors: Sequence[str]) -> list[Callable]:
  """One function per loss, each capturing only the variables it reads."""
  return [index.zero_arg_function(tensor) for tensor in loss_tensors]


# The options `export` saves with (it writes the saver itself:
# `export_saver`). `__call__` and the endpoints that call it are traced in
# their save context (`_traced_as_saved`).
SAVE_OPTIONS = tf.saved_model.SaveOptions(save_debug_info=False,
                                          experimental_skip_saver=True)


def _traced_as_saved():
  """The context in which `tf.saved_model.save(..., options=SAVE_OPTIONS)`
  traces a tf.function's concrete functions again: the save looks each one up
  by its input signature under the save's options (part of a trace's cache
  key), and a trace made outside it is made a second time. Each trace of
  `__call__` captures every variable (seconds at 100k graph nodes,
  docs/PERFORMANCE.md); traced here, and with the input names the save
  looks them up by, they are traced once."""
  return save_context.save_context(SAVE_OPTIONS)


def _call_function(call_impl: Callable, hparams: Sequence[plan_lib.HParam]):
  """A tf.function `(images, training=False, <hparam>=None, ...)`."""
  params = [inspect.Parameter("images", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("training", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              default=False)]
  params += [inspect.Parameter(h.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                               default=None) for h in hparams]

  def __call__(*args, **kwargs):  # pylint: disable=invalid-name
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return call_impl(**bound.arguments)

  signature = inspect.Signature(params)
  __call__.__signature__ = signature
  return _function(__call__)


def build(module: legacy_format.LegacyModule,
          plan: plan_lib.MigrationPlan) -> BuiltModel:
  """Builds the TF2 object for `plan`; raises `MigrationError` on bad input."""
  notes: list[str] = []
  # Trainable: the module's trainable variables that `__call__`'s training
  # computation reaches with a gradient (the output dropout, if removed
  # later, reads no variable). The others (a feature-vector model's
  # classification head) serve only other signatures: they stay in
  # `variables`, not trainable, or Keras would warn on every fit step that
  # they get no gradient (hub.KerasLayer takes `trainable_variables`,
  # Keras 3's TFSMLayer the trainable variables its endpoints capture, and
  # the training function reads the head for its update ops, e.g. the
  # weights' FakeQuant ranges).
  if plan.has_train_graph:
    call_output = module.train.signatures[plan.signature].outputs[
        plan.output_key].tensor_name
    used = _variables_with_gradient(module.train.graph_def, call_output)
  else:
    used = _variables_with_gradient(module.inference.graph_def, plan.output_tensor)
  module_trainable = _module_trainable(module)
  variables = _create_variables(module, module_trainable & used)
  left_out = [n for n in variables if n in module_trainable and n not in used]
  if left_out:
    notes.append(
        f"{len(left_out)} trainable variables of the module are not trainable "
        f"here (not in trainable_variables), because __call__'s training "
        f"computation does not use them (only other signatures do; they stay "
        f"in variables and keep serving those): {', '.join(left_out)}.")
  rewritten = 0
  indexes: dict[frozenset, _GraphIndex] = {}
  graph_defs = {}
  for tags, variant in module.variants.items():
    if tags not in (legacy_format.INFERENCE_TAGS, legacy_format.TRAIN_TAGS):
      continue
    graph_def = variant.graph_def
    refs = graph_rewrite.ref_variables(graph_def)
    if refs:
      graph_def = graph_rewrite.to_resource_variables(graph_def)
      rewritten = max(rewritten, len(refs))
    graph_defs[tags] = graph_def
  if rewritten:
    notes.append(f"{rewritten} reference variables (VariableV2) were rewritten "
                 f"to resource variables, their update ops included.")
  renamed = sorted({(name, sig.renamed_images_input)
                    for name, sig in module.inference.signatures.items()
                    if sig.renamed_images_input})
  if renamed:
    notes.append(
        "The module's signatures " + ", ".join(f"'{n}' (input '{k}')" for n, k in renamed)
        + " take their images under another key than 'images' (as "
        "hub.add_signature(inputs=images) names it); the converted model's "
        "signatures call it 'images'.")
  repairs = {}
  for tags in list(graph_defs):
    graph_defs[tags], repairs[tags] = graph_rewrite.repair_gradients(
        graph_defs[tags], graph_rewrite.has_gradient,
        f"{module.path} (tags {sorted(tags)})")
  notes.extend(_gradient_notes(repairs.values()))
  if legacy_format.INFERENCE_TAGS in graph_defs:
    graph_defs[legacy_format.INFERENCE_TAGS], inlined = _inline_library_calls(
        graph_defs[legacy_format.INFERENCE_TAGS],
        f"{module.path} (tags {sorted(legacy_format.INFERENCE_TAGS)})")
    if inlined:
      notes.append(
          f"The serving functions compute the {inlined} calls of library functions "
          f"(TF 1.x Defuns, e.g. swish) of the inference graph with the functions' "
          f"bodies inlined, so that consumers that cannot call a function by its "
          f"name (TFLite) run them; their gradients stay the library's.")

  # The train graph: the chosen output, maybe without its output dropout.
  removed = kept = None
  train_output = plan.output_tensor
  train_random = False
  if plan.has_train_graph:
    train_def = graph_defs[legacy_format.TRAIN_TAGS]
    train_output = module.train.signatures[plan.signature].outputs[plan.output_key].tensor_name
    match = plan_lib.output_dropout(module, plan, train_def)
    if match is not None and plan.remove_output_dropout:
      train_def, train_output = graph_rewrite.bypass_output_dropout(
          train_def, train_output, match)
      graph_defs[legacy_format.TRAIN_TAGS] = train_def
      removed = match
      notes.append(
          f"The train graph applies dropout to the output features (node "
          f"'{match.output_node}'); it was removed from the training path, as "
          f"the image feature vector API requires (--keep_output_dropout keeps "
          f"it).")
    elif match is not None:
      kept = match
      notes.append(
          f"The train graph applies dropout to the output features (node "
          f"'{match.output_node}'); kept as asked (--keep_output_dropout), "
          f"against the image feature vector API.")
    train_random = graph_rewrite.depends_on_random(train_def, train_output)
    updates_random = graph_rewrite.depends_on_random(train_def,
                                                     module.train.update_ops)
    if (train_random and kept is None) or updates_random:
      notes.append(_STOCHASTIC_TRAINING_NOTE.format(
          what="the output" + (" and the moving averages" if updates_random else ""),
          moving=(" The moving averages depend on them too: the random ops come "
                  "before batch norms (drop path, drop connect)."
                  if updates_random else "")))
  else:
    notes.append("The module has no train graph: training=True computes the "
                 "same as inference and updates nothing.")

  assets = _assets(module)
  for tags, graph_def in graph_defs.items():
    asset_paths = {tensor: assets[filename].asset_path for tensor, filename
                   in module.variants[tags].asset_files.items()}
    indexes[tags] = _GraphIndex(graph_def, variables, asset_paths,
                                f"{module.path} (tags {sorted(tags)})")

  # Inference: one function computing every signature's outputs.
  infer_index = indexes[legacy_format.INFERENCE_TAGS]
  infer_feed_specs = _inference_feeds(module)
  infer_feeds = [name for name, _ in infer_feed_specs]
  infer_fetches = sorted({o.tensor_name
                          for s in module.inference.signatures.values()
                          for o in s.outputs.values()})
  infer_fn = infer_index.function(infer_feed_specs, infer_fetches)
  infer_defaults = {
      name: tf.constant(value) for name, value in legacy_format.placeholder_defaults(
          graph_defs[legacy_format.INFERENCE_TAGS]).items() if name in infer_feeds}

  def run_inference(feed_values: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    args = []
    for feed in infer_feeds:
      if feed in feed_values:
        args.append(feed_values[feed])
      elif feed in infer_defaults:
        args.append(infer_defaults[feed])
      else:
        raise ValueError(f"missing input for {feed}")
    return dict(zip(infer_fetches, infer_fn(*args)))

  # Train: the chosen output and the update ops.
  hparam_feeds = [h.tensor_name for h in plan.hparams]
  if plan.has_train_graph:
    train_variant = module.train
    update_ops = list(train_variant.update_ops)
    train_feeds = [(plan.images_tensor, tf.TensorSpec(plan.input_shape, tf.float32))]
    train_feeds += [(h.tensor_name, tf.TensorSpec(h.shape, h.dtype))
                    for h in plan.hparams]
    train_fn = indexes[legacy_format.TRAIN_TAGS].function(
        train_feeds, [train_output], ops=update_ops)
  loss_variant = module.train or module.inference
  loss_fns = _regularization_losses(indexes[loss_variant.tags],
                                    loss_variant.regularization_losses)

  hparam_defaults = {h.name: h.default for h in plan.hparams}
  hparam_dtypes = {h.name: h.dtype for h in plan.hparams}

  def hparam_value(name, value):
    if value is None:
      if hparam_defaults[name] is None:
        raise ValueError(f"argument '{name}' has no default; pass a value")
      value = hparam_defaults[name]
    return tf.convert_to_tensor(value, dtype=hparam_dtypes[name])

  def call_impl(images, training, **hparams):
    images = tf.convert_to_tensor(images, dtype=tf.float32)
    values = [hparam_value(h.name, hparams[h.name]) for h in plan.hparams]
    if training and plan.has_train_graph:
      return train_fn(images, *values)[0]
    feeds = {plan.images_tensor: images}
    feeds.update(zip(hparam_feeds, values))
    return run_inference(feeds)[plan.output_tensor]

  root = MigratedModel()
  root.assets = list(assets.values())
  var_list = list(variables.values())
  root.variables = var_list
  root.trainable_variables = [v for v in var_list if v.trainable]
  root.regularization_losses = loss_fns
  call = _call_function(call_impl, plan.hparams)
  root.__call__ = call
  # Named as the save names them (the parameters), for `_traced_as_saved`.
  images_spec = tf.TensorSpec(plan.input_shape, tf.float32, name="images")
  hparam_specs = {h.name: tf.TensorSpec(h.shape, h.dtype, name=h.name)
                  for h in plan.hparams}
  subsets = [()]
  if hparam_specs:
    names = list(hparam_specs)
    if len(names) <= 3:
      subsets = [c for r in range(len(names) + 1)
                 for c in itertools.combinations(names, r)]
    else:
      subsets = [(), tuple(names)]
  with _traced_as_saved():
    for training in (False, True):
      for subset in subsets:
        call.get_concrete_function(images_spec, training,
                                   **{n: hparam_specs[n] for n in subset})
    # Keras 3 endpoints: one image tensor in, the `__call__` output out. Saved
    # as concrete functions, which the save does not trace again (see
    # `zero_arg_function`); TFSMLayer takes those as it takes tf.functions.
    # Traced in the same context, they call the traces above.
    setattr(root, SERVE_ENDPOINT, _function(
        lambda images: call(images)).get_concrete_function(images_spec))
    setattr(root, TRAINING_ENDPOINT, _function(
        lambda images: call(images, training=True)).get_concrete_function(images_spec))
  root.metadata = _metadata(plan, module, notes, removed, train_output)

  signatures = _serving_signatures(module, plan, run_inference)
  return BuiltModel(root=root, plan=plan, signatures=signatures, notes=notes,
                    output_dropout_removed=removed, output_dropout_kept=kept,
                    reference_variables_rewritten=rewritten,
                    train_output_random=train_random)


def _serving_signatures(module: legacy_format.LegacyModule,
                        plan: plan_lib.MigrationPlan,
                        run_inference: Callable) -> dict[str, Callable]:
  """`serving_default` and every TF1 signature of the inference graph."""
  def make(sig: legacy_format.Signature):
    specs = {}
    for key, info in sig.inputs.items():
      shape = list(info.shape) if info.shape is not None else None
      if shape and key == plan_lib.IMAGES_INPUT:
        shape[0] = None
      specs[key] = tf.TensorSpec(shape, info.dtype, name=key)

    def serve(**inputs):
      values = run_inference({sig.inputs[k].tensor_name: v
                              for k, v in inputs.items()})
      return {k: values[o.tensor_name] for k, o in sig.outputs.items()}

    return _function(serve).get_concrete_function(**specs)

  # Signatures alike (real modules' `default` and `image_feature_vector`
  # usually are) share one function: each trace captures every variable.
  made: dict[tuple, Callable] = {}
  result = {}
  for name, sig in module.inference.signatures.items():
    alike = (tuple(sorted(sig.inputs.items())), tuple(sorted(sig.outputs.items())))
    if alike not in made:
      made[alike] = make(sig)
    result[name] = made[alike]
  result["serving_default"] = result[plan.signature]
  return result
