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
inference mode and the `serve` endpoint (Keras 3's), its dtype, rank and
width (the image API), top-1/top-5 for classifiers; one training step (the
output of `__call__(x, training=True, **hparams)`, every variable after it,
the gradients of `sum(output * probe)`),
again with each hyperparameter at a non-default value; the regularization
losses (each, and their total); and the model as its users load it, one row
per consumer (`migrate.consumers`: the TF1 loader, the C API loader, TFLite,
Keras 3's TFSMLayer, tf_keras' hub.KerasLayer, and their fit steps), the
TF1 loader by default, all with `consumers="all"`.

How to add a parity check:
  1. one producer field: what the converted model computes, in `Actual`
     (`verify_actual.py`; filled by `ConvertedModel.inference` if no
     training step could change it, else by `ConvertedModel.training`),
     and what the module computes, in `Expected` (`verify_expected.py`,
     filled by `reference_side`), if the check compares the two;
  2. one check function in `verify_checks.py`, `(spec, expected, actual,
     facts, tolerance)` yielding `compare.compare(...)`/`compare.check(...)`
     results (nothing when it does not apply), listed in `CHECKS` where its
     results belong in the report, with its tolerance entry;
  3. one tolerance entry in `migrate/tolerances.py`, with its reason (and
     a `_fake_quant` variant only if FakeQuant* modules need another bound);
  and a case in tests/test_checks_unit.py where it passes and fails.

Where each part runs (`PendingReference`, chosen once by `start_reference`):
everything in this thread, one part after the other, or, with 2 CPUs, the
reference side in a thread started early (`convert` starts it while it
builds the model) and the consumer runs (they load the saved files
themselves) in a thread beside the converted model's own runs. Threads
share this process's TensorFlow: a child process would pay a second import
and a second runtime (it did: the whole tree's peak was half again as large).
`ParityReport.processes` says where each part ran.

The saved files are only read. Variables changed by training steps are put
back after every step. The caller decides to raise `errors.ParityError`.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import Any, Callable, Optional

import tensorflow as tf

from migrate import consumers as consumers_lib
from migrate import errors
from migrate import isolation
from migrate import legacy_format
from migrate import preflight
from migrate import verify_actual
from migrate import verify_checks
from migrate import verify_spec
from migrate.compare import CheckResult
from migrate.verify_actual import Actual, ActualStep
from migrate.verify_expected import Expected, ExpectedStep, reference_side
from migrate.verify_spec import ModuleFacts, Spec, spec_for_plan

__all__ = [
    "verify", "ParityReport", "Spec", "spec_for_plan", "reference_side",
    "Expected", "ExpectedStep", "Actual", "ActualStep", "ModuleFacts",
    "start_reference", "PendingReference",
    "METHOD_NONE", "METHOD_FED", "METHOD_GRADIENTS", "CheckResult",
]

METHOD_NONE = "none: the training path depends on no random op"
METHOD_FED = ("fed: the random ops' outputs were fed the same seeded values "
              "in the TF1 Session and in an inlined copy of the TF2 function")
METHOD_GRADIENTS = "the module's: tf.gradients in the TF1 Session"


def method_for_forward_gradients(count: int) -> str:
  """What the report says when `count` custom gradients were lost."""
  return (f"forward computation: {count} custom gradients were lost by the "
          f"module's export (tf.custom_gradient, e.g. TF 2.x's tf.nn.swish), so "
          f"the gradient checks compare with the analytic gradient of the forward "
          f"computation they wrap (tf.gradients in the TF1 Session), which the "
          f"converted model differentiates; the rest are the module's")


_HERE, _THREAD = "this thread", "another thread"


@dataclasses.dataclass
class ParityReport:
  """The outcome of `verify`: every check, in the order they ran."""

  old_path: str
  new_path: str
  checks: list[CheckResult] = dataclasses.field(default_factory=list)
  method_for_random_ops: str = METHOD_NONE
  method_for_gradients: str = METHOD_GRADIENTS
  warnings: list[str] = dataclasses.field(default_factory=list)
  seconds: float = 0.0
  # Where each part ran: "this thread" or "another thread".
  processes: dict[str, str] = dataclasses.field(default_factory=dict)
  # The consumer runs (`migrate.consumers.selected`): the selection, the
  # runs made ("<runner>" or "<runner>/fit"), those skipped as expensive.
  consumers: str = consumers_lib.DEFAULT
  consumers_ran: list[str] = dataclasses.field(default_factory=list)
  consumers_skipped: list[str] = dataclasses.field(default_factory=list)

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

  def consumers_line(self) -> str:
    """Which consumer runs were made, and which skipped as expensive."""
    line = (f"consumers ({self.consumers}): ran "
            f"{', '.join(self.consumers_ran) or 'none'}")
    if self.consumers_skipped:
      line += (f"; skipped as expensive: {', '.join(self.consumers_skipped)} "
               f"(--consumers=all runs them)")
    return line

  def summary(self) -> str:
    """One line: the verdict, how many checks, the first failure if any.
    Module text (check names, signature keys) is escaped: one line always."""
    ok = len(self.checks) - len(self.failures)
    line = (f"parity {'passed' if self.passed else 'FAILED'}: {ok}/"
            f"{len(self.checks)} checks in {self.seconds:.1f}s; random ops: "
            f"{self.method_for_random_ops.split(':')[0]}; consumers: "
            f"{len(self.consumers_ran)} ran, {len(self.consumers_skipped)} "
            f"skipped as expensive")
    if self.method_for_gradients != METHOD_GRADIENTS:
      line += f"; gradients: {self.method_for_gradients.split(':')[0]}"
    if self.first_failure is not None:
      line += f"; first failure: {self.first_failure}"
    return errors.printable(line)

  def to_json(self) -> str:
    checks = []
    for c in self.checks:
      entry = c.to_dict()
      entry.update(name=errors.printable(c.name), detail=errors.printable(c.detail))
      checks.append(entry)
    first = self.first_failure
    return json.dumps({
        "old_path": self.old_path, "new_path": self.new_path,
        "passed": self.passed,
        "first_failure": errors.printable(first.name) if first else None,
        "method_for_random_ops": self.method_for_random_ops,
        "method_for_gradients": self.method_for_gradients,
        "warnings": [errors.printable(w) for w in self.warnings],
        "seconds": round(self.seconds, 3),
        "processes": dict(self.processes),
        "consumers": {"selection": self.consumers, "ran": list(self.consumers_ran),
                      "skipped": list(self.consumers_skipped)},
        "checks": checks}, indent=1)

  def format_table(self) -> str:
    """The table of checks and what follows it, every line escaped (module
    text in check names, signature keys and details)."""
    def num(x):
      return "-" if x is None else f"{x:.2e}"
    rows = [("check", "max_abs", "max_rel", "rtol", "atol", "result")]
    for c in self.checks:
      rows.append((errors.printable(c.name), num(c.max_abs_err),
                   num(c.max_rel_err), num(c.rtol), num(c.atol),
                   "ok" if c.passed else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
             for r in rows]
    for c in self.failures:
      lines.append(errors.printable(f"FAIL {c.name}: {c.detail}"))
    for w in self.warnings:
      lines.append(errors.printable(f"warning: {w}"))
    lines.append(self.consumers_line())
    lines.append(f"random ops: {self.method_for_random_ops}")
    lines.append(f"gradients: {self.method_for_gradients}")
    lines.append(f"{'PASSED' if self.passed else 'FAILED'}: "
                 f"{len(self.checks) - len(self.failures)}/{len(self.checks)} "
                 f"checks in {self.seconds:.1f}s")
    return "\n".join(lines)


# -- where each part runs --------------------------------------------------------------

class PendingReference:
  """The reference side of one verification, and where the rest runs.

  The placement strategy, chosen once by `start_reference`: `_ReferenceHere`
  runs everything in this thread, the reference side when its result is
  first asked for; `_ReferenceInThread` runs the reference side in a thread
  from the start (beside the build and export), and the consumer runs,
  which load the saved files themselves, in another thread beside the
  converted model's own runs. Threads, not processes: the parts share this
  process's TensorFlow (no second import, no second copy of the runtime:
  half the memory of a child process, measured in docs/PERFORMANCE.md), and
  what they run releases the interpreter lock (Session runs, kernels).
  """

  parallel = False
  consumers_aside = False  # Whether the consumer runs got a thread of their own.

  def __init__(self, old_path: str, spec: Spec):
    self.spec = spec
    self._old_path = old_path
    self._value: Optional[Expected] = None

  def done(self) -> bool:
    """Whether `result()` would return without waiting."""
    return True

  def result(self, **read: Any) -> Expected:
    """The `Expected`; `read` (module=) is passed on to
    `reference_side` when it runs in this thread."""
    if self._value is None:
      self._value = reference_side(self._old_path, self.spec, **read)
    return self._value

  def start_consumers(self, converted: verify_actual.ConvertedModel
                      ) -> Callable[[], dict[str, consumers_lib.ConsumerResult]]:
    """Starts the consumer runs of `converted` (or not: they run when asked
    for); returns what gives their results."""
    return converted.consumers

  def processes(self) -> dict[str, str]:
    """Where each part ran (`ParityReport.processes`)."""
    return {"module (TF1 Session)": _THREAD if self.parallel else _HERE,
            "converted model": _HERE,
            "consumers (each loads the saved files)":
                _THREAD if self.consumers_aside else _HERE}

  def cancel(self) -> None:
    """Drops the work started elsewhere, if any."""


class _ReferenceHere(PendingReference):
  """Everything in this thread, one part after the other."""


class _Background:
  """`fn()` in a daemon thread; `result()` waits for it and returns its
  value or raises its exception in the caller's thread."""

  def __init__(self, fn: Callable[[], Any], name: str):
    self._value: Any = None
    self._error: Optional[BaseException] = None
    self._thread = threading.Thread(target=self._run, args=(fn,), name=name,
                                    daemon=True)
    self._thread.start()

  def _run(self, fn: Callable[[], Any]) -> None:
    try:
      self._value = fn()
    except BaseException as e:  # pylint: disable=broad-except
      self._error = e

  def done(self) -> bool:
    return not self._thread.is_alive()

  def result(self) -> Any:
    self._thread.join()
    if self._error is not None:
      raise self._error
    return self._value


class _ReferenceInThread(PendingReference):
  """The reference side in a thread, at once; the consumer runs in another.

  Op determinism is process-wide; each side's `deterministic_ops` block
  keeps it on until the last of them closes. A selection with Keras fit
  steps turns it off while they run (`consumers._unseeded_random_ops`):
  its consumer runs stay in the caller's thread, after the converted
  model's and after the reference side's.
  """

  parallel = True

  def __init__(self, old_path: str, spec: Spec,
               module: Optional[legacy_format.LegacyModule] = None):
    super().__init__(old_path, spec)
    self._job: Optional[_Background] = _Background(
        lambda: reference_side(old_path, spec, module=module),
        name="reference side")

  def done(self) -> bool:
    return self._value is not None or self._job is None or self._job.done()

  def result(self, **read: Any) -> Expected:
    if self._value is None and self._job is not None:
      self._value = self._job.result()
    return super().result(**read)  # Cancelled before it answered: here.

  def start_consumers(self, converted: verify_actual.ConvertedModel
                      ) -> Callable[[], dict[str, consumers_lib.ConsumerResult]]:
    if any(fit for _, fit in converted.selected.runs):
      return converted.consumers
    self.consumers_aside = True
    return _Background(converted.consumers, name="consumer runs").result

  def cancel(self) -> None:
    """Forgets the thread (it cannot be stopped; it ends on its own, its
    result unread)."""
    self._job = None


def start_reference(old_path: str, spec: Spec, *, parallel: Optional[bool] = None,
                    module: Optional[legacy_format.LegacyModule] = None
                    ) -> PendingReference:
  """Starts the reference side for `spec`, choosing where it runs.

  `parallel=None` runs it in a thread when this process may use at least
  `preflight.PARALLEL_MIN_CPUS` CPUs (else here, when its result is first
  needed); the caller keeps op determinism on meanwhile
  (`_ReferenceInThread`). `module`, the module at `old_path` already read,
  saves the thread reading it again.
  """
  if parallel is None:
    parallel = isolation.usable_cpus() >= preflight.PARALLEL_MIN_CPUS
  if parallel:
    return _ReferenceInThread(old_path, spec, module)
  return _ReferenceHere(old_path, spec)


# -- verify ----------------------------------------------------------------------------

def _random_values(expected: Optional[Expected]
                   ) -> Optional[dict[str, dict[str, Any]]]:
  """The random values of each training step the reference ran (`{}` for a
  step without random ops), or None if the reference is not known yet."""
  if expected is None:
    return None
  return {prefix: step.random_values for prefix, step in expected.steps.items()
          if not step.error}


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
           module: Optional[legacy_format.LegacyModule] = None,
           consumers: str = consumers_lib.DEFAULT) -> ParityReport:
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

  `consumers` selects the consumer runs (`migrate.consumers.selected`):
  "default" the TF1 loader (the saver's restore, every serving signature),
  "all" also the C API loader, TFLite and the Keras layers with their fit
  steps. A ValueError names
  the selections if it is none of them.
  """
  start = time.monotonic()
  selected = consumers_lib.selected(consumers)
  report = ParityReport(old_path=old_path, new_path=new_path,
                        consumers=consumers,
                        consumers_skipped=list(selected.skipped))
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
      converted = verify_actual.ConvertedModel(model, spec, facts, meta,
                                               path=new_path, consumers=consumers)
      consumer_runs = reference.start_consumers(converted)
      actual = converted.inference(converted.describe())
      expected = reference.result(module=module) if reference.done() else None
      actual = converted.training(actual, _random_values(expected))
      if expected is None:  # The thread was still at work: the steps with
        # random ops run again, fed its values.
        expected = reference.result(module=module)
        actual = converted.feed_random_ops(actual, expected)
      actual = converted.with_consumers(actual, consumer_runs())
      report.processes = reference.processes()
    finally:
      reference.cancel()  # (The loaded model is dropped: no need to put
      # its variables back; each training step did.)
  report.checks = verify_checks.run_checks(spec, expected, actual, facts)
  report.consumers_ran = list(actual.consumer_runs)
  report.warnings = _warnings(spec, expected, actual)
  report.method_for_random_ops = METHOD_FED if expected.random_ops else METHOD_NONE
  if expected.forward_gradients:
    report.method_for_gradients = method_for_forward_gradients(
        len(expected.forward_gradients))
  report.seconds = time.monotonic() - start
  return report
