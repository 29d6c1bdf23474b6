"""VERIFY: the parity checks, small functions over what both sides computed.

Each check is a function `(spec, expected, actual, facts, tolerance)` (a
per-step check also takes `step`, the training step's prefix) that yields
`CheckResult`s made with `migrate.compare`, and nothing when it does not
apply. It runs nothing: `expected` (`verify_expected.Expected`) and `actual`
(`verify_actual.Actual`) hold what the two sides computed, `facts`
(`verify_spec.ModuleFacts`) what the module is.

`CHECKS` lists them in report order, each with the name its results carry
and its entry in `migrate.tolerances` (resolved there for the module, e.g.
its fake-quant variant, by `run_checks`). Consecutive per-step checks run
step by step: all of the default step's, then the next step's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import numpy as np

from migrate import build as build_lib
from migrate import consumers as consumers_lib
from migrate import errors
from migrate import plan as plan_lib
from migrate import tolerances as tolerances_lib
from migrate import verify_spec
from migrate.compare import CheckResult, check, compare, compare_many, top_k
from migrate.verify_actual import Actual, ActualStep
from migrate.verify_expected import Expected, ExpectedStep
from migrate.verify_spec import ModuleFacts, Spec

Results = Iterator[CheckResult]


@dataclasses.dataclass(frozen=True)
class Check:
  """One entry of `CHECKS`."""

  name: str  # The name of its results; '<step>' is a training step's prefix.
  fn: Callable[..., Results]
  tolerance: Optional[str] = None  # Its entry in migrate/tolerances.py.
  per_step: bool = False  # Runs once per training step.


def _diff_names(actual: set[str], expected: set[str]) -> str:
  extra, missing = sorted(actual - expected), sorted(expected - actual)
  parts = []
  if extra:
    parts.append(f"unexpected: {extra[:3]}")
  if missing:
    parts.append(f"missing: {missing[:3]}")
  return (" (" + "; ".join(parts) + ")") if parts else ""


# -- the converted model's metadata --------------------------------------------------

def metadata_source(spec, expected, actual, facts, tol) -> Results:
  sig = actual.metadata.get("source_signature")
  key = actual.metadata.get("source_output_key")
  ok = sig in facts.signatures and key in facts.signatures[sig]
  yield check("metadata/source", ok,
              f"metadata names output '{sig}/{key}'" + ("" if ok else
              f", which the module does not have (signatures: "
              f"{', '.join(sorted(facts.signatures))})"))


def metadata_source_sha256(spec, expected, actual, facts, tol) -> Results:
  sha = actual.metadata.get("source_sha256")
  yield check("metadata/source_sha256", sha == facts.saved_model_sha256,
              f"converted from saved_model.pb {sha}, the module's is "
              f"{facts.saved_model_sha256}")


def metadata_requested_output(spec, expected, actual, facts, tol) -> Results:
  wanted_sig, wanted_key = facts.requested
  if wanted_sig is None and wanted_key is None:
    return
  sig = actual.metadata.get("source_signature")
  key = actual.metadata.get("source_output_key")
  same = ((wanted_sig is None or wanted_sig == sig) and
          (wanted_key is None or wanted_key == key))
  yield check("metadata/requested_output", same,
              f"asked for '{wanted_sig}/{wanted_key}', the model exposes "
              f"'{sig}/{key}'")


def metadata_has_train_graph(spec, expected, actual, facts, tol) -> Results:
  has_train = bool(actual.metadata.get("has_train_graph"))
  yield check("metadata/has_train_graph", has_train == facts.has_train_graph,
              f"metadata says {has_train}, the module "
              f"{'has' if facts.has_train_graph else 'has no'} train graph")


# -- variables -------------------------------------------------------------------------

class _Only(Mapping[str, Any]):
  """The entries `names` of `mapping`, each looked up when asked for (no copy:
  `Expected.variables` reads each value from the checkpoint)."""

  def __init__(self, mapping: Mapping[str, Any], names: Iterable[str]):
    self._mapping, self._names = mapping, list(dict.fromkeys(names))
    self._set = frozenset(self._names)

  def __getitem__(self, name: str) -> Any:
    if name not in self._set:
      raise KeyError(name)
    return self._mapping[name]

  def __contains__(self, name: object) -> bool:
    return name in self._set

  def __iter__(self) -> Iterator[str]:
    return iter(self._names)

  def __len__(self) -> int:
    return len(self._names)


def variable_values(spec, expected, actual, facts, tol) -> Results:
  # A view: each value is read from the checkpoint when compared.
  wanted = _Only(expected.variables, [n for n in facts.variables
                                      if n in expected.variables])
  yield compare_many("variables/values", actual.variables, wanted, tol)


def trainable_variables(spec, expected, actual, facts, tol) -> Results:
  # `trainable_variables` holds what `__call__`'s training computation uses:
  # the module's trainable variables that its gradient reaches (the
  # reference's `tf.gradients` leaves out the ones it does not reach).
  trainable = set(facts.trainable)
  step = expected.steps.get("train")
  if step is not None and step.gradients is not None:
    trainable &= set(step.gradients)
  yield check("variables/trainable", set(actual.trainable) == trainable,
              f"{len(actual.trainable)} trainable variables, the module has "
              f"{len(trainable)} that the output's gradient reaches" +
              _diff_names(set(actual.trainable), trainable))


# -- serving signatures ----------------------------------------------------------------

def signature_names(spec, expected, actual, facts, tol) -> Results:
  wanted = set(facts.signatures) | {"serving_default"}
  yield check("signatures/names", wanted <= set(actual.signatures),
              f"saved signatures {sorted(actual.signatures)}, expected "
              f"{sorted(wanted)}")


def signature_outputs(spec, expected, actual, facts, tol) -> Results:
  """Every output key of every serving signature, on every tag it ran."""
  pairs = verify_spec.signature_pairs(facts, actual.signatures,
                                      actual.metadata.get("source_signature"))
  for name, module_name in pairs:
    tensors = facts.image_signatures[module_name].outputs
    got: dict[str, dict[str, np.ndarray]] = {}
    wanted: dict[str, dict[str, np.ndarray]] = {}
    for tag, outputs in actual.signature_outputs.get(name, {}).items():
      for key, tensor in tensors.items():
        wanted.setdefault(key, {})[tag] = expected.outputs[tag][tensor]
      for key, value in outputs.items():
        got.setdefault(key, {})[tag] = value
    for key in sorted(set(wanted) | set(got)):
      yield compare_many(f"signature/{name}/{key}", got.get(key, {}),
                         wanted.get(key, {}), tol)


# -- __call__ in inference mode --------------------------------------------------------

def _call_pairs(spec: Spec, expected: Expected, actual: Actual, facts: ModuleFacts
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(__call__'s output, the module's) per batch tag."""
  tensor = facts.signatures[spec.signature][spec.output_key]
  tags = verify_spec.batch_tags(facts.call_sizes)
  return ({t.name: actual.call_outputs[t.name] for t in tags},
          {t.name: expected.outputs[t.name][tensor] for t in tags})


def call_inference(spec, expected, actual, facts, tol) -> Results:
  if spec.signature:
    got, wanted = _call_pairs(spec, expected, actual, facts)
    yield compare_many("call/inference", got, wanted, tol)


def call_serve_endpoint(spec, expected, actual, facts, tol) -> Results:
  """The `serve` endpoint, which Keras 3's `TFSMLayer(DST)` calls, against
  the module's output behind `__call__` (the Keras layer itself runs with
  `--consumers=all`: 'consumer/keras3_tfsm_layer')."""
  if not spec.signature:
    return
  if actual.serve_errors:
    tag, error = sorted(actual.serve_errors.items())[0]
    yield check("call/serve_endpoint", False,
                f"the '{build_lib.SERVE_ENDPOINT}' endpoint failed on {tag}: {error}")
    return
  _, wanted = _call_pairs(spec, expected, actual, facts)
  yield compare_many("call/serve_endpoint", actual.serve_outputs, wanted, tol)


def _call_widths(spec: Spec, actual: Actual, facts: ModuleFacts
                 ) -> tuple[set[int], list[str]]:
  """(output widths, outputs off the image API's float32 [batch, width])."""
  widths, conventions = set(), []
  for tag in verify_spec.batch_tags(facts.call_sizes):
    out = actual.call_outputs[tag.name]
    if out.dtype != np.float32 or out.ndim != 2:
      conventions.append(f"{tag.name}: {out.dtype.name} of shape {list(out.shape)}")
    elif out.shape[0] != tag.batch:
      conventions.append(f"{tag.name}: batch {out.shape[0]} for {tag.batch} images")
    else:
      widths.add(int(out.shape[1]))
  return widths, conventions


def call_image_api(spec, expected, actual, facts, tol) -> Results:
  if spec.signature:
    _, conventions = _call_widths(spec, actual, facts)
    yield check("call/image_api", not conventions,
                "float32 [batch, width] for every input" if not conventions else
                "expected a float32 [batch, width] output, found " +
                "; ".join(conventions))


def call_output_width(spec, expected, actual, facts, tol) -> Results:
  if spec.signature:
    widths, _ = _call_widths(spec, actual, facts)
    declared = int(actual.metadata.get("num_features") or 0) or int(
        actual.metadata.get("num_classes") or 0)
    ok = len(widths) == 1 and (not declared or widths == {declared})
    yield check("call/output_width", ok,
                f"output widths {sorted(widths)} over input sizes "
                f"{list(facts.call_sizes)}; metadata says {declared or 'unknown'}")


def _call_top_k(k: int) -> Callable[..., Results]:
  def call_top_k(spec, expected, actual, facts, tol) -> Results:
    """Top-k classes of a classifier, where both sides' outputs have one shape."""
    kind = actual.metadata.get("output_kind")
    if not spec.signature or kind != plan_lib.CLASSIFICATION:
      return
    got, wanted = _call_pairs(spec, expected, actual, facts)
    if all(got[t].shape == wanted[t].shape for t in wanted):
      yield top_k(f"call/top{k}", np.concatenate([got[t] for t in sorted(wanted)]),
                  np.concatenate([wanted[t] for t in sorted(wanted)]), k, tol)
  return call_top_k


# -- the training steps ----------------------------------------------------------------

def _training_checked(spec: Spec, expected: Expected, facts: ModuleFacts) -> bool:
  """Whether the training steps are compared: the spec names an output whose
  signature the train graph has, and the output dropout that the metadata
  says was removed is the train graph's."""
  removed = spec.output_dropout_removed
  return bool(spec.signature and facts.train_signature and
              (not removed or expected.output_dropout == removed))


def train_signature(spec, expected, actual, facts, tol) -> Results:
  if spec.signature and not facts.train_signature:
    yield check("train/signature", False,
                f"signature '{spec.signature}' is missing from the train graph")


def train_output_dropout(spec, expected, actual, facts, tol) -> Results:
  removed = spec.output_dropout_removed
  if spec.signature and facts.train_signature and removed:
    yield check("train/output_dropout", expected.output_dropout == removed,
                f"metadata says the output dropout '{removed}' was removed; the "
                f"train graph's output dropout is '{expected.output_dropout or None}'")


def train_hparams(spec, expected, actual, facts, tol) -> Results:
  missing = sorted(set(spec.hparams) - set(facts.hparam_tensors))
  if _training_checked(spec, expected, facts) and missing:
    yield check("train/hparams", False,
                f"hyperparameters {missing} are not inputs of the module's graph")


def _step(expected: Expected, actual: Actual, step: str
          ) -> tuple[ExpectedStep, ActualStep]:
  return (expected.steps.get(step, ExpectedStep(error="not run")),
          actual.steps.get(step, ActualStep(error="not run")))


def _fed(act: ActualStep) -> bool:
  """Whether the step's random ops, if any, were all fed."""
  return act.random_ops is None or act.random_ops.ok


def _step_ran(expected: Expected, actual: Actual, step: str) -> bool:
  """Whether both sides ran the step (with their random ops fed alike)."""
  ref, act = _step(expected, actual, step)
  return _fed(act) and not ref.error and not act.error


def step_random_ops(spec, expected, actual, facts, tol, step) -> Results:
  _, act = _step(expected, actual, step)
  if act.random_ops is not None:
    m = act.random_ops
    yield check(f"{step}/random_ops", m.ok,
                f"{len(m.matched)} random ops fed on both sides" if m.ok else
                f"random ops of the module not found in the converted function: "
                f"{m.unmatched_reference[:3]}; random ops of the converted "
                f"function without a counterpart: {m.unmatched_converted[:3]}")


def step_run(spec, expected, actual, facts, tol, step) -> Results:
  ref, act = _step(expected, actual, step)
  if _fed(act) and (ref.error or act.error):
    where = "the module's" if ref.error else "the converted model's"
    yield check(f"{step}/run", False,
                f"{where} training step failed: {ref.error or act.error}")


def step_output(spec, expected, actual, facts, tol, step) -> Results:
  if _step_ran(expected, actual, step):
    ref, act = _step(expected, actual, step)
    yield compare(f"{step}/output", act.output, ref.output, tol)


def step_moving_averages(spec, expected, actual, facts, tol, step) -> Results:
  """Every variable either side's step changed (the others are equal by
  'variables/values')."""
  if _step_ran(expected, actual, step):
    ref, act = _step(expected, actual, step)
    moved = set(ref.changed) | set(act.changed)
    names = set(ref.variable_names)
    yield compare_many(
        f"{step}/moving_averages",
        {n: act.changed.get(n, actual.variables[n]) for n in moved
         if n in actual.variables},
        {n: ref.changed[n] if n in ref.changed else expected.variables.get(n)
         for n in moved if n in names}, tol)


def step_updated_variables(spec, expected, actual, facts, tol, step) -> Results:
  if _step_ran(expected, actual, step):
    ref, act = _step(expected, actual, step)
    changed_new, changed_ref = sorted(act.changed), sorted(ref.changed)
    yield check(f"{step}/updated_variables", changed_ref == changed_new,
                f"{len(changed_new)} variables updated, the module updates "
                f"{len(changed_ref)}" +
                _diff_names(set(changed_new), set(changed_ref)))


def _gradients(expected: Expected, actual: Actual, step: str
               ) -> Optional[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
  """(converted, module) gradient per trainable variable, if both sides
  computed them on outputs of one shape (else the output check failed)."""
  if not _step_ran(expected, actual, step):
    return None
  ref, act = _step(expected, actual, step)
  if ref.gradients is None or act.gradients is None:
    return None
  if act.output.shape != ref.output.shape:
    return None
  # A variable the output does not depend on has no gradient in the TF1
  # Session (None) but may get an exact zero from the TF2 function (whose
  # other outputs use it): both mean zero, so both sides fill in zeros.
  got, wanted = {}, {}
  for n in actual.trainable:
    zeros = np.zeros_like(actual.variables[n])
    got[n] = act.gradients.get(n, zeros)
    wanted[n] = ref.gradients.get(n, zeros)
  for n in ref.gradients:
    wanted.setdefault(n, ref.gradients[n])  # Unmatched: fails below.
  return got, wanted


def step_gradients(spec, expected, actual, facts, tol, step) -> Results:
  """Gradients of `sum(output * probe)`; atol relative to the largest."""
  pair = _gradients(expected, actual, step)
  if pair is not None:
    got, wanted = pair
    ref, _ = _step(expected, actual, step)
    scale = max([float(np.abs(g).max()) for g in ref.gradients.values()] + [1e-30])
    yield compare_many(f"{step}/gradients", got, wanted, tol, scale=scale)


def step_gradient_norms(spec, expected, actual, facts, tol, step) -> Results:
  """Their L2 norms; atol relative to the largest."""
  pair = _gradients(expected, actual, step)
  if pair is not None:
    got, wanted = pair
    norms = {n: np.float64(np.linalg.norm(g.astype(np.float64)))
             for n, g in got.items()}
    ref_norms = {n: np.float64(np.linalg.norm(np.asarray(g, np.float64)))
                 for n, g in wanted.items()}
    yield compare_many(f"{step}/gradient_norms", norms, ref_norms, tol,
                       scale=max(list(ref_norms.values()) + [1e-30]))


# -- regularization losses -------------------------------------------------------------

def regularization_count(spec, expected, actual, facts, tol) -> Results:
  ref_values, _ = expected.regularization
  yield check("regularization/count", len(actual.regularization) == len(ref_values),
              f"{len(actual.regularization)} regularization losses, the module "
              f"has {len(ref_values)}")


def regularization_total(spec, expected, actual, facts, tol) -> Results:
  _, ref_total = expected.regularization
  yield compare("regularization/total", np.float32(sum(actual.regularization)),
                np.float32(ref_total), tol)


def regularization_values(spec, expected, actual, facts, tol) -> Results:
  ref_values, _ = expected.regularization
  if len(actual.regularization) == len(ref_values):
    yield compare("regularization/values",
                  np.sort(np.asarray(actual.regularization, np.float32)),
                  np.sort(np.asarray(ref_values, np.float32)), tol)


# -- the consumers: the saved model as each of its users loads it ----------------------
#
# One row per run of `migrate.consumers` that `actual.consumers` holds (none
# for a consumer the selection skipped): its outputs against the module's on
# the same inputs, or why it cannot take the model (a passing row: "not
# convertible to TFLite: op X"), or how it failed.

def _consumer(actual: Actual, consumer: str, name: str
              ) -> tuple[Optional[consumers_lib.ConsumerResult], Optional[CheckResult]]:
  """(the consumer's result if it ran the model, else None; the row it
  gets when it did not run it, else None)."""
  result = actual.consumers.get(consumer)
  if result is None:
    return None, None
  if result.not_applicable:
    return None, check(name, True, result.not_applicable)
  if result.error:
    return None, check(name, False, result.error)
  return result, None


def _consumer_signatures(consumer: str, serving_default_only: bool,
                         scale_each: bool = True) -> Callable[..., Results]:
  def consumer_signatures(spec, expected, actual, facts, tol) -> Results:
    """The serving signatures (only `serving_default`, or every one) as the
    consumer ran them, on the inputs of 'signature/...', against the
    module's outputs: every output key of every (signature, input), each
    within atol of its own largest value (`scale_each`) or absolutely."""
    name = f"consumer/{consumer}"
    result, row = _consumer(actual, consumer, name)
    if row is not None:
      yield row
    if result is None:
      return
    got, wanted = {}, {}
    runs = verify_spec.signature_runs(facts, actual.signatures,
                                      actual.metadata.get("source_signature"))
    for saved, module_name, tags in runs:
      if serving_default_only and saved != "serving_default":
        continue
      tensors = facts.image_signatures[module_name].outputs
      for tag in tags:
        for key, tensor in tensors.items():
          wanted[f"{saved}/{key}/{tag.name}"] = expected.outputs[tag.name][tensor]
        for key, value in result.outputs.get((saved, tag.name), {}).items():
          got[f"{saved}/{key}/{tag.name}"] = value
    yield compare_many(name, got, wanted, tol, scale_each=scale_each)
  return consumer_signatures


def _consumer_call(consumer: str) -> Callable[..., Results]:
  def consumer_call(spec, expected, actual, facts, tol) -> Results:
    """A Keras layer's output in a Sequential model, against the output of
    the module behind `__call__`, on every batch tag of 'call/inference'."""
    name = f"consumer/{consumer}"
    result, row = _consumer(actual, consumer, name)
    if row is not None:
      yield row
    if result is None or not spec.signature:
      return
    got = {tag: out[consumers_lib.CALL_OUTPUT]
           for (_, tag), out in result.outputs.items()
           if consumers_lib.CALL_OUTPUT in out}
    _, wanted = _call_pairs(spec, expected, actual, facts)
    yield compare_many(name, got, wanted, tol, scale_each=True)
  return consumer_call


def _fit_moved_and_finite(fit: consumers_lib.FitStep, names: set[str],
                          ref: ExpectedStep, expected: Expected) -> list[str]:
  """What is wrong with the variables `names` after the fit step, whose
  update depends on a random op: each must be finite, and changed if and
  only if the module's step changed it."""
  problems = []
  for n in sorted(names):
    after = fit.non_trainable_after.get(n)
    if after is None:
      problems.append(f"'{n}' is not among {len(fit.non_trainable_after)} "
                      f"non-trainable variables of the layer")
      continue
    moved = not np.array_equal(after, expected.variables[n])
    if not np.isfinite(after).all():
      problems.append(f"'{n}' is not finite after the fit step")
    elif moved != (n in ref.changed):
      problems.append(f"the fit step {'changed' if moved else 'left'} '{n}', "
                      f"the module's step {'leaves' if moved else 'changes'} it")
  return problems


def _consumer_fit(consumer: str) -> Callable[..., Results]:
  def consumer_fit(spec, expected, actual, facts, tol) -> Results:
    """One `fit` step of a Keras layer, on the training step's images:
    every non-trainable variable after it (the batch-norm moving averages)
    against the module's training step ('train/moving_averages'), except
    those whose update depends on a random op (`facts.random_updates`: a
    fit step draws its own random values), which must be finite and moved
    if the module's step moves them; the layer trains `trainable_variables`
    and moves its weights, and Keras finds a gradient for each."""
    run = f"{consumer}/{consumers_lib.FIT}"
    name = f"consumer/{run}"
    if run not in actual.consumer_runs or not _training_checked(
        spec, expected, facts):
      return  # Not asked for; or 'train/...' says why there is no step.
    result, row = _consumer(actual, consumer, name)
    if row is not None:
      yield row
    if result is None:
      return
    fit, ref = result.fit, expected.steps.get("train", ExpectedStep(error="not run"))
    if fit is None:
      yield check(name, False, f"{consumer} ran no fit step")
      return
    if ref.error:
      yield check(name, False, f"nothing to compare with: the module's "
                  f"training step failed: {ref.error}")
      return
    names = set(facts.variables) - set(fit.trainable)
    exact, random = names - facts.random_updates, names & facts.random_updates
    row = compare_many(
        name, {n: v for n, v in fit.non_trainable_after.items() if n in exact},
        {n: ref.changed[n] if n in ref.changed else expected.variables[n]
         for n in exact}, tol)
    problems = ([row.detail] if not row.passed else []) + _fit_moved_and_finite(
        fit, random, ref, expected)
    if fit.no_gradient_warnings:
      problems.append(f"Keras warned: {fit.no_gradient_warnings[0]}")
    if sorted(fit.trainable) != sorted(actual.trainable):
      problems.append(f"{consumer} trains {len(fit.trainable)} variables, "
                      f"trainable_variables holds {len(actual.trainable)}" +
                      _diff_names(set(fit.trainable), set(actual.trainable)))
    if not fit.moved:
      problems.append("the fit step changed no weight")
    if problems:
      row.passed, row.detail = False, "; ".join(problems)
    else:
      if random:
        row.detail += (f"; {len(random)} updated after random ops: moved and "
                       f"finite")
      row.detail += f"; {len(fit.moved)} of {len(fit.trainable)} weights moved"
    yield row
  return consumer_fit


# -- the list --------------------------------------------------------------------------

CHECKS: tuple[Check, ...] = (
    Check("metadata/source", metadata_source),
    Check("metadata/source_sha256", metadata_source_sha256),
    Check("metadata/requested_output", metadata_requested_output),
    Check("metadata/has_train_graph", metadata_has_train_graph),
    Check("variables/values", variable_values, "variables"),
    Check("variables/trainable", trainable_variables),
    Check("signatures/names", signature_names),
    Check("signature/<signature>/<output key>", signature_outputs, "inference"),
    Check("call/inference", call_inference, "inference"),
    Check("call/serve_endpoint", call_serve_endpoint, "inference"),
    Check("call/image_api", call_image_api),
    Check("call/output_width", call_output_width),
    Check("call/top1", _call_top_k(1), "top_k"),
    Check("call/top5", _call_top_k(5), "top_k"),
    Check("train/signature", train_signature),
    Check("train/output_dropout", train_output_dropout),
    Check("train/hparams", train_hparams),
    Check("<step>/random_ops", step_random_ops, per_step=True),
    Check("<step>/run", step_run, per_step=True),
    Check("<step>/output", step_output, "training_output", per_step=True),
    Check("<step>/moving_averages", step_moving_averages, "moving_averages",
          per_step=True),
    Check("<step>/updated_variables", step_updated_variables, per_step=True),
    Check("<step>/gradients", step_gradients, "gradients", per_step=True),
    Check("<step>/gradient_norms", step_gradient_norms, "gradient_norms",
          per_step=True),
    Check("regularization/count", regularization_count),
    Check("regularization/total", regularization_total, "regularization"),
    Check("regularization/values", regularization_values, "regularization"),
    Check("consumer/tf1_loader", _consumer_signatures("tf1_loader", False),
          "consumer_loader"),
    Check("consumer/c_api_loader", _consumer_signatures("c_api_loader", True),
          "consumer_loader"),
    Check("consumer/tflite", _consumer_signatures("tflite", True, scale_each=False),
          "consumer_tflite"),
    Check("consumer/keras3_tfsm_layer", _consumer_call("keras3_tfsm_layer"),
          "consumer_loader"),
    Check("consumer/keras3_tfsm_layer/fit", _consumer_fit("keras3_tfsm_layer"),
          "moving_averages"),
    Check("consumer/tf_keras_hub_layer", _consumer_call("tf_keras_hub_layer"),
          "consumer_loader"),
    Check("consumer/tf_keras_hub_layer/fit", _consumer_fit("tf_keras_hub_layer"),
          "moving_averages"),
)


def _sections(checks: tuple[Check, ...]) -> list[list[Check]]:
  """The checks in order, each run of consecutive per-step checks as one."""
  sections: list[list[Check]] = []
  for c in checks:
    if c.per_step and sections and sections[-1][-1].per_step:
      sections[-1].append(c)
    else:
      sections.append([c])
  return sections


def run_checks(spec: Spec, expected: Expected, actual: Actual,
               facts: ModuleFacts, checks: tuple[Check, ...] = CHECKS
               ) -> list[CheckResult]:
  """Every check's results, in the order of `checks`; the per-step ones for
  each training step if the training steps are compared at all."""
  results: list[CheckResult] = []
  steps = ([prefix for prefix, _ in verify_spec.train_steps(facts)]
           if _training_checked(spec, expected, facts) else [])
  for section in _sections(checks):
    for step in (steps if section[0].per_step else [None]):
      for c in section:
        tol = (tolerances_lib.resolve(c.tolerance, fake_quant=facts.fake_quant)
               if c.tolerance else None)
        args = (spec, expected, actual, facts, tol) + ((step,) if c.per_step else ())
        results.extend(_run_check(c, args, step))
  return results


def _run_check(c: Check, args: tuple, step: Optional[str]) -> list[CheckResult]:
  """The results of one check; one that raises becomes a failed row (after
  the results it gave) naming the error, not a crash of the verification."""
  results: list[CheckResult] = []
  try:
    results.extend(c.fn(*args))
  except Exception as e:  # pylint: disable=broad-except  # A defect of the check.
    name = c.name.replace("<step>", step) if step else c.name
    results.append(check(name, False, f"the check raised "
                         f"{type(e).__name__}: {errors.first_line(e)}"))
  return results

