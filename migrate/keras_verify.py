"""VERIFY (`.keras` output): the Keras model on every installed backend vs the TF1 module.

The TF1 side is `verify.reference_side` (the module in a graph-mode Session,
for a `verify.Spec`), unchanged. The Keras side is `keras_side.produce`, run
for each installed backend (TensorFlow always; JAX and PyTorch when present)
in its own spawned process (`isolation`), since Keras fixes its backend when
it is imported. Both return plain data; the checks here compare them with
the one helper `compare` and the one table `tolerances`, and every check's
name ends in `[backend]`: the report has a row per backend.

What is compared, per backend:
- the file loads with `keras.saving.load_model(path, safe_mode=True)` and no
  custom objects, and has the plan's layers with the plan's configuration;
- the weights, bit for bit against the module's checkpoint, and which are
  trainable;
- the output in inference at every batch size and resolution the reference
  ran (and top-1/top-5 for classifiers);
- one training call (`training=True`) on the reference's training images:
  its output, the variables it changed and their values (moving averages),
  and the gradients of `sum(output * probe)`; dropout gets the module's
  masks (`keras_side`), and Keras's Dropout is checked on its own;
- `model.losses` against the regularization losses: their count, each (by
  the variable it penalizes) and their total.

One known difference is taken out of the moving-variance comparison:
Keras 3's BatchNormalization updates the moving variance with the biased
batch variance, TF's fused batch norm with the unbiased one (Bessel's
correction, n/(n-1) for n values per channel). After one step they differ by
exactly `(new - momentum * old) / n`; the check compares against the TF1
value less that term, and the report's warning says how large it was.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from migrate import compare as compare_lib
from migrate import errors
from migrate import isolation
from migrate import keras_format
from migrate import keras_side
from migrate import keras_translate
from migrate import legacy_format
from migrate import plan as plan_lib
from migrate import reference as reference_lib
from migrate import verify as verify_lib

TRAIN_BATCH = 2  # As verify's training step.
METHOD_FED = (
    "fed: the module's dropout masks (drawn in the TF1 Session) multiply the "
    "inputs of the Keras model's Dropout layers in a twin of the model that "
    "shares its layers and weights; Keras's own Dropout is checked for its "
    "values, noise shape and inference identity")
BESSEL_WARNING = (
    "moving variances: Keras 3's BatchNormalization updates them with the "
    "biased batch variance, TF's fused batch norm with the unbiased one "
    "(n/(n-1)); after one training call the Keras values differ from TF1's "
    "by up to {rel:.2e} relative ({abs:.2e} absolute) on {backend}; "
    "train/moving_averages compares them with that term taken out")


def spec_for_keras(module: legacy_format.LegacyModule,
                   plan: plan_lib.MigrationPlan, seed: int = 0) -> verify_lib.Spec:
  """The reference spec of a `.keras` conversion: as a SavedModel's, but
  without hyperparameter steps (a Keras layer has a fixed momentum)."""
  return dataclasses.replace(verify_lib.spec_for_plan(module, plan, seed=seed),
                             hparams=())


def _parse_tag(tag: str) -> tuple[int, int, int]:
  batch, size = tag[1:].split("_")
  h, w = size.split("x")
  return int(batch), int(h), int(w)


def _images(seed: int, purpose: int, batch: int, size: Sequence[int]) -> np.ndarray:
  """The images verify feeds the reference for a batch tag (as verify._images)."""
  rng = np.random.default_rng([seed, purpose, batch, size[0], size[1]])
  return rng.uniform(0.0, 1.0, (batch, size[0], size[1], 3)).astype(np.float32)


def keras_request(kplan: keras_translate.KerasPlan, expected: verify_lib.Expected
                  ) -> dict[str, Any]:
  """What `keras_side.produce` runs, as plain data (no TensorFlow objects)."""
  seed = expected.spec.seed
  images = {}
  for tag in expected.outputs:
    batch, h, w = _parse_tag(tag)
    images[tag] = _images(seed, 0, batch, (h, w))
  request: dict[str, Any] = {
      "layers": [dataclasses.asdict(s) for s in kplan.layers],
      "output": kplan.output,
      "variables": {k: list(v) for k, v in kplan.variables.items()},
      "images": images, "train_images": None, "random_values": {},
      "probe": None}
  step = expected.steps.get("train")
  if step is not None and not step.error and step.output is not None:
    sizes = {_parse_tag(t)[1:] for t in expected.outputs}
    size = min(sizes, key=lambda s: s[0] * s[1])
    request["train_images"] = _images(seed, 1, TRAIN_BATCH, size)
    request["random_values"] = dict(step.random_values)
    request["probe"] = reference_lib.probe_weights(seed, step.output.shape)
  return request


@dataclasses.dataclass
class BackendRun:
  """One backend's `keras_side.produce` result, or why it did not run."""

  backend: str
  result: Optional[dict[str, Any]] = None
  error: str = ""


_ENVIRONMENT = threading.Lock()


def start_with_backend(backend: str, fn: str, *args: Any, what: str
                       ) -> isolation.IsolatedCall:
  """`isolation.start_isolated(fn, *args)` in a child whose KERAS_BACKEND is
  `backend` from its start: importing TensorFlow imports Keras, which fixes
  its backend then (and the child may import TensorFlow before `fn` runs,
  e.g. with its parent's main module)."""
  with _ENVIRONMENT:
    saved = os.environ.get("KERAS_BACKEND")
    os.environ["KERAS_BACKEND"] = backend
    try:
      return isolation.start_isolated(fn, *args, what=what)
    finally:
      if saved is None:
        del os.environ["KERAS_BACKEND"]
      else:
        os.environ["KERAS_BACKEND"] = saved


def run_backends(new_path: str, request: Mapping[str, Any],
                 backends: Sequence[str], *, jobs: Optional[int] = None
                 ) -> list[BackendRun]:
  """`keras_side.produce` for each backend, each in its own process, `jobs`
  at a time (default: the usable CPUs)."""
  jobs = jobs or isolation.usable_cpus()
  runs = {b: BackendRun(b) for b in backends}
  pending = list(backends)
  running: dict[str, isolation.IsolatedCall] = {}
  try:
    while pending or running:
      while pending and len(running) < jobs:
        backend = pending.pop(0)
        running[backend] = start_with_backend(
            backend, "migrate.keras_side:produce", backend, new_path, request,
            what=f"{new_path} (Keras, backend {backend})")
      backend = next((b for b, c in running.items() if c.ready()),
                     next(iter(running)))
      call = running.pop(backend)
      try:
        runs[backend].result = call.result()
      except errors.MigrationError as e:
        runs[backend].error = str(e).splitlines()[0][:400]
      finally:
        call.cancel()
  finally:
    for call in running.values():
      call.cancel()
  return [runs[b] for b in backends]


def _expected_trainable(kplan: keras_translate.KerasPlan,
                        module_trainable: set[str]) -> set[str]:
  by_name = {s.name: s for s in kplan.layers}
  return {var for var, (layer, weight) in kplan.variables.items()
          if var in module_trainable and by_name[layer].trainable
          and weight in ("kernel", "bias", "gamma", "beta")}


def moving_expectation(kplan: keras_translate.KerasPlan, changed_ref: Mapping[str, np.ndarray],
                        checkpoint: Mapping[str, np.ndarray], counts: Mapping[str, int]
                        ) -> dict[str, np.ndarray]:
  """The TF1 moving averages after the step, with Bessel's correction taken
  out of the moving variances (see the module docstring)."""
  expected = dict(changed_ref)
  by_name = {s.name: s for s in kplan.layers}
  for var, value in changed_ref.items():
    layer, weight = kplan.variables.get(var, ("", ""))
    if weight != "moving_variance" or layer not in counts:
      continue
    n = counts[layer]
    if n < 2:
      continue
    m = float(by_name[layer].config["momentum"])
    new = value.astype(np.float64)
    old = checkpoint[var].astype(np.float64)
    expected[var] = (new - (new - m * old) / n).astype(np.float32)
  return expected


def check_backend(run: BackendRun, kplan: keras_translate.KerasPlan,
                  module: legacy_format.LegacyModule, spec: verify_lib.Spec,
                  expected: verify_lib.Expected,
                  checkpoint: Mapping[str, np.ndarray],
                  report: verify_lib.ParityReport) -> None:
  """The checks of one backend's run against the reference, into `report`."""
  b = run.backend
  add = report.checks.append
  r = run.result
  if r is None or r.get("structure"):
    why = run.error or "; ".join(r["structure"][:3])
    add(compare_lib.check(f"keras/load[{b}]", False,
                          f"the .keras file did not run on {b}: {why}"))
    return
  add(compare_lib.check(
      f"keras/load[{b}]", True,
      f"loaded in safe mode without custom objects: Keras {r['keras_version']}, "
      f"{b} {r['backend_version']}; {len(kplan.layers)} layers as planned"))
  add(compare_lib.compare_many(
      f"variables/values[{b}]", r["variables"],
      {v: checkpoint[v] for v in kplan.variables}, "variables"))
  trainable = {v.name for variant in module.variants.values()
               for v in variant.variables if v.trainable}
  want = _expected_trainable(kplan, trainable)
  have = set(r["trainable"])
  frozen = sorted((trainable & set(kplan.variables)) - want)
  add(compare_lib.check(
      f"variables/trainable[{b}]", have == want,
      f"{len(have)} trainable weights, expected {len(want)}"
      + (f" (the module's trainable minus {len(frozen)} of frozen batch-norm "
         f"layers)" if frozen else "")
      + _diff(have, want)))

  sig = module.inference.signatures[spec.signature]
  tensor = sig.outputs[spec.output_key].tensor_name
  outputs = {tag: expected.outputs[tag][tensor] for tag in expected.outputs
             if tensor in expected.outputs[tag]}
  add(compare_lib.compare_many(f"call/inference[{b}]",
                               {t: r["outputs"][t] for t in outputs}, outputs,
                               "keras_inference", scale=_largest(outputs.values())))
  conventions = [f"{t}: {o.dtype} {list(o.shape)}" for t, o in r["outputs"].items()
                 if o.dtype != np.float32 or o.ndim != 2 or
                 o.shape[0] != _parse_tag(t)[0]]
  widths = {o.shape[-1] for o in r["outputs"].values()}
  add(compare_lib.check(
      f"call/image_api[{b}]", not conventions and len(widths) == 1,
      "float32 [batch, width] for every input, one width" if not conventions
      else "expected float32 [batch, width], found " + "; ".join(conventions)))
  if kplan.kind == plan_lib.CLASSIFICATION and all(r["outputs"][t].shape == outputs[t].shape for t in outputs):
    a = np.concatenate([r["outputs"][t] for t in sorted(outputs)])
    e = np.concatenate([outputs[t] for t in sorted(outputs)])
    add(compare_lib.top_k(f"call/top1[{b}]", a, e, 1))
    add(compare_lib.top_k(f"call/top5[{b}]", a, e, 5))

  step = expected.steps.get("train")
  if step is not None and step.error:
    add(compare_lib.check(f"train/run[{b}]", False,
                          f"the module's training step failed: {step.error}"))
  elif step is not None and "train_output" in r:
    _check_training(r, step, kplan, checkpoint, report)

  losses, total = expected.regularization
  add(compare_lib.check(
      f"regularization/count[{b}]", r["num_losses"] == len(losses),
      f"{r['num_losses']} losses in model.losses, the module has {len(losses)}"))
  add(compare_lib.compare_many(
      f"regularization/values[{b}]",
      {v: np.float32(x) for v, x in r["losses"].items()},
      {v: np.float32(x) for v, x in zip(kplan.loss_variables, losses)},
      "regularization"))
  add(compare_lib.compare(f"regularization/total[{b}]",
                          np.float32(r["losses_total"]), np.float32(total),
                          "regularization"))
  add(compare_lib.check(
      f"dropout/semantics[{b}]", not r["dropout"],
      "; ".join(r["dropout"][:3]) or
      f"{sum(s.cls == 'Dropout' for s in kplan.layers)} Dropout layers: 0 or "
      f"1/(1-rate) in training, mask shared along the noise shape, identity "
      f"in inference"))


def _check_training(r: Mapping[str, Any], step: verify_lib.ExpectedStep,
                    kplan: keras_translate.KerasPlan,
                    checkpoint: Mapping[str, np.ndarray],
                    report: verify_lib.ParityReport) -> None:
  b = r["backend"]
  add = report.checks.append
  add(compare_lib.compare(f"train/output[{b}]", r["train_output"], step.output,
                          "keras_training_output", scale=_largest([step.output])))
  in_model = set(kplan.variables)
  ref_changed = {v: x for v, x in step.changed.items() if v in in_model}
  outside = sorted(set(step.changed) - in_model)
  moved = set(ref_changed) | set(r["changed"])
  want = moving_expectation(kplan, ref_changed, checkpoint, r["batch_norm_counts"])
  add(compare_lib.compare_many(
      f"train/moving_averages[{b}]",
      {v: r["changed"].get(v, checkpoint[v]) for v in moved},
      {v: want.get(v, checkpoint[v]) for v in moved}, "moving_averages"))
  raw = [(float(np.max(np.abs(r["changed"][v] - x))),
          float(np.max(np.abs(r["changed"][v] - x) / np.maximum(np.abs(x), 1e-30))))
         for v, x in ref_changed.items()
         if v in r["changed"] and kplan.variables[v][1] == "moving_variance"]
  if raw:
    report.warnings.append(BESSEL_WARNING.format(
        abs=max(a for a, _ in raw), rel=max(x for _, x in raw), backend=b))
  add(compare_lib.check(
      f"train/updated_variables[{b}]", set(r["changed"]) == set(ref_changed) and not outside,
      f"{len(r['changed'])} variables updated, the module updates "
      f"{len(step.changed)}" + _diff(set(r["changed"]), set(step.changed))))
  if step.gradients is None or r["train_output"].shape != step.output.shape:
    return
  grads, ref_grads = {}, {}
  for var, g in r["gradients"].items():
    grads[var] = g
    ref_grads[var] = step.gradients.get(var, np.zeros_like(g))
  add(compare_lib.compare_many(f"train/gradients[{b}]", grads, ref_grads,
                               "keras_gradients", scale=_largest(ref_grads.values())))
  norms = {v: np.float64(np.linalg.norm(g.astype(np.float64))) for v, g in grads.items()}
  ref_norms = {v: np.float64(np.linalg.norm(g.astype(np.float64)))
               for v, g in ref_grads.items()}
  add(compare_lib.compare_many(
      f"train/gradient_norms[{b}]", norms, ref_norms, "keras_gradient_norms",
      scale=max(list(ref_norms.values()) + [1e-30])))
  if r["unfed_dropout"]:
    report.warnings.append(
        f"{b}: {len(r['unfed_dropout'])} Dropout layers drew their own masks "
        f"in the training call (the module's output does not depend on them: "
        f"e.g. '{r['unfed_dropout'][0]}')")


def _largest(arrays) -> float:
  """The largest magnitude in `arrays` (what tolerances' atol is relative to)."""
  return max([float(np.max(np.abs(a))) for a in arrays if np.size(a)] + [1e-30])


def _diff(actual: set[str], expected: set[str]) -> str:
  extra, missing = sorted(actual - expected), sorted(expected - actual)
  parts = [f"unexpected: {extra[:3]}"] if extra else []
  parts += [f"missing: {missing[:3]}"] if missing else []
  return (" (" + "; ".join(parts) + ")") if parts else ""


def verify_keras(old_path: str, new_path: str, kplan: keras_translate.KerasPlan,
                 spec: verify_lib.Spec, *,
                 module: Optional[legacy_format.LegacyModule] = None,
                 expected: Optional[verify_lib.Expected] = None,
                 backends: Optional[Sequence[str]] = None) -> verify_lib.ParityReport:
  """Checks the `.keras` file at `new_path` against the TF1 module at
  `old_path` on each of `backends` (default: every installed one).
  `expected` is the reference side if it already ran (else it runs here)."""
  start = time.monotonic()
  module = module or legacy_format.read_module(old_path)
  report = verify_lib.ParityReport(old_path=old_path, new_path=new_path)
  installed = keras_side.installed_backends()
  backends = list(backends or installed)
  for backend in keras_side.BACKENDS:
    if backend not in installed:
      report.warnings.append(f"Keras backend {backend} is not installed here: "
                             f"not verified on it (pip install "
                             f"'migrate-hub-module[keras]')")
  here = "this process"
  report.processes["module (TF1 Session)"] = here if expected is None else "earlier"
  if expected is None:
    expected = verify_lib.reference_side(old_path, spec, module=module)
  checkpoint = reference_lib.read_checkpoint(module)
  request = keras_request(kplan, expected)
  if request["random_values"]:
    report.method_for_random_ops = METHOD_FED
  for run in run_backends(new_path, request, backends):
    report.processes[f"Keras model, {run.backend}"] = (
        f"child process (KERAS_BACKEND={run.backend})")
    check_backend(run, kplan, module, spec, expected, checkpoint, report)
  report.seconds = time.monotonic() - start
  return report


def verify_existing(old_path: str, new_path: str, *,
                    backends: Optional[Sequence[str]] = None) -> verify_lib.ParityReport:
  """`verify OLD NEW.keras`: the plan is made again from the module with the
  options the file's metadata records, then checked as after a conversion."""
  metadata = keras_format.check_converted(new_path)
  module = legacy_format.read_module(old_path)
  plan = plan_lib.make_plan(
      module, signature=metadata.get("signature"),
      output_key=metadata.get("output_key"),
      remove_output_dropout=not metadata.get("keep_output_dropout", False))
  kplan = keras_translate.translate(module, plan)
  report = verify_keras(old_path, new_path, kplan, spec_for_keras(module, plan),
                        module=module, backends=backends)
  if metadata.get("source_sha256") not in (None, module.saved_model_sha256):
    report.warnings.append(
        f"{new_path} was converted from a module whose saved_model.pb had "
        f"sha256 {metadata['source_sha256']}; {old_path} has "
        f"{module.saved_model_sha256}")
  return report
