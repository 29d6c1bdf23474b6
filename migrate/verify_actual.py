"""VERIFY, the converted side: the loaded SavedModel -> `Actual`.

`ConvertedModel` runs the model loaded with `tf.saved_model.load` on the
inputs of `verify_spec`, and `converted_side` returns what it computed as
`Actual`, plain data that mirrors `verify_expected.Expected`:

  Expected.outputs[tag][tensor]    Actual.signature_outputs[signature][tag][key]
                                   Actual.call_outputs[tag]
  Expected.steps[prefix]           Actual.steps[prefix]
  Expected.regularization          Actual.regularization
  Expected.variables               Actual.variables

The inference half (`converted_inference`: the signatures, `__call__` in
inference mode, the regularization losses) can run in another process,
which holds its own copy of the variables. A training step is one path:
`__call__(images, training=True, **hparams)` of the LOADED model under a
`GradientTape` (the path `hub.KerasLayer(trainable=True)` takes), or, when
the module's training path has random ops, the same with the reference's
random values fed (`verify_random_ops.FedTrainFunction`). The variables a
step changes are put back after it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import numpy as np
import tensorflow as tf

from migrate import legacy_format
from migrate import reference as reference_lib
from migrate import verify_expected
from migrate import verify_random_ops
from migrate import verify_spec
from migrate.verify_spec import ModuleFacts, Spec

# Errors of a run that fails on this model (anything else is a bug here).
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
  steps: dict[str, ActualStep] = dataclasses.field(default_factory=dict)
  regularization: list[float] = dataclasses.field(default_factory=list)
  variables: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  trainable: list[str] = dataclasses.field(default_factory=list)  # In order.
  warnings: list[str] = dataclasses.field(default_factory=list)

  def with_inference_of(self, other: "Actual") -> "Actual":
    """This, with the fields that `other` filled: the inference half, run
    in another process (`converted_inference`)."""
    filled = {f.name: getattr(other, f.name) for f in dataclasses.fields(other)
              if f.name != "spec" and getattr(other, f.name)}
    return dataclasses.replace(self, **filled)


def _var_name(v: tf.Variable) -> str:
  return legacy_format.node_name(v.name)


class ConvertedModel:
  """The loaded converted model, run for `spec` on the inputs of `facts`."""

  def __init__(self, model: Any, spec: Spec, facts: ModuleFacts,
               metadata: Optional[Mapping[str, Any]] = None):
    self.model = model
    self.spec = spec
    self.facts = facts
    self.metadata = dict(metadata if metadata is not None
                         else verify_spec.read_metadata(model))
    self.variables = {_var_name(v): v for v in model.variables}
    self.trainable = {_var_name(v): v for v in model.trainable_variables}
    self._saved: Optional[dict[str, np.ndarray]] = None

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
    """`actual` with the inference fields: what no training step changes."""
    outputs, warnings = self.signature_outputs()
    return dataclasses.replace(
        actual, signature_outputs=outputs, call_outputs=self.call_outputs(),
        regularization=self.regularization(),
        warnings=list(actual.warnings) + warnings)

  def signature_outputs(self) -> tuple[dict[str, dict[str, dict[str, np.ndarray]]],
                                       list[str]]:
    """Every serving signature (`verify_spec.signature_pairs`):
    `serving_default` on every batch tag, the others (the same function,
    other outputs selected) on one image at the smallest resolution; and a
    warning for each run that failed."""
    outputs: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    warnings = []
    pairs = verify_spec.signature_pairs(
        self.facts, list(self.model.signatures),
        self.metadata.get("source_signature"))
    for name, module_name in pairs:
      sig = self.facts.image_signatures[module_name]
      fn = self.model.signatures[name]
      tags = verify_spec.batch_tags(sig.sizes)
      if name != "serving_default":  # One image, at the smallest resolution.
        tags = [min(tags, key=lambda t: t.batch * t.size[0] * t.size[1])]
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

  def call_outputs(self) -> dict[str, np.ndarray]:
    """`__call__` in inference mode on every batch tag (none if the
    metadata names no output of the module: 'metadata/source' fails)."""
    return {tag.name: np.asarray(self.model(tf.constant(tag.images(self.spec.seed))))
            for tag in verify_spec.batch_tags(self.facts.call_sizes)}

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

    `random_values` (step -> random op -> value, from `Expected.steps`)
    are fed to the steps that have them; None if not known yet: every
    step runs as saved, and `feed_random_ops` runs again those that needed
    feeding.
    """
    steps = {prefix: self.train_step(prefix, values, (random_values or {}).get(prefix))
             for prefix, values in verify_spec.train_steps(self.facts)}
    return dataclasses.replace(actual, steps=steps)

  def feed_random_ops(self, actual: Actual,
                      expected: verify_expected.Expected) -> Actual:
    """`actual`, with the steps that ran before the reference's random
    values were known run again with them fed."""
    steps = dict(actual.steps)
    for prefix, values in verify_spec.train_steps(self.facts):
      ref = expected.steps.get(prefix)
      if (ref is not None and not ref.error and ref.random_values and
          prefix in steps and steps[prefix].random_ops is None):
        steps[prefix] = self.train_step(prefix, values, ref.random_values)
    return dataclasses.replace(actual, steps=steps)

  def train_step(self, prefix: str, hparam_values: Mapping[str, float],
                 random_values: Optional[Mapping[str, np.ndarray]] = None
                 ) -> ActualStep:
    """One training step (`random_values`, if any, fed to its random ops);
    the gradients of `sum(output * probe)` for the default step only."""
    x = verify_spec.train_images(self.spec, self.facts)
    call: Callable = lambda images, **kw: self.model(images, training=True, **kw)
    match = None
    if random_values:
      try:
        call = verify_random_ops.FedTrainFunction(
            verify_random_ops.training_function(self.model, list(hparam_values)),
            random_values, x.shape)
      except _RUN_ERRORS as e:
        return ActualStep(error=verify_spec.error_text(e))
      match = call.match
      if not match.ok:
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


def converted_side(converted: ConvertedModel, *, inference: bool = True,
                   random_values: Optional[RandomValues] = None) -> Actual:
  """Everything the checks need from the converted model (but the
  inference half if `inference` is False: another process runs it)."""
  actual = converted.describe()
  if inference:
    actual = converted.inference(actual)
  return converted.training(actual, random_values)


def converted_inference(old_path: str, new_path: str, spec: Spec,
                        facts: Optional[ModuleFacts] = None) -> Actual:
  """The converted model's inference half for `spec`, alone: what `verify`
  hands to the reference child once that has finished. Only the fields
  that `ConvertedModel.inference` fills are set (the variables are not
  sent back). `facts` saves parsing the module again."""
  with verify_spec.run_conditions(spec.optimize_graphs):
    if facts is None:
      facts = verify_spec.module_facts(legacy_format.read_module(old_path), spec)
    converted = ConvertedModel(tf.saved_model.load(new_path), spec, facts)
    return converted.inference(Actual(spec=spec))
