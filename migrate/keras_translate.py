"""TRANSLATE stage (`.keras` output): a module's graph -> a small layer graph.

The graph behind the chosen output is read backwards from that output, op by
op, and each op (or known group of ops) becomes one Keras 3 built-in layer:
a `LayerSpec` naming the layer class, its constructor arguments, its inputs
and which module variables fill its weights. `keras_build` turns the specs
into a functional `keras.Model`; nothing here imports Keras.

The train graph is read when the module has one: it alone shows the dropout
(rate, noise shape, the random op that draws the mask) and the batch-norm
moving-average updates (their decay is Keras's `momentum`). Its inference
twin is the same graph with batch norm on the moving statistics and dropout
off, which is what a Keras layer does with `training=False`; verification
checks both against the module.

`keras_patterns.PATTERNS` is the table of what translates, in the order it
is tried. An op that no entry takes is refused (`errors.UnsupportedModuleError`,
exit code 5) with one line naming the op and the node, before anything is
written.

The model holds the whole module, not only the chosen output's path: the
other signature outputs (e.g. the classifier beside a feature vector) are
translated as well and added to the output times zero (`TIE_NOTE`), so that
the model's variables, regularization losses and batch-norm updates are the
module's, as with `hub.Module` in TF1. Their values never reach the output.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional, Sequence

from migrate import errors
from migrate import graph_rewrite
from migrate import keras_patterns
from migrate import keras_side
from migrate import legacy_format
from migrate import plan as plan_lib

Graph = keras_patterns.Graph
Match = keras_patterns.Match
Refusal = keras_patterns.Refusal
node_name = keras_patterns.node_name
port = keras_patterns.port
tensor_key = keras_patterns.tensor_key

INPUT = keras_side.INPUT  # The name of the model's input layer.
TIE_PREFIX = "migrate_tie"
KERAS_DEFAULT_MOMENTUM = 0.99
TIE_NOTE = (
    "The module's other outputs ({outputs}) are kept in the model, added to "
    "its output times zero, so that the model holds all of the module's "
    "variables, regularization losses and batch-norm updates, as hub.Module "
    "did; they do not change the output.")
# Keras weight attribute -> the constructor argument of its regularizer.
_REGULARIZER_ARGS = {
    ("DepthwiseConv2D", "kernel"): "depthwise_regularizer",
    ("Conv2D", "kernel"): "kernel_regularizer",
    ("Dense", "kernel"): "kernel_regularizer",
    ("Conv2D", "bias"): "bias_regularizer",
    ("DepthwiseConv2D", "bias"): "bias_regularizer",
    ("Dense", "bias"): "bias_regularizer",
    ("BatchNormalization", "gamma"): "gamma_regularizer",
    ("BatchNormalization", "beta"): "beta_regularizer",
}
_TRAINABLE_WEIGHTS = {"kernel", "bias", "gamma", "beta"}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One Keras layer: `keras.layers.<cls>(name=name, **config)(inputs)`."""

  name: str
  cls: str
  config: Mapping[str, object]  # Plain data (JSON-able).
  inputs: tuple[str, ...]  # Names of the layers whose outputs it takes.
  weights: Mapping[str, str] = dataclasses.field(default_factory=dict)  # Keras weight -> module variable.
  source: str = ""  # The graph node it translates.
  pattern: str = ""  # The `PATTERNS` entry that matched.
  random_op: str = ""  # Dropout: the module's random op drawing its mask.
  mask: str = ""  # Dropout: how the module makes its mask from that draw.
  rank: int = 4  # Rank of its output.
  trainable: bool = True


@dataclasses.dataclass
class KerasPlan:
  """What the Keras model will be; see `translate`."""

  input_shape: tuple[Optional[int], Optional[int], int]  # (h, w, 3).
  kind: str  # plan.FEATURE_VECTOR or plan.CLASSIFICATION.
  layers: list[LayerSpec]  # In an order where inputs come first.
  output: str  # The layer whose output is the model's output.
  main_output: str  # The same, before the zero-times ties of other outputs.
  graph_tags: frozenset[str]  # The MetaGraph that was translated.
  notes: list[str]
  variables: dict[str, tuple[str, str]]  # Module variable -> (layer, weight).
  regularization: dict[str, tuple[str, float]]  # Module variable -> (Keras class, factor).
  regularization_losses: list[str]  # Loss tensors, in the module's order.
  loss_variables: list[str]  # The variable of each of those losses.
  frozen_batch_norm: bool  # Batch norm runs in inference mode even in training.
  momentum_hparam: str = ""  # The hyperparameter the momentum defaults from.

  def layer(self, name: str) -> LayerSpec:
    for spec in self.layers:
      if spec.name == name:
        return spec
    raise KeyError(name)

  @property
  def pattern_counts(self) -> dict[str, int]:
    counts: dict[str, int] = {}
    for spec in self.layers:
      counts[spec.pattern] = counts.get(spec.pattern, 0) + 1
    return dict(sorted(counts.items()))


# -- the walk -----------------------------------------------------------------------

def _layer_name(node_name: str) -> str:
  """A Keras layer name for a node: Keras forbids "/" in names, PyTorch "."
  in its parameter names (which Keras makes from layer names)."""
  return re.sub(r"[^A-Za-z0-9_\-]", "_", node_name.replace("/", "__"))


class _Translator:
  """Translates tensors of one graph into `LayerSpec`s, each node once."""

  def __init__(self, g: Graph, images: str, trainable: set[str]):
    self.g = g
    self.images = tensor_key(images)
    self.trainable = trainable
    self.layers: list[LayerSpec] = []
    self.by_tensor: dict[str, str] = {self.images: INPUT}
    self.ranks: dict[str, int] = {INPUT: 4}
    self.updates: set[str] = set()
    self._matches: dict[str, Match] = {}

  def _match(self, ref: str) -> Match:
    node = self.g.node(ref)
    if node.name in self._matches:
      return self._matches[node.name]
    if node.op.startswith("FakeQuant"):
      raise Refusal(node.name, node.op, "fake quantization has no Keras 3 "
                    "built-in layer (convert to a SavedModel instead)")
    match = None
    patterns = (keras_patterns.PATTERNS if node.op not in self.g.functions
                else keras_patterns.DEFUN_PATTERNS)
    for pattern in patterns:
      if patterns is keras_patterns.PATTERNS and node.op not in pattern.ops:
        continue
      match = pattern.match(self.g, node)
      if match is not None:
        match.pattern = pattern.name
        break
    if match is None:
      raise Refusal(node.name, node.op)
    if not match.passthrough and port(ref) != 0 and node.op != "IdentityN":
      raise Refusal(node.name, node.op, f"its output {port(ref)} is used")
    self._matches[node.name] = match
    return match

  def translate(self, output: str) -> str:
    """The layer computing `output` (translating what it needs first)."""
    todo = [tensor_key(output)]
    budget = 4 * len(self.g.nodes) + 16  # A DAG needs far fewer steps.
    while todo:
      budget -= 1
      if budget < 0:
        node = self.g.node(todo[-1])
        raise Refusal(node.name, node.op, "a cycle in the graph")
      ref = todo[-1]
      if ref in self.by_tensor:
        todo.pop()
        continue
      node = self.g.node(ref)
      if node.op == "Placeholder":
        raise Refusal(node.name, node.op, "an input other than the images")
      match = self._match(ref)
      pending = [tensor_key(i) for i in match.inputs
                 if tensor_key(i) not in self.by_tensor]
      if pending:
        todo.extend(pending)
        continue
      todo.pop()
      if match.passthrough:
        self.by_tensor[ref] = self.by_tensor[tensor_key(match.inputs[0])]
        continue
      self.by_tensor[ref] = self._emit(node, match)
    return self.by_tensor[tensor_key(output)]

  def _emit(self, node, match: Match) -> str:
    inputs = tuple(self.by_tensor[tensor_key(i)] for i in match.inputs)
    name = _layer_name(node.name)
    trainable_weights = {k: v for k, v in match.weights.items()
                         if k in _TRAINABLE_WEIGHTS}
    flags = {v in self.trainable for v in trainable_weights.values()}
    if len(flags) > 1:
      raise Refusal(node.name, node.op, "some of its weights are trainable in "
                    "the module and others not")
    self.updates.update(match.updates)
    spec = LayerSpec(
        name=name, cls=match.cls, config=match.config, inputs=inputs,
        weights=dict(match.weights), source=node.name,
        pattern=match.pattern, random_op=match.random_op, mask=match.mask,
        rank=match.rank or self.ranks[inputs[0]],
        trainable=flags != {False})
    self.layers.append(spec)
    self.ranks[name] = spec.rank
    return name


# -- regularization ---------------------------------------------------------------

def _loss_regularizer(g: Graph, tensor: str) -> tuple[str, str, float]:
  """(variable, Keras regularizer class, factor) of one regularization loss,
  read from its subgraph: slim's `scale * l2_loss(w)` (= scale * sum(w**2)
  / 2) is `L2(scale / 2)`; `scale * sum(w**2)` is `L2(scale)`; `scale *
  sum(|w|)` is `L1(scale)`."""
  node = g.node(tensor)
  if node.op == "Mul":
    for scale_ref, term_ref in ((node.input[0], node.input[1]),
                                (node.input[1], node.input[0])):
      scale = g.scalar(scale_ref)
      term = g.node(term_ref)
      if scale is None:
        continue
      if term.op == "L2Loss":
        var = g.variable(term.input[0])
        if var is not None:
          return var, "L2", scale / 2.0
      if term.op == "Sum":
        inner = g.node(term.input[0])
        var = g.variable(inner.input[0]) if inner.input else None
        axes = g.const(term.input[1])
        if var is None or axes is None:
          continue
        rank = len(g.variable_shape(var))
        if sorted(int(a) % max(rank, 1) for a in axes.reshape(-1)) != list(range(rank)):
          continue
        if inner.op == "Square":
          return var, "L2", scale
        if inner.op == "Abs":
          return var, "L1", scale
  raise Refusal(node.name, node.op, "a regularization loss that is not an "
                "l1 or l2 penalty of one variable (scale * l2_loss(w), "
                "scale * sum(w**2) or scale * sum(|w|))")


# -- the plan -----------------------------------------------------------------------

def _refuse(path: str, e: Refusal) -> errors.UnsupportedModuleError:
  return errors.UnsupportedModuleError(
      f"{path}: cannot write a native Keras model: {e}; a SavedModel output "
      f"(DST not ending in .keras) converts it")


def translate(module: legacy_format.LegacyModule,
              plan: plan_lib.MigrationPlan) -> KerasPlan:
  """The Keras layer graph for `plan`; raises `UnsupportedModuleError` (exit
  code 5) naming the op and node that has no faithful built-in equivalent."""
  try:
    return _translate(module, plan)
  except Refusal as e:
    raise _refuse(module.path, e) from None


def _tie(layers: list[LayerSpec], main: str, extras: Sequence[LayerSpec]) -> str:
  """Adds `main + 0 * mean(extra)` for each extra output; returns the sum's layer."""
  ties = [main]
  for i, extra in enumerate(extras):
    prefix = f"{TIE_PREFIX}{i}"
    x = extra.name
    if extra.rank == 4:
      layers.append(LayerSpec(f"{prefix}_pool", "GlobalAveragePooling2D",
                              dict(keepdims=False), (x,), rank=2, pattern="tie"))
      x = f"{prefix}_pool"
    layers.append(LayerSpec(f"{prefix}_column", "Reshape",
                            dict(target_shape=[-1, 1]), (x,), rank=3,
                            pattern="tie"))
    layers.append(LayerSpec(f"{prefix}_mean", "GlobalAveragePooling1D", {},
                            (f"{prefix}_column",), rank=2, pattern="tie"))
    layers.append(LayerSpec(f"{prefix}_zero", "Rescaling",
                            dict(scale=0.0, offset=0.0), (f"{prefix}_mean",),
                            rank=2, pattern="tie"))
    ties.append(f"{prefix}_zero")
  layers.append(LayerSpec(f"{TIE_PREFIX}_add", "Add", {}, tuple(ties), rank=2,
                          pattern="tie"))
  return f"{TIE_PREFIX}_add"


def _translate(module: legacy_format.LegacyModule,
               plan: plan_lib.MigrationPlan) -> KerasPlan:
  notes: list[str] = []
  variant = module.train or module.inference
  graph_def = variant.graph_def
  sig = variant.signatures[plan.signature]
  output = sig.outputs[plan.output_key].tensor_name
  if module.train is not None:
    match = plan_lib.output_dropout(module, plan)
    if match is not None and plan.remove_output_dropout:
      graph_def, output = graph_rewrite.bypass_output_dropout(
          graph_def, output, match)
      notes.append(
          f"The train graph applies dropout to the output features (node "
          f"'{match.output_node}'); the model's output skips it, as the image "
          f"feature vector API requires (--keep_output_dropout keeps it).")
    elif match is not None:
      notes.append(
          f"The train graph applies dropout to the output features (node "
          f"'{match.output_node}'); kept as asked (--keep_output_dropout), "
          f"against the image feature vector API.")
  g = Graph(graph_def, update_ops=variant.update_ops if module.train else (),
            hparam_defaults=legacy_format.placeholder_defaults(graph_def))
  trainable = {v.name for v in variant.variables if v.trainable}
  t = _Translator(g, sig.inputs[plan_lib.IMAGES_INPUT].tensor_name, trainable)
  main = t.translate(output)
  if t.ranks[main] != 2:
    raise Refusal(node_name(output), g.node(output).op,
                  f"the output has rank {t.ranks[main]}, expected 2")

  # The other outputs of the image signatures: their layers join the model
  # when they hold variables that the chosen output does not read.
  extras: list[tuple[str, str]] = []
  for name, other in sorted(variant.signatures.items()):
    info = other.inputs.get(plan_lib.IMAGES_INPUT)
    if info is None or tensor_key(info.tensor_name) != t.images:
      continue
    for key, out in sorted(other.outputs.items()):
      count = len(t.layers)
      layer = t.translate(out.tensor_name)
      if any(s.weights for s in t.layers[count:]):
        extras.append((f"{name}/{key}", layer))
  layers = list(t.layers)
  used = {i for s in layers for i in s.inputs}
  extras = [(n, l) for n, l in extras if l not in used]  # Ends of branches only.
  output_layer = main
  if extras:
    by_name = {s.name: s for s in layers}
    output_layer = _tie(layers, main, [by_name[l] for _, l in extras])
    notes.append(TIE_NOTE.format(outputs=", ".join(n for n, _ in extras)))

  # Only what the output needs (other outputs may have added weightless layers).
  needed, todo = set(), [output_layer]
  by_name = {s.name: s for s in layers}
  while todo:
    name = todo.pop()
    if name in needed or name == INPUT:
      continue
    needed.add(name)
    todo.extend(by_name[name].inputs)
  layers = [s for s in layers if s.name in needed]

  # Every module variable the model reads belongs to exactly one layer.
  variables: dict[str, tuple[str, str]] = {}
  for spec in layers:
    for weight, var in spec.weights.items():
      if var in variables:
        raise Refusal(spec.source, g.node(spec.source).op,
                      f"variable '{var}' is used by two layers "
                      f"('{variables[var][0]}' and '{spec.name}'); a Keras "
                      f"layer owns its weights")
      variables[var] = (spec.name, weight)

  # Batch norm. Without a train graph it is frozen: training=True then
  # computes what inference does, the only thing the module offers.
  frozen = module.train is None
  bn_layers = [s for s in layers if s.cls == "BatchNormalization"]
  if bn_layers and frozen:
    notes.append(
        "The module has no train graph: its batch-norm layers are frozen "
        "(trainable=False: inference mode also in training, moving averages "
        "never updated, gamma and beta not trained), as the module computes.")
  elif any("momentum" not in s.config for s in bn_layers):
    fixed = [s.source for s in bn_layers if "momentum" not in s.config]
    notes.append(
        f"{len(fixed)} batch-norm layers run on their moving averages in the "
        f"module's train graph (e.g. '{fixed[0]}'): they are frozen "
        f"(trainable=False).")
  hparam = sorted(g.hparams_used)[0] if g.hparams_used else ""
  if hparam:
    momenta = sorted({float(s.config["momentum"]) for s in bn_layers
                      if "momentum" in s.config})
    notes.append(
        f"Batch-norm momentum is the train graph's hyperparameter '{hparam}' "
        f"at its default ({', '.join(f'{m:.6g}' for m in momenta)}); a Keras "
        f"layer has a fixed momentum (set layer.momentum to change it).")
  resolved = []
  for spec in layers:
    if spec.cls == "BatchNormalization":
      config = dict(spec.config)
      fixed = frozen or "momentum" not in config
      config.setdefault("momentum", KERAS_DEFAULT_MOMENTUM)
      spec = dataclasses.replace(spec, config=config,
                                 trainable=spec.trainable and not fixed)
    resolved.append(spec)
  layers = resolved
  unexplained = [u for u in g.update_ops if node_name(u) not in t.updates]
  if unexplained:
    node = g.node(unexplained[0])
    raise Refusal(node.name, node.op, "an update op (UPDATE_OPS) that is not "
                  "a batch-norm moving average of a translated layer")

  # Regularization: each loss read from its subgraph, put on its layer.
  regularization: dict[str, tuple[str, float]] = {}
  loss_variables: list[str] = []
  by_name = {s.name: s for s in layers}
  for tensor in variant.regularization_losses:
    var, cls, factor = _loss_regularizer(g, tensor)
    where = (node_name(tensor), g.node(tensor).op)
    if var not in variables:
      raise Refusal(*where, f"a regularization loss on variable '{var}', "
                    f"which no translated layer holds")
    if var in regularization:
      raise Refusal(*where, f"a second regularization loss on '{var}'")
    spec = by_name[variables[var][0]]
    if (spec.cls, variables[var][1]) not in _REGULARIZER_ARGS or not spec.trainable:
      raise Refusal(*where, f"a regularization loss on the "
                    f"{variables[var][1]} of a {'frozen ' if not spec.trainable else ''}"
                    f"{spec.cls}")
    regularization[var] = (cls, factor)
    loss_variables.append(var)

  shape = plan.input_shape
  return KerasPlan(
      input_shape=(shape[1], shape[2], 3), kind=plan.kind, layers=layers,
      output=output_layer,
      main_output=main, graph_tags=variant.tags, notes=notes,
      variables=variables, regularization=regularization,
      regularization_losses=list(variant.regularization_losses),
      loss_variables=loss_variables, frozen_batch_norm=frozen,
      momentum_hparam=hparam)


def regularizer_argument(spec: LayerSpec, weight: str) -> str:
  """The constructor argument holding the regularizer of `spec`'s `weight`."""
  return _REGULARIZER_ARGS[(spec.cls, weight)]


def translation_table() -> list[tuple[str, str, str]]:
  """(pattern, TF ops, Keras layer) for every entry, in the order tried."""
  rows = [(p.name, ", ".join(sorted(p.ops)) or "a library function", p.layer)
          for p in keras_patterns.PATTERNS + keras_patterns.DEFUN_PATTERNS]
  return rows
