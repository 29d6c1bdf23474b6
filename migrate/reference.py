"""The "before" side of parity checks: a TF1 Hub module run in graph mode.

Each MetaGraph of the module is imported once into its own
`tf.compat.v1.Graph` with a `Session` that stays open across calls. The
module has no saver: every variable node (VarHandleOp or VariableV2) gets an
assign op fed from the values read with `tf.train.load_checkpoint`, so
`reset()` puts the module's own values back at any time.

This module deliberately shares no code with `migrate.build`: a bug in how the
converter builds its functions must not be able to hide itself here. It only
uses `legacy_format` (parsing), `graph_rewrite.find_output_dropout` (to
locate the dropout whose input the converter outputs instead) and
`graph_rewrite.repair_gradients` with `wrap_library_calls=False`: a custom
gradient the module's export lost (TF 2.x's `tf.nn.swish`) cannot be taken
by any Session, so both sides differentiate the forward computation it
wraps; calls with a library gradient (TF 1.x's swish) are left to the
Session, which differentiates them with it (`SymbolicGradient`).

Random ops are never run (an unseeded one raises under op determinism, and
its values would be the OS's): their outputs are fed seeded draws of their
distribution, made in numpy from their inputs (shape, bounds), which the
Session computes without running any random op.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from migrate import errors
from migrate import graph_rewrite
from migrate import legacy_format

_VARIABLE_OPS = frozenset({"VarHandleOp", "VariableV2", "Variable"})
_TABLE_INIT_OPS = frozenset({
    "InitializeTable", "InitializeTableV2", "InitializeTableFromTextFile",
    "InitializeTableFromTextFileV2"})
RANDOM_OPS = graph_rewrite.RANDOM_OPS
_ASSIGN_OPS = graph_rewrite.ASSIGN_OPS
# How many variables `changed_variables` reads per `session.run`.
_READ_AT_ONCE = 32
# Ops that only reshape or rename a tensor (see graph_rewrite._PASS_THROUGH_OPS).
_RESHAPE_ONLY_OPS = frozenset({"Identity", "Squeeze", "Reshape"})


@dataclasses.dataclass
class TrainStepResult:
  """What one training step of the TF1 train graph computed.

  Everything except `changed` comes from a single `session.run` taken
  before any update; `changed` is read after running the update ops once
  with the same feeds (random ops included).
  """

  output: np.ndarray  # The trained output (the dropout's input if bypassed).
  output_tensor: str  # Graph tensor that `output` was read from.
  random_values: dict[str, np.ndarray]  # Random op name -> the value fed.
  variable_names: list[str]  # Every variable of the graph.
  # The variables whose value after the updates differs from the module's
  # own (the checkpoint's, which the step starts from), with that value.
  changed: dict[str, np.ndarray]
  update_ops: list[str]  # The update ops run (UPDATE_OPS reachable from the feeds).
  regularization_losses: list[float]  # Each REGULARIZATION_LOSSES tensor.
  regularization_total: float
  gradients: dict[str, np.ndarray]  # Trainable variable -> d(sum(out*probe))/dvar.
  probe: np.ndarray

  @property
  def grad_norms(self) -> dict[str, float]:
    return {k: float(np.linalg.norm(v.astype(np.float64)))
            for k, v in self.gradients.items()}


class _GraphSession:
  """One MetaGraph imported into its own Graph, with an open Session."""

  def __init__(self, module: legacy_format.LegacyModule,
               variant: legacy_format.GraphVariant,
               checkpoint: Mapping[str, np.ndarray], optimize: bool):
    self.variant = variant
    self.graph = tf.compat.v1.Graph()
    where = f"{module.path} (tags {sorted(variant.tags)})"
    graph_def, repairs = graph_rewrite.repair_gradients(
        variant.graph_def, graph_rewrite.has_gradient, where,
        wrap_library_calls=False)
    # The IdentityN ops whose lost custom gradient `tf.gradients` replaces by
    # that of their forward computation.
    self.forward_gradients: tuple[str, ...] = repairs.forward
    with self.graph.as_default():
      input_map = {}
      for tensor, filename in variant.asset_files.items():
        path = os.path.join(module.path, "assets", filename)
        input_map[tensor] = tf.constant(path, name="reference_asset")
      try:
        tf.compat.v1.import_graph_def(graph_def, input_map=input_map, name="")
      except (ValueError, TypeError, KeyError) as e:
        raise errors.CorruptModuleError(
            f"{where}: expected an importable graph, found "
            f"{type(e).__name__}: {errors.first_line(e)}") from None
      self.var_ops = {op.name: op for op in self.graph.get_operations()
                      if op.type in _VARIABLE_OPS}
      trainable = {v.name for v in variant.variables if v.trainable}
      self.trainable = [n for n in self.var_ops if n in trainable]
      self._placeholders, assigns, self.reads = {}, [], {}
      with tf.name_scope("reference_restore"):
        for name, op in self.var_ops.items():
          if name not in checkpoint:
            raise errors.CorruptModuleError(
                f"{where}: variable '{name}' has no value in the checkpoint "
                f"{module.checkpoint_prefix}")
          dtype = tf.as_dtype(op.get_attr("dtype"))
          ph = tf.compat.v1.placeholder(dtype, checkpoint[name].shape)
          self._placeholders[name] = ph
          if op.type == "VarHandleOp":
            assigns.append(tf.raw_ops.AssignVariableOp(
                resource=op.outputs[0], value=ph))
            self.reads[name] = tf.raw_ops.ReadVariableOp(
                resource=op.outputs[0], dtype=dtype)
          else:
            assigns.append(tf.compat.v1.assign(op.outputs[0], ph,
                                               validate_shape=True))
            self.reads[name] = tf.identity(op.outputs[0])
        self._restore = tf.group(*assigns)
      self._table_inits = [op for op in self.graph.get_operations()
                           if op.type in _TABLE_INIT_OPS]
    self._checkpoint = {n: checkpoint[n] for n in self.var_ops}
    self.session = tf.compat.v1.Session(graph=self.graph,
                                        config=session_config(optimize))
    self.reset()
    if self._table_inits:
      self.session.run(self._table_inits)
    self._grad_cache: dict[tuple, tuple] = {}
    self._reg_total = None

  def reset(self) -> None:
    """Puts the module's own (checkpoint) values back into every variable."""
    self.session.run(self._restore,
                     {self._placeholders[n]: v for n, v in self._checkpoint.items()})

  def read_variables(self, names: Optional[Iterable[str]] = None
                     ) -> dict[str, np.ndarray]:
    names = list(self.reads) if names is None else list(names)
    return self.session.run({n: self.reads[n] for n in names})

  def changed_variables(self) -> dict[str, np.ndarray]:
    """The variables whose value differs from the module's own (which
    `reset()` puts in), read a few at a time: no copy of all the weights is
    made (one would be a weight-sized buffer at verification's peak)."""
    changed, names = {}, list(self.reads)
    for i in range(0, len(names), _READ_AT_ONCE):
      for name, value in self.read_variables(names[i:i + _READ_AT_ONCE]).items():
        if not np.array_equal(value, self._checkpoint[name]):
          changed[name] = value
    return changed

  def tensor(self, name: str) -> tf.Tensor:
    return self.graph.get_tensor_by_name(legacy_format.tensor_name(name))

  def ancestors(self, roots: Sequence[tf.Operation]) -> set[tf.Operation]:
    seen, todo = set(roots), list(roots)
    while todo:
      op = todo.pop()
      for dep in [t.op for t in op.inputs] + list(op.control_inputs):
        if dep not in seen:
          seen.add(dep)
          todo.append(dep)
    return seen

  def random_ops(self, roots: Sequence[tf.Operation]) -> list[tf.Operation]:
    return sorted((op for op in self.ancestors(roots) if op.type in RANDOM_OPS),
                  key=lambda op: op.name)

  def regularization(self) -> tuple[list[tf.Tensor], tf.Tensor]:
    if self._reg_total is None:
      losses = [self.tensor(n) for n in self.variant.regularization_losses]
      with self.graph.as_default(), tf.name_scope("reference_regularization"):
        total = (tf.add_n([tf.cast(l, tf.float32) for l in losses])
                 if losses else tf.constant(0.0))
      self._reg_total = (losses, total)
    return self._reg_total

  def gradients(self, target: tf.Tensor, reshape_probe: bool
                ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """(probe placeholder, trainable variable -> gradient of sum(target*probe))."""
    key = (target.name, reshape_probe)
    if key not in self._grad_cache:
      with self.graph.as_default(), tf.name_scope("reference_gradients"):
        probe = tf.compat.v1.placeholder(tf.float32, None, name="probe")
        p = tf.reshape(probe, tf.shape(target)) if reshape_probe else probe
        loss = tf.reduce_sum(tf.cast(target, tf.float32) * p)
        names = self.trainable
        grads = tf.gradients(loss, [self.var_ops[n].outputs[0] for n in names])
        result = {}
        for name, grad in zip(names, grads):
          if grad is None:
            continue
          if isinstance(grad, tf.IndexedSlices):
            grad = tf.convert_to_tensor(grad)
          result[name] = grad
      self._grad_cache[key] = (probe, result)
    return self._grad_cache[key]

  def close(self) -> None:
    self.session.close()


def read_checkpoint(module: legacy_format.LegacyModule) -> dict[str, np.ndarray]:
  """Every tensor of the module's checkpoint, by variable name."""
  try:
    reader = tf.train.load_checkpoint(module.checkpoint_prefix)
    names = reader.get_variable_to_shape_map()
    return {n: reader.get_tensor(n) for n in names}
  except (tf.errors.OpError, ValueError) as e:
    if any(v.variables for v in module.variants.values()):
      raise errors.CorruptModuleError(
          f"{module.checkpoint_prefix}: expected a readable checkpoint, "
          f"found {type(e).__name__}") from None
    return {}


class CheckpointValues(Mapping[str, np.ndarray]):
  """Variables of a module's checkpoint, each read from its files when asked
  for and not kept.

  What `Expected.variables` holds: the checks read each value once, one at a
  time, instead of verification holding a copy of the weights (a
  weight-sized buffer at the peak of the process, docs/PERFORMANCE.md).
  Picklable (the prefix and the names). A read that fails (the module's
  files changed or went away meanwhile) raises `CorruptModuleError`.
  """

  def __init__(self, prefix: str, names: Iterable[str]):
    self._prefix = prefix
    self._names = frozenset(names)
    self._reader = None

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._names:
      raise KeyError(name)
    try:
      if self._reader is None:
        self._reader = tf.train.load_checkpoint(self._prefix)
      return self._reader.get_tensor(name)
    except (tf.errors.OpError, ValueError) as e:
      raise errors.CorruptModuleError(
          f"{self._prefix}: expected the checkpoint verification started with, "
          f"reading '{name}' again found {type(e).__name__}") from None

  def __contains__(self, name: object) -> bool:
    return name in self._names

  def __iter__(self):
    return iter(sorted(self._names))

  def __len__(self) -> int:
    return len(self._names)

  def __getstate__(self) -> dict:
    return {"_prefix": self._prefix, "_names": self._names, "_reader": None}


def probe_weights(seed: int, shape: Sequence[int]) -> np.ndarray:
  """The fixed weights of the loss `sum(output * probe)` whose gradients are compared."""
  return np.random.RandomState(seed + 1).standard_normal(tuple(shape)).astype(
      np.float32)


def session_config(optimize: bool) -> tf.compat.v1.ConfigProto:
  """A Session config with Grappler on (TF1's default) or off."""
  config = tf.compat.v1.ConfigProto()
  if not optimize:
    config.graph_options.rewrite_options.disable_meta_optimizer = True
  return config


def _draw(op: tf.Operation, inputs: Sequence[np.ndarray],
          rng: np.random.RandomState) -> np.ndarray:
  """A seeded draw of `op`'s distribution, from the values of its inputs."""
  dtype = op.outputs[0].dtype.as_numpy_dtype
  kind = op.type
  if kind in ("RandomUniform", "RandomStandardNormal", "TruncatedNormal"):
    shape = tuple(int(d) for d in inputs[0])
    if kind == "RandomUniform":
      value = rng.uniform(0.0, 1.0, shape)
    else:
      value = rng.standard_normal(shape)
      while kind == "TruncatedNormal" and (np.abs(value) > 2.0).any():
        bad = np.abs(value) > 2.0
        value[bad] = rng.standard_normal(int(bad.sum()))
  elif kind == "RandomUniformInt":  # [minval, maxval)
    shape = tuple(int(d) for d in inputs[0])
    value = rng.randint(int(inputs[1]), int(inputs[2]), shape, dtype=np.int64)
  elif kind == "RandomShuffle":  # Along the first dimension.
    value = np.asarray(inputs[0])
    value = value[rng.permutation(value.shape[0])] if value.ndim else value
  elif kind == "Multinomial":  # logits [batch, classes], num_samples.
    logits = np.asarray(inputs[0], np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    value = np.stack([rng.choice(p.shape[1], int(inputs[1]), p=row) for row in p])
  elif kind == "RandomGamma":  # shape + alpha's shape.
    alpha = np.asarray(inputs[1], np.float64)
    value = rng.gamma(alpha, size=tuple(int(d) for d in inputs[0]) + alpha.shape)
  elif kind in ("RandomPoisson", "RandomPoissonV2"):  # shape + rate's shape.
    rate = np.asarray(inputs[1], np.float64)
    value = rng.poisson(rate, size=tuple(int(d) for d in inputs[0]) + rate.shape)
  else:
    raise ValueError(f"random op '{op.name}' ({kind}): no seeded draw for its "
                     f"distribution")
  return np.asarray(value).astype(dtype)


def _depends_on(targets: set[tf.Operation]) -> Callable[[tf.Operation], bool]:
  """A test whether an op's value (or its control inputs) depends on one of
  `targets`, memoized over the graph (a loop's back edge counts as no)."""
  memo: dict[tf.Operation, bool] = {}

  def depends(start: tf.Operation) -> bool:
    stack, entered = [(start, False)], set()
    while stack:
      op, expanded = stack.pop()
      if op in memo:
        continue
      preds = [t.op for t in op.inputs] + list(op.control_inputs)
      if op in targets:
        memo[op] = True
      elif expanded:
        memo[op] = any(memo.get(p, False) for p in preds)
      elif op not in entered:
        entered.add(op)
        stack.append((op, True))
        stack.extend((p, False) for p in preds if p not in memo)
    return memo[start]

  return depends


def draw_random(session: tf.compat.v1.Session, ops: Sequence[tf.Operation],
                feed: Mapping[tf.Tensor, np.ndarray],
                rng: np.random.RandomState) -> dict[str, np.ndarray]:
  """Seeded values for the random ops `ops` of `session`'s graph (`_draw`),
  by op name; none of them is run.

  Their inputs (shapes, bounds) are computed with `feed`, in one run; those
  that depend on another random op (rare), one by one in the graph's order,
  with the values drawn before them fed.
  """
  feed = dict(feed)
  depends = _depends_on(set(ops))
  needs_random = {op: any(depends(t.op) for t in op.inputs) for op in ops}
  order = {op: i for i, op in enumerate(session.graph.get_operations())}
  later = sorted((op for op in ops if needs_random[op]), key=order.get)
  values = {}
  for batch in [[op for op in ops if not needs_random[op]]] + [[op] for op in later]:
    inputs = session.run([list(op.inputs) for op in batch], feed)
    for op, args in zip(batch, inputs):
      values[op.name] = _draw(op, args, rng)
      feed[op.outputs[0]] = values[op.name]
  return values


class ReferenceModule:
  """Runs a TF1 Hub module as TF1 did: graph mode, a Session per tag set."""

  def __init__(self, module_path: str, *,
               module: Optional[legacy_format.LegacyModule] = None,
               checkpoint: Optional[Mapping[str, np.ndarray]] = None,
               optimize_graphs: bool = True):
    """`module` and `checkpoint` (`read_checkpoint`), if given, save reading
    them again; `optimize_graphs=False` runs the Sessions with Grappler off."""
    self.module = module or legacy_format.read_module(module_path)
    self._optimize = optimize_graphs
    self._checkpoint = (dict(checkpoint) if checkpoint is not None
                        else read_checkpoint(self.module))
    self._sessions: dict[frozenset[str], _GraphSession] = {}

  # -- graphs --------------------------------------------------------------

  @property
  def has_train_graph(self) -> bool:
    return self.module.train is not None

  def graph(self, tags: frozenset[str]) -> _GraphSession:
    """The imported graph and session of one tag set (imported once)."""
    tags = frozenset(tags)
    if tags not in self._sessions:
      self._sessions[tags] = _GraphSession(
          self.module, self.module.variants[tags], self._checkpoint,
          self._optimize)
    return self._sessions[tags]

  def train_tags(self) -> frozenset[str]:
    """The train graph's tags, or the inference graph's if there is none."""
    return (legacy_format.TRAIN_TAGS if self.has_train_graph
            else legacy_format.INFERENCE_TAGS)

  def signatures(self, tags: frozenset[str] = legacy_format.INFERENCE_TAGS
                 ) -> Mapping[str, legacy_format.Signature]:
    return self.module.variants[frozenset(tags)].signatures

  def checkpoint_values(self) -> dict[str, np.ndarray]:
    return dict(self._checkpoint)

  def reset(self) -> None:
    for session in self._sessions.values():
      session.reset()

  def close(self) -> None:
    for session in self._sessions.values():
      session.close()
    self._sessions.clear()

  def __enter__(self) -> "ReferenceModule":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- running ---------------------------------------------------------------

  def _feed(self, g: _GraphSession, sig: legacy_format.Signature,
            inputs: Mapping[str, np.ndarray]) -> dict[tf.Tensor, np.ndarray]:
    unknown = sorted(set(inputs) - set(sig.inputs))
    if unknown:
      raise KeyError(f"signature '{sig.name}' has no inputs {unknown}")
    return {g.tensor(sig.inputs[k].tensor_name): np.asarray(v)
            for k, v in inputs.items()}

  def infer(self, signature: str, inputs: Mapping[str, np.ndarray], *,
            tags: frozenset[str] = legacy_format.INFERENCE_TAGS
            ) -> dict[str, np.ndarray]:
    """Every output of `signature` (inputs left out use their defaults)."""
    g = self.graph(tags)
    sig = g.variant.signatures[signature]
    fetches = {k: g.tensor(o.tensor_name) for k, o in sig.outputs.items()}
    return g.session.run(fetches, self._feed(g, sig, inputs))

  def infer_tensors(self, fetches: Mapping[str, str],
                    feeds: Mapping[str, np.ndarray], *,
                    tags: frozenset[str] = legacy_format.INFERENCE_TAGS
                    ) -> dict[str, np.ndarray]:
    """Any graph tensors by name, with feeds by graph tensor name."""
    g = self.graph(tags)
    return g.session.run({k: g.tensor(t) for k, t in fetches.items()},
                         {g.tensor(t): v for t, v in feeds.items()})

  def regularization_losses(self, tags: Optional[frozenset[str]] = None
                            ) -> tuple[list[float], float]:
    """Each REGULARIZATION_LOSSES value and their total (TF1's add_n)."""
    g = self.graph(self.train_tags() if tags is None else tags)
    losses, total = g.regularization()
    values, total_value = g.session.run((losses, total))
    return [float(v) for v in values], float(total_value)

  def output_dropout(self, signature: str, output_key: str
                     ) -> Optional[graph_rewrite.DropoutMatch]:
    """The dropout the train graph applies last to an output, if any."""
    if not self.has_train_graph:
      return None
    train = self.module.train
    tensor = train.signatures[signature].outputs[output_key].tensor_name
    return graph_rewrite.find_output_dropout(train.graph_def, tensor)

  def train_random_ops(self, signature: str, output_key: str, *,
                       bypass_output_dropout: bool = False) -> list[str]:
    """Random ops the training output (or its updates) depends on."""
    g = self.graph(self.train_tags())
    target, _ = self._train_target(g, signature, output_key,
                                   bypass_output_dropout)
    roots = [target.op] + [g.graph.get_operation_by_name(n)
                           for n in self._update_ops(g, signature)]
    return [op.name for op in g.random_ops(roots)]

  def _train_target(self, g: _GraphSession, signature: str, output_key: str,
                    bypass: bool) -> tuple[tf.Tensor, Optional[tf.Tensor]]:
    """(tensor to differentiate, the output tensor whose shape to restore)."""
    sig = g.variant.signatures[signature]
    out = g.tensor(sig.outputs[output_key].tensor_name)
    if not bypass:
      return out, None
    match = graph_rewrite.find_output_dropout(g.variant.graph_def, out.name)
    if match is None:
      raise ValueError(f"the train output '{signature}/{output_key}' passes "
                       f"through no output dropout")
    for name in match.pass_through:
      if g.graph.get_operation_by_name(name).type not in _RESHAPE_ONLY_OPS:
        raise ValueError(f"cannot bypass the output dropout through '{name}'")
    return g.tensor(match.input_tensor), out

  def _update_ops(self, g: _GraphSession, signature: str) -> list[str]:
    """UPDATE_OPS that the signature's inputs can run (all others need feeds)."""
    sig = g.variant.signatures[signature]
    fed = {legacy_format.node_name(i.tensor_name) for i in sig.inputs.values()}
    result = []
    for name in g.variant.update_ops:
      op = g.graph.get_operation_by_name(name)
      needs = {a.name for a in g.ancestors([op]) if a.type == "Placeholder"}
      if needs <= fed:
        result.append(name)
    return result

  @staticmethod
  def _output_shape(value: np.ndarray, shaped_like: Optional[tf.Tensor]
                    ) -> tuple[int, ...]:
    """The shape of the output whose dropout input `value` is (reshape-only path)."""
    if shaped_like is None:
      return value.shape
    dims = shaped_like.shape
    if dims.rank is not None and all(d is not None for d in dims[1:]):
      return (value.shape[0], *dims.as_list()[1:])
    return (value.shape[0], int(np.prod(value.shape[1:])))

  def train_step(self, signature: str, output_key: str, images: np.ndarray,
                 hparams: Optional[Mapping[str, float]] = None, *,
                 random_feeds: Optional[Mapping[str, np.ndarray]] = None,
                 probe: Optional[np.ndarray] = None,
                 bypass_output_dropout: bool = False,
                 feeds_by_tensor: Optional[Mapping[str, np.ndarray]] = None,
                 seed: int = 0) -> TrainStepResult:
    """One training step of the train graph (the inference graph if none).

    Runs, in one `session.run`, the output of `signature/output_key` (or the
    input of its output dropout, reshaped like the output, with
    `bypass_output_dropout`), the regularization losses and the gradients of
    `sum(output * probe)`; then the update ops once with the same feeds (in
    the same run if the output itself assigns variables: in-place batch-norm
    updates); then reads the variables. `feeds_by_tensor` feeds more graph
    tensors by name (e.g. a hyperparameter that the signature does not
    take). Random ops are fed: with `random_feeds` (op name -> value) or
    with seeded values of their distribution. The variables are
    restored to the module's values before the step and left updated after
    it (call `reset()`).
    """
    g = self.graph(self.train_tags())
    g.reset()
    sig = g.variant.signatures[signature]
    inputs = {"images": images, **(hparams or {})}
    feed = self._feed(g, sig, inputs)
    for name, value in (feeds_by_tensor or {}).items():
      feed[g.tensor(name)] = np.asarray(value)
    target, shaped_like = self._train_target(g, signature, output_key,
                                             bypass_output_dropout)
    updates = [g.graph.get_operation_by_name(n)
               for n in self._update_ops(g, signature)]
    probe_ph, grads = g.gradients(target, reshape_probe=shaped_like is not None)
    losses, total = g.regularization()
    randoms = g.random_ops([target.op] + updates +
                           [t.op for t in grads.values()])
    if randoms:
      if random_feeds is None:
        random_values = draw_random(g.session, randoms, feed,
                                    np.random.RandomState(seed))
      else:
        missing = [op.name for op in randoms if op.name not in random_feeds]
        if missing:
          raise KeyError(f"no values given for the random ops {missing}")
        random_values = {op.name: np.asarray(random_feeds[op.name])
                         for op in randoms}
      for op in randoms:
        feed[op.outputs[0]] = random_values[op.name]
    else:
      random_values = {}
    # A batch norm with `updates_collections=None` updates its moving
    # averages in place: the output runs the update. Then one run does
    # everything, as a training step with hub.Module does; run apart, an
    # update op downstream of it (a later batch norm's) would run the
    # in-place one a second time. Otherwise the update ops run after the
    # step, as in the converted model (fake-quant ranges read by the step).
    in_place = any(op.type in _ASSIGN_OPS for op in g.ancestors([target.op]))
    if probe is None:
      static = (shaped_like if shaped_like is not None else target).shape
      if static.rank is not None and static[1:].is_fully_defined():
        shape = (images.shape[0], *static.as_list()[1:])
      else:
        shape = self._output_shape(g.session.run(target, feed), shaped_like)
        if in_place:
          g.reset()  # That run updated the moving averages.
      probe = probe_weights(seed, shape)
    feed[probe_ph] = probe
    fetches = {"target": target, "losses": losses, "total": total, "grads": grads}
    if in_place:
      fetches["updates"] = updates
    res = g.session.run(fetches, feed)
    if updates and not in_place:
      g.session.run(updates, feed)
    changed = g.changed_variables()
    output = res["target"].reshape(self._output_shape(res["target"], shaped_like))
    return TrainStepResult(
        output=output, output_tensor=target.name,
        random_values=random_values, variable_names=list(g.reads),
        changed=changed, update_ops=[u.name for u in updates],
        regularization_losses=[float(v) for v in res["losses"]],
        regularization_total=float(res["total"]),
        gradients=res["grads"], probe=probe)
