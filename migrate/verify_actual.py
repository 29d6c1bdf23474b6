"""VERIFY, the converted side: the loaded SavedModel -> `Actual`.

`ConvertedModel` runs the model loaded with `tf.saved_model.load` on the
inputs of `verify_spec`; its producers (`describe`, `inference`, `training`,
`with_consumers`, which `verify` calls in that order) fill `Actual`, plain
data that mirrors `verify_expected.Expected`:

  Expected.outputs[tag][tensor]    Actual.signature_outputs[signature][tag][key]
                                   Actual.call_outputs[tag]
  Expected.steps[prefix]           Actual.steps[prefix]
  Expected.regularization          Actual.regularization
  Expected.variables               Actual.variables

The consumer runs (`ConvertedModel.consumers`) load the saved files
themselves and share nothing with the loaded model: they may run in
another thread meanwhile (`verify`'s placement). A training step is one path:
`__call__(images, training=True, **hparams)` of the LOADED model under a
`GradientTape` (the path `hub.KerasLayer(trainable=True)` takes), or, when
the training function (or the module's training path) has random ops, the
same with the reference's random values fed
(`verify_random_ops.FedTrainFunction`): never unfed, as an unseeded random
op raises under op determinism and a seeded one would draw other values
than the module's. The variables a step changes are put back after it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import numpy as np
import tensorflow as tf

from migrate import build as build_lib
from migrate import consumers as consumers_lib
from migrate import legacy_format
from migrate import reference as reference_lib
from migrate import verify_expected
from migrate import verify_random_ops
from migrate import verify_spec
from migrate.verify_spec import ModuleFacts, Spec

# Errors of a run that fails on this model (anything else is a bug here).
ConsumerResults = dict[str, consumers_lib.ConsumerResult]  # Runner -> result.
_RUN_ERRORS = (TypeError, ValueError, KeyError, tf.errors.OpError)
RandomValues = Mapping[str, Mapping[str, np.ndarray]]  # Step -> op -> value.


@dataclasses.dataclass
class ActualStep:
  """One training step of the converted model (cf. `ExpectedStep`)."""

  error: str = ""  # Why the step could not run ("" if it ran).
  output: Optional[np.ndarray] = None
  changed: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  gradients: Optional[dict[str, np.ndarray]] = None  # The default step only.
  # How its random ops were fed (None: run without feeding any).
  random_ops: Optional[verify_random_ops.RandomOpsMatch] = None
  # Not run yet: the training function has random ops, and the module's
  # values for them were not known (`ConvertedModel.feed_random_ops` runs it).
  waiting: bool = False


@dataclasses.dataclass
class Actual:
  """What the converted model computed for a `Spec`: plain data, picklable."""

  spec: Spec
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
  signatures: list[str] = dataclasses.field(default_factory=list)  # Saved ones.
  # Saved signature -> batch tag -> output key -> value ({} if it failed).
  signature_outputs: dict[str, dict[str, dict[str, np.ndarray]]] = (
      dataclasses.field(default_factory=dict))
  call_outputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  # The Keras 3 inference endpoint (`serve`, what `TFSMLayer(DST)` calls) on
  # the same batch tags; a tag -> error text where it could not run.
  serve_outputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  serve_errors: dict[str, str] = dataclasses.field(default_factory=dict)
  steps: dict[str, ActualStep] = dataclasses.field(default_factory=dict)
  regularization: list[float] = dataclasses.field(default_factory=list)
  variables: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  trainable: list[str] = dataclasses.field(default_factory=list)  # In order.
  warnings: list[str] = dataclasses.field(default_factory=list)
  # The model as its users load it (`migrate.consumers`, each from the saved
  # files): runner -> what it computed, and the runs asked of them
  # (`consumers.Selected.ran`: runner names, "<runner>/fit").
  consumers: dict[str, consumers_lib.ConsumerResult] = dataclasses.field(
      default_factory=dict)
  consumer_runs: list[str] = dataclasses.field(default_factory=list)


def _var_name(v: tf.Variable) -> str:
  return legacy_format.node_name(v.name)


class ConvertedModel:
  """The loaded converted model, run for `spec` on the inputs of `facts`."""

  def __init__(self, model: Any, spec: Spec, facts: ModuleFacts,
               metadata: Optional[Mapping[str, Any]] = None, *,
               path: str = "", consumers: str = consumers_lib.DEFAULT):
    self.model = model
    self.path = path  # Where the consumers load it from ("": none run).
    self.selected = consumers_lib.selected(consumers)
    self.spec = spec
    self.facts = facts
    self.metadata = dict(metadata if metadata is not None
                         else verify_spec.read_metadata(model))
    self.variables = {_var_name(v): v for v in model.variables}
    self.trainable = {_var_name(v): v for v in model.trainable_variables}
    self._saved: Optional[dict[str, np.ndarray]] = None
    self._random_ops: dict[tuple[str, ...], list[str]] = {}

  @property
  def saved(self) -> dict[str, np.ndarray]:
    """Every variable's saved value (read once, when first needed)."""
    if self._saved is None:
      self._saved = {n: v.numpy() for n, v in self.variables.items()}
    return self._saved

  def describe(self) -> Actual:
    """The model itself: metadata, signatures, variables (nothing run)."""
    return Actual(spec=self.spec, metadata=dict(self.metadata),
                  signatures=sorted(self.model.signatures),
                  variables=self.saved, trainable=list(self.trainable))

  # -- the inference half

  def inference(self, actual: Actual) -> Actual:
    """`actual` with the inference fields: the serving signatures,
    `__call__` in inference mode, the `serve` endpoint, the regularization
    losses."""
    outputs, warnings = self.signature_outputs()
    return dataclasses.replace(
        actual, signature_outputs=outputs, call_outputs=self.call_outputs(),
        **self.serve_outputs(), regularization=self.regularization(),
        warnings=list(actual.warnings) + warnings)

  def with_consumers(self, actual: Actual, results: ConsumerResults) -> Actual:
    """`actual` with the consumer runs' `results` (`consumers()`)."""
    return dataclasses.replace(
        actual, consumers=results,
        consumer_runs=[r for r in self.selected.ran if r.split("/")[0] in results])

  def signature_outputs(self) -> tuple[dict[str, dict[str, dict[str, np.ndarray]]],
                                       list[str]]:
    """Every serving signature on its inputs (`verify_spec.signature_runs`),
    and a warning for each run that failed."""
    outputs: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    warnings = []
    runs = verify_spec.signature_runs(
        self.facts, list(self.model.signatures),
        self.metadata.get("source_signature"))
    for name, module_name, tags in runs:
      sig = self.facts.image_signatures[module_name]
      fn = self.model.signatures[name]
      for tag in tags:
        inputs = {"images": tag.images(self.spec.seed), **sig.other_inputs}
        try:
          result = fn(**{k: tf.constant(v) for k, v in inputs.items()})
          outputs.setdefault(name, {})[tag.name] = {
              k: v.numpy() for k, v in result.items()}
        except (TypeError, ValueError, tf.errors.OpError) as e:
          outputs.setdefault(name, {})[tag.name] = {}
          warnings.append(f"signature '{name}' failed on {tag.name}: "
                          f"{verify_spec.error_text(e)}")
    return outputs, warnings

  def consumers(self) -> ConsumerResults:
    """Each run of the consumer selection (`consumers.selected`), on the
    inputs of the checks: the TF1 loader every serving signature on the
    inputs of `signature_outputs`; the C API loader and TFLite
    `serving_default`, the Keras runners their endpoint, on every batch tag
    of `__call__`; a fit step on the training step's images."""
    if not self.path:
      return {}
    runs = verify_spec.signature_runs(
        self.facts, list(self.model.signatures),
        self.metadata.get("source_signature"))
    signature_tags = {name: [t.name for t in tags] for name, _, tags in runs}
    call_tags = verify_spec.batch_tags(self.facts.call_sizes)
    inputs = verify_spec.signature_inputs(
        self.spec, self.facts,
        list({t.name: t for _, _, tags in runs for t in tags + call_tags}.values()))
    serving = {t: inputs[t] for t in signature_tags.get("serving_default", [])}
    call = {t.name: inputs[t.name] for t in call_tags}
    results = {}
    for name, fit in self.selected.runs:
      run = consumers_lib.CONSUMERS[name].run
      if name == "tf1_loader":
        results[name] = run(self.path, inputs, signature_tags=signature_tags)
      elif not consumers_lib.CONSUMERS[name].trains:
        results[name] = run(self.path, serving)
      elif call:  # A Keras runner: `__call__`'s output (none: no rows).
        results[name] = run(self.path, call, fit_images=(
            verify_spec.train_images(self.spec, self.facts) if fit else None))
    return results

  def call_outputs(self) -> dict[str, np.ndarray]:
    """`__call__` in inference mode on every batch tag (none if the
    metadata names no output of the module: 'metadata/source' fails)."""
    return {tag.name: np.asarray(self.model(tf.constant(tag.images(self.spec.seed))))
            for tag in verify_spec.batch_tags(self.facts.call_sizes)}

  def serve_outputs(self) -> dict[str, dict[str, Any]]:
    """The `serve` endpoint (Keras 3's `TFSMLayer` default) on every batch
    tag of `call_outputs`: {"serve_outputs": ..., "serve_errors": ...}."""
    outputs, failed = {}, {}
    endpoint = getattr(self.model, build_lib.SERVE_ENDPOINT, None)
    for tag in verify_spec.batch_tags(self.facts.call_sizes):
      if endpoint is None:
        failed[tag.name] = f"the model has no '{build_lib.SERVE_ENDPOINT}' endpoint"
        continue
      try:
        outputs[tag.name] = np.asarray(endpoint(tf.constant(tag.images(self.spec.seed))))
      except _RUN_ERRORS as e:
        failed[tag.name] = verify_spec.error_text(e)
    return {"serve_outputs": outputs, "serve_errors": failed}

  def regularization(self) -> list[float]:
    """Every regularization loss, from one traced function (one
    instantiation instead of one per loss: ResNet-v2-50 has 54)."""
    losses = list(self.model.regularization_losses)
    if not losses:
      return []
    fn = tf.function(lambda: [f() for f in losses]).get_concrete_function()
    return [float(v) for v in fn()]

  # -- the training steps

  def training(self, actual: Actual,
               random_values: Optional[RandomValues] = None) -> Actual:
    """`actual` with every training step of `verify_spec.train_steps`.

    `random_values` (step -> random op -> value, from `Expected.steps`;
    `{}` for a step the module ran without random ops) are fed to the steps'
    random ops; None if not known yet. A step whose training function has
    random ops is run fed only: without its values it waits
    (`ActualStep.waiting`) for `feed_random_ops`.
    """
    steps = {prefix: self.train_step(
                 prefix, values,
                 None if random_values is None else random_values.get(prefix))
             for prefix, values in verify_spec.train_steps(self.facts)}
    return dataclasses.replace(actual, steps=steps)

  def feed_random_ops(self, actual: Actual,
                      expected: verify_expected.Expected) -> Actual:
    """`actual`, with the steps that waited for the module's random values
    (or ran unfed while the module's step had random ops) run with them."""
    steps = dict(actual.steps)
    for prefix, values in verify_spec.train_steps(self.facts):
      ref, step = expected.steps.get(prefix), steps.get(prefix)
      if ref is None or ref.error or step is None:
        continue
      if step.waiting or (ref.random_values and step.random_ops is None):
        steps[prefix] = self.train_step(prefix, values, ref.random_values)
    return dataclasses.replace(actual, steps=steps)

  def _training_random_ops(self, hparam_names: tuple[str, ...]) -> list[str]:
    """The random ops of the saved training function for these hparams."""
    if hparam_names not in self._random_ops:
      self._random_ops[hparam_names] = verify_random_ops.random_ops(
          verify_random_ops.training_function(self.model, list(hparam_names)))
    return self._random_ops[hparam_names]

  def train_step(self, prefix: str, hparam_values: Mapping[str, float],
                 random_values: Optional[Mapping[str, np.ndarray]] = None
                 ) -> ActualStep:
    """One training step, the gradients of `sum(output * probe)` for the
    default step only. If the training function has random ops (or the
    module's step had: `random_values`), it runs with them fed the module's
    values; with `random_values` None (not known), it waits."""
    x = verify_spec.train_images(self.spec, self.facts)
    call: Callable = lambda images, **kw: self.model(images, training=True, **kw)
    match = None
    try:
      has_random = bool(self._training_random_ops(tuple(sorted(hparam_values))))
      if has_random and random_values is None:
        return ActualStep(error="not run: the module's values for its random "
                          "ops are not known", waiting=True)
      if has_random or random_values:
        call = verify_random_ops.FedTrainFunction(
            verify_random_ops.training_function(self.model, list(hparam_values)),
            random_values or {}, x.shape)
        match = call.match
    except _RUN_ERRORS as e:
      return ActualStep(error=verify_spec.error_text(e))
    if match is not None and not match.ok:
      return ActualStep(random_ops=match)  # 'random_ops' fails; not run.
    step = self._run_step(call, x, hparam_values, with_gradients=prefix == "train")
    step.random_ops = match
    return step

  def _run_step(self, call: Callable, x: np.ndarray,
                hparam_values: Mapping[str, float], with_gradients: bool
                ) -> ActualStep:
    kwargs = {n: tf.constant(v, tf.float32) for n, v in hparam_values.items()}
    watched = list(self.trainable.values())
    restored = False
    try:
      with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(watched)
        out = call(tf.constant(x), **kwargs)
        probe = reference_lib.probe_weights(self.spec.seed, out.shape)
        loss = tf.reduce_sum(out * probe)
      grads = tape.gradient(loss, watched) if with_gradients else None
      changed = {}
      for name, var in self.variables.items():
        value = var.numpy()
        if not np.array_equal(value, self.saved[name]):
          changed[name] = value
      self._restore(changed)
      restored = True
    except _RUN_ERRORS as e:
      return ActualStep(error=verify_spec.error_text(e))
    finally:
      if not restored:
        self._restore(self.variables)
    gradients = None
    if grads is not None:
      gradients = {}
      for n, g in zip(self.trainable, grads):
        if g is not None:
          gradients[n] = (tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices)
                          else g).numpy()
    return ActualStep(output=out.numpy(), changed=changed, gradients=gradients)

  def _restore(self, names) -> None:
    """Puts the saved values back into the variables `names`."""
    for name in names:
      self.variables[name].assign(self.saved[name])
