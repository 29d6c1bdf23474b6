"""VERIFY stage: does the converted model compute what the TF1 module did?

`verify(old_path, new_path)` returns a `ParityReport`. It produces, then
checks, as the parity harnesses of jax2tf and tf2onnx do:

  verify_spec.py      `Spec` (which output, hyperparameters, seed) and the
                      inputs both sides run; `ModuleFacts`, the module as data
  verify_expected.py  the reference producer: the TF1 module in a Session
                      (`migrate.reference`) -> `Expected`
  verify_actual.py    the converted producer: the loaded SavedModel ->
                      `Actual`, which mirrors `Expected` field for field
  verify_random_ops.py  the saved training function with its random ops fed
                      the reference's values
  verify_checks.py    the checks: small functions over (spec, expected,
                      actual, facts), in one ordered list `CHECKS`
  verify.py           this: `verify()`, `ParityReport`, and where each part
                      runs (`start_reference` chooses, once)

What is checked, each with its entry in `migrate/tolerances.py`: the
variables against the checkpoint, bit for bit; every TF1 signature and
output key against the serving signatures (`serving_default` at batch sizes 1
and 2 and, for variable-size modules, two resolutions); `__call__` in
inference mode, its dtype, rank and width (the image API), top-1/top-5 for
classifiers; one training step (the output of `__call__(x, training=True,
**hparams)`, every variable after it, the gradients of `sum(output * probe)`),
again with each hyperparameter at a non-default value; the regularization
losses (each, and their total).

How to add a parity check:
  1. one producer field: what the converted model computes, in `Actual`
     (`verify_actual.py`; filled by `ConvertedModel.inference` if no
     training step could change it, as that half may run in the child
     process, else by `ConvertedModel.training`), and what the module
     computes, in `Expected` (`verify_expected.py`, filled by
     `reference_side`), if the check compares the two;
  2. one check function in `verify_checks.py`, `(spec, expected, actual,
     facts, tolerance)` yielding `compare.compare(...)`/`compare.check(...)`
     results (nothing when it does not apply), listed in `CHECKS` where its
     results belong in the report, with its tolerance entry;
  3. one tolerance entry in `migrate/tolerances.py`, with its reason (and
     a `_fake_quant` variant only if FakeQuant* modules need another bound);
  and a case in tests/test_checks_unit.py where it passes and fails.

Where each part runs (`PendingReference`, chosen once by `start_reference`):
the reference side here, when first needed, or in a child process started
early (`convert` starts it while it builds the model). A child that has
finished by the time the converted model is loaded also runs the converted
model's inference half (`converted_inference`) while this process runs the
training steps; `ParityReport.processes` says where each part ran.

The saved files are only read. Variables changed by training steps are put
back after every step. The caller decides to raise `errors.ParityError`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Optional

import tensorflow as tf

from migrate import isolation
from migrate import legacy_format
from migrate import preflight
from migrate import verify_actual
from migrate import verify_checks
from migrate import verify_spec
from migrate.compare import CheckResult
from migrate.verify_actual import Actual, ActualStep, converted_inference
from migrate.verify_expected import Expected, ExpectedStep, reference_side
from migrate.verify_spec import ModuleFacts, Spec, spec_for_plan

__all__ = [
    "verify", "ParityReport", "Spec", "spec_for_plan", "reference_side",
    "Expected", "ExpectedStep", "Actual", "ActualStep", "ModuleFacts",
    "start_reference", "PendingReference", "converted_inference",
    "METHOD_NONE", "METHOD_FED", "CheckResult",
]

METHOD_NONE = "none: the training path depends on no random op"
METHOD_FED = ("fed: the random ops' outputs were fed the same seeded values "
              "in the TF1 Session and in an inlined copy of the TF2 function")
_HERE, _CHILD = "this process", "child process"


@dataclasses.dataclass
class ParityReport:
  """The outcome of `verify`: every check, in the order they ran."""

  old_path: str
  new_path: str
  checks: list[CheckResult] = dataclasses.field(default_factory=list)
  method_for_random_ops: str = METHOD_NONE
  warnings: list[str] = dataclasses.field(default_factory=list)
  seconds: float = 0.0
  # Where each part ran: "this process" or "child process".
  processes: dict[str, str] = dataclasses.field(default_factory=dict)

  @property
  def passed(self) -> bool:
    return bool(self.checks) and all(c.passed for c in self.checks)

  @property
  def failures(self) -> list[CheckResult]:
    return [c for c in self.checks if not c.passed]

  @property
  def first_failure(self) -> Optional[CheckResult]:
    failures = self.failures
    return failures[0] if failures else None

  def check(self, name: str) -> CheckResult:
    """The check called `name` (KeyError if it did not run)."""
    for c in self.checks:
      if c.name == name:
        return c
    raise KeyError(f"no check '{name}' (ran: {', '.join(c.name for c in self.checks)})")

  def summary(self) -> str:
    """One line: the verdict, how many checks, the first failure if any."""
    ok = len(self.checks) - len(self.failures)
    line = (f"parity {'passed' if self.passed else 'FAILED'}: {ok}/"
            f"{len(self.checks)} checks in {self.seconds:.1f}s; random ops: "
            f"{self.method_for_random_ops.split(':')[0]}")
    if self.first_failure is not None:
      line += f"; first failure: {self.first_failure}"
    return line

  def to_json(self) -> str:
    return json.dumps({
        "old_path": self.old_path, "new_path": self.new_path,
        "passed": self.passed,
        "first_failure": self.first_failure.name if self.first_failure else None,
        "method_for_random_ops": self.method_for_random_ops,
        "warnings": list(self.warnings), "seconds": round(self.seconds, 3),
        "processes": dict(self.processes),
        "checks": [c.to_dict() for c in self.checks]}, indent=1)

  def format_table(self) -> str:
    def num(x):
      return "-" if x is None else f"{x:.2e}"
    rows = [("check", "max_abs", "max_rel", "rtol", "atol", "result")]
    for c in self.checks:
      rows.append((c.name, num(c.max_abs_err), num(c.max_rel_err), num(c.rtol),
                   num(c.atol), "ok" if c.passed else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
             for r in rows]
    for c in self.failures:
      lines.append(f"FAIL {c.name}: {c.detail}")
    for w in self.warnings:
      lines.append(f"warning: {w}")
    lines.append(f"random ops: {self.method_for_random_ops}")
    lines.append(f"{'PASSED' if self.passed else 'FAILED'}: "
                 f"{len(self.checks) - len(self.failures)}/{len(self.checks)} "
                 f"checks in {self.seconds:.1f}s")
    return "\n".join(lines)


# -- where each part runs --------------------------------------------------------------

class PendingReference:
  """The reference side of one verification, and where the rest runs.

  The placement strategy, chosen once by `start_reference`: `_ReferenceHere`
  runs the reference side in this process when its result is first asked
  for; `_ReferenceInChild` runs it in a child process at once and, once the
  child has finished, hands it the converted model's inference half.
  """

  in_child = False

  def __init__(self, old_path: str, spec: Spec):
    self.spec = spec
    self._old_path = old_path
    self._value: Optional[Expected] = None

  def done(self) -> bool:
    """Whether `result()` would return without waiting for another process."""
    return True

  def result(self, **read: Any) -> Expected:
    """The `Expected`; `read` (module=, checkpoint=) is passed on to
    `reference_side` when it runs in this process."""
    if self._value is None:
      self._value = reference_side(self._old_path, self.spec, **read)
    return self._value

  def start_inference(self, new_path: str, facts: ModuleFacts
                      ) -> Optional[isolation.IsolatedCall]:
    """Starts the converted model's inference half elsewhere, or returns
    None: this process runs it."""
    return None

  def processes(self, inference_elsewhere: bool) -> dict[str, str]:
    return {"module (TF1 Session)": _CHILD if self.in_child else _HERE,
            "converted model, inference and regularization":
                _CHILD if inference_elsewhere else _HERE,
            "converted model, training": _HERE}

  def cancel(self) -> None:
    """Stops the work started elsewhere, if any."""


class _ReferenceHere(PendingReference):
  """Everything in this process."""


class _ReferenceInChild(PendingReference):
  """The reference side in a child process, which waits for more work once
  it has finished: the converted model's inference half, if asked for
  before this process runs it (after that it would only queue)."""

  in_child = True

  def __init__(self, old_path: str, spec: Spec):
    super().__init__(old_path, spec)
    self._child: Optional[isolation.IsolatedCall] = isolation.start_isolated(
        "migrate.verify:reference_side", old_path, spec, reusable=True,
        what=f"{old_path} (reference side of the parity checks)")

  def done(self) -> bool:
    return (self._value is not None or self._child is None or
            self._child.ready())

  def result(self, **read: Any) -> Expected:
    if self._value is None and self._child is not None:
      self._value = self._child.result()
    return super().result(**read)  # Cancelled before it answered: here.

  def start_inference(self, new_path: str, facts: ModuleFacts
                      ) -> Optional[isolation.IsolatedCall]:
    if self._child is None or not self.done():
      return None
    self.result()
    return self._child.submit(
        "migrate.verify:converted_inference", self._old_path, new_path,
        self.spec, facts,
        what=f"{self._old_path} (converted side of the parity checks)")

  def cancel(self) -> None:
    if self._child is not None:
      self._child.cancel()
      self._child = None


def start_reference(old_path: str, spec: Spec, *, parallel: Optional[bool] = None,
                    module: Optional[legacy_format.LegacyModule] = None
                    ) -> PendingReference:
  """Starts the reference side for `spec`, choosing where it runs.

  `parallel=None` runs it in a child process when
  `preflight.reference_child_pays` (2 CPUs, a checkpoint of 4 MiB: the
  child pays for its own TensorFlow import); otherwise it runs in this
  process, when its result is first needed. A child prestarted for
  "migrate.verify" (`isolation.prestart`) is used. The child inherits this
  process's environment, thread settings included: the same kernels on a
  different number of threads sum in another order (ResNet-v2-50's features
  then differ by 5e-5, over the inference tolerance).
  """
  if parallel is None:
    module = module or legacy_format.read_module(old_path)
    parallel = preflight.reference_child_pays(module.checkpoint_prefix)
  return (_ReferenceInChild if parallel else _ReferenceHere)(old_path, spec)


# -- verify ----------------------------------------------------------------------------

def _random_values(expected: Optional[Expected]
                   ) -> Optional[dict[str, dict[str, Any]]]:
  """The random values of each training step the reference ran, or None if
  the reference is not known yet."""
  if expected is None:
    return None
  return {prefix: step.random_values for prefix, step in expected.steps.items()
          if not step.error and step.random_values}


def _warnings(spec: Spec, expected: Expected, actual: Actual) -> list[str]:
  """What the report says besides the checks: the converted side's
  warnings, and what became of a train graph's output dropout."""
  result = list(actual.warnings)
  removed, match = spec.output_dropout_removed, expected.output_dropout
  if removed and match == removed:
    result.append(
        f"the train graph applies dropout to the output features (node "
        f"'{removed}'); in training mode the converted model outputs the "
        f"dropout's input, as the image feature vector API requires")
  elif not removed and match:
    result.append(
        f"the train graph applies dropout to the output features (node "
        f"'{match}') and the converted model keeps it in "
        f"training mode, against the image feature vector API")
  return result


def verify(old_path: str, new_path: str, *, seed: int = 0,
           signature: Optional[str] = None,
           output_key: Optional[str] = None,
           optimize_graphs: bool = False,
           reference: Optional[PendingReference] = None,
           parallel: Optional[bool] = None,
           module: Optional[legacy_format.LegacyModule] = None) -> ParityReport:
  """Compares the converted model at `new_path` with the TF1 module at `old_path`.

  `signature`/`output_key`, if given, are what the user asked `__call__` to
  expose; the model's metadata must name them. Returns a `ParityReport`
  (`report.passed`); raises only for unreadable inputs.

  The TF1 module's side comes from `reference` (started earlier with
  `start_reference`, e.g. while the model was being converted) if it was
  made for the same `Spec`, else it is started now (`parallel` as in
  `start_reference`). `module`, the module at `old_path` if the caller has
  read it already, saves reading it again. Both sides run their graphs as
  written, with Grappler off (`optimize_graphs=False`): parity is a
  property of the graphs, and Grappler's rewrites, which TensorFlow applies
  alike to any model, would cost each function verification runs another
  optimisation pass.
  `optimize_graphs=True` verifies with Grappler on; the tolerance table
  holds for both (tests/test_parity.py). Op determinism is on while both
  sides run (`verify_spec.deterministic_ops`).
  """
  start = time.monotonic()
  report = ParityReport(old_path=old_path, new_path=new_path)
  with verify_spec.run_conditions(optimize_graphs):
    module = module or legacy_format.read_module(old_path)
    model = tf.saved_model.load(new_path)
    meta = verify_spec.read_metadata(model)
    spec = verify_spec.spec_from_metadata(meta, module, seed=seed,
                                          optimize_graphs=optimize_graphs)
    facts = verify_spec.module_facts(module, spec,
                                     requested=(signature, output_key))
    if reference is None or reference.spec != spec:
      if reference is not None:
        reference.cancel()
      reference = start_reference(old_path, spec, parallel=parallel,
                                  module=module)
    try:
      inference = reference.start_inference(new_path, facts)
      converted = verify_actual.ConvertedModel(model, spec, facts, meta)
      expected = reference.result(module=module) if reference.done() else None
      actual = verify_actual.converted_side(
          converted, inference=inference is None,
          random_values=_random_values(expected))
      if inference is not None:
        actual = actual.with_inference_of(inference.result())
      if expected is None:  # The child was still at work: the steps with
        # random ops run again, fed its values.
        expected = reference.result(module=module)
        actual = converted.feed_random_ops(actual, expected)
      report.processes = reference.processes(inference is not None)
    finally:
      reference.cancel()  # (The loaded model is dropped: no need to put
      # its variables back; each training step did.)
  report.checks = verify_checks.run_checks(spec, expected, actual, facts)
  report.warnings = _warnings(spec, expected, actual)
  report.method_for_random_ops = METHOD_FED if expected.random_ops else METHOD_NONE
  report.seconds = time.monotonic() - start
  return report
