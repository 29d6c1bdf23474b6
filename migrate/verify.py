"""VERIFY stage: does the converted model compute what the TF1 module did?

`verify(old_path, new_path)` runs the same inputs through both sides and
compares, with the one helper `migrate.compare` and the one table
`migrate.tolerances`:

- the variables, bit for bit, against the module's checkpoint;
- every TF1 signature and every output key (the serving signatures), and
  `serving_default`, at batch sizes 1 and 2 and, for variable-size modules,
  two resolutions;
- `__call__` in inference mode, its dtype, rank and width (the image API),
  and top-1/top-5 for classifiers;
- one training step: the output of `__call__(x, training=True, **hparams)`,
  every variable after it (moving averages), the gradients of
  `sum(output * probe)`; again with each hyperparameter at a non-default value;
- the regularization losses (each, and their total).

The two sides:

- the reference side (`reference_side`): the TF1 module in graph mode with
  `migrate.reference`, for a `Spec` (which output, which hyperparameters,
  the seed) known before the converted model exists. It returns plain data
  (`Expected`), so it can run in a child process while the model is being
  converted (`start_reference`; `convert` does that);
- the converted side (`_Verifier`): the SavedModel loaded with
  `tf.saved_model.load`, run on the same inputs (a pure function of the
  spec), then checked against `Expected`. If the reference child has
  already finished (the CLI prestarts it, so it works while the model is
  converted), it also runs the converted side's inference half
  (`converted_inference`: the signatures, `__call__` in inference mode, the
  regularization losses) while this process runs the training steps; `ParityReport.processes` says
  where each part ran.

Random ops on the training path are fed the same seeded values on both sides:
in the reference Session by feeding their outputs, and on the TF2 side in a
copy of the saved training function whose calls are inlined into one graph,
re-imported with `input_map` sending the random ops' outputs to the values and
its captured inputs to the loaded variables. The report says which was done.

The saved files are only read. Variables changed by training steps are put
back after every step. `verify` returns a `ParityReport`; the caller decides
to raise `errors.ParityError`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from tensorflow.python.framework import config as tf_config
from tensorflow.python.framework import function_def_to_graph

from migrate import compare as compare_lib
from migrate import isolation
from migrate import legacy_format
from migrate import plan as plan_lib
from migrate import preflight
from migrate import reference as reference_lib

CheckResult = compare_lib.CheckResult
BATCH_SIZES = (1, 2)
TRAIN_BATCH = 2
FALLBACK_IMAGE_SIZE = (32, 32)
SECOND_RESOLUTION_DELTA = (8, 16)
LARGE_IMAGE = 128
NON_DEFAULT_HPARAM = 0.5
_CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})
METHOD_NONE = "none: the training path depends on no random op"
METHOD_FED = ("fed: the random ops' outputs were fed the same seeded values "
              "in the TF1 Session and in an inlined copy of the TF2 function")


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


# -- the converted model -------------------------------------------------------

def _var_name(v: tf.Variable) -> str:
  return v.name.rsplit(":", 1)[0]


def _metadata(new) -> dict[str, Any]:
  meta = getattr(new, "metadata", None)
  result = {}
  if meta is None:
    return result
  for key in ("source_signature", "source_output_key", "hparams",
              "output_dropout_removed", "train_output_tensor", "has_train_graph",
              "default_image_size", "num_features", "num_classes", "output_kind",
              "source_sha256"):
    var = getattr(meta, key, None)
    if var is None:
      continue
    value = var.numpy()
    if isinstance(value, bytes):
      value = value.decode("utf-8")
    elif isinstance(value, np.ndarray):
      value = value.tolist()
    elif isinstance(value, np.generic):
      value = value.item()
    result[key] = value
  return result


def _inline_calls(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
  """A copy of `graph_def` with every (Stateful)PartitionedCall inlined.

  The call node becomes an `IdentityN` over the function's results (with
  control inputs on its control outputs), so that consumers keep their
  inputs; the body's nodes are named `<call>/<node>`.
  """
  library = {f.signature.name: f for f in graph_def.library.function}
  out = graph_pb2.GraphDef()
  out.versions.CopyFrom(graph_def.versions)
  out.library.CopyFrom(graph_def.library)
  queue = list(graph_def.node)
  while queue:
    node = queue.pop(0)
    fname = node.attr["f"].func.name if node.op in _CALL_OPS else ""
    if fname not in library:
      out.node.add().CopyFrom(node)
      continue
    fdef = library[fname]
    body, flat = function_def_to_graph.function_def_to_graph_def(fdef)
    prefix = node.name + "/"
    data_inputs = [i for i in node.input if not i.startswith("^")]
    control_inputs = [i for i in node.input if i.startswith("^")]
    args = dict(zip((a.name for a in fdef.signature.input_arg), data_inputs))

    def remap(ref: str, args=args, prefix=prefix) -> str:
      control = ref.startswith("^")
      name = ref.lstrip("^")
      op = name.split(":")[0]
      if op in args:
        return "^" + args[op].split(":")[0] if control else args[op]
      return ("^" if control else "") + prefix + name

    new_nodes = []
    for b in body.node:
      if b.name in args:
        continue
      copy = graph_pb2.GraphDef().node.add()
      copy.CopyFrom(b)
      copy.name = prefix + b.name
      del copy.input[:]
      copy.input.extend([remap(i) for i in b.input] + control_inputs)
      new_nodes.append(copy)
    rets = []
    for arg in fdef.signature.output_arg:
      ret = fdef.ret[arg.name]
      rets.append(args[ret] if ret in args else remap(flat.get(ret, ret)))
    result = graph_pb2.GraphDef().node.add()
    result.name = node.name
    if rets:
      result.op = "IdentityN"
      result.attr["T"].list.type.extend(a.type for a in fdef.signature.output_arg)
    else:
      result.op = "NoOp"
    result.input.extend(rets)
    result.input.extend("^" + prefix + n for n in fdef.control_ret.values())
    queue = new_nodes + [result] + queue
    # `result` is no call node: it is appended as it comes out of the queue.
  return out


class _FedTrainFunction:
  """The saved training function, with its random ops fed fixed values."""

  def __init__(self, concrete: Any, random_values: Mapping[str, np.ndarray],
               images_shape: Sequence[int]):
    graph_def = _inline_calls(concrete.graph.as_graph_def())
    randoms = [n.name for n in graph_def.node
               if n.op in reference_lib.RANDOM_OPS]
    self.unmatched_reference: list[str] = []
    self.matched: dict[str, str] = {}
    for ref_name in random_values:
      hits = [n for n in randoms if n == ref_name or n.endswith("/" + ref_name)]
      if len(hits) == 1:
        self.matched[hits[0]] = ref_name
      else:
        self.unmatched_reference.append(ref_name)
    self.unmatched_converted = sorted(set(randoms) - set(self.matched))
    n_args = len(concrete.inputs) - len(concrete.captured_inputs)
    arg_names = [t.name for t in concrete.inputs[:n_args]]
    captures = list(zip(concrete.inputs[n_args:], concrete.captured_inputs))
    outputs = [t.name for t in concrete.outputs]
    specs = [tf.TensorSpec(t.shape, t.dtype) for t in concrete.inputs[:n_args]]
    specs[0] = tf.TensorSpec(images_shape, tf.float32)
    matched = dict(self.matched)

    def fn(*args):
      graph = tf.compat.v1.get_default_graph()
      input_map = dict(zip(arg_names, args))
      for placeholder, value in captures:
        input_map[placeholder.name] = graph.capture(value)
      for node, ref_name in matched.items():
        input_map[node + ":0"] = tf.constant(random_values[ref_name])
      return tf.compat.v1.import_graph_def(
          graph_def, input_map=input_map, return_elements=outputs, name="")

    self._fn = tf.compat.v1.wrap_function(fn, specs)
    self.arg_names = [s.name for s in
                      tf.nest.flatten(concrete.structured_input_signature)
                      if isinstance(s, tf.TensorSpec)]

  def __call__(self, images, **hparams) -> tf.Tensor:
    values = [images] + [hparams[n] for n in self.arg_names[1:]]
    return self._fn(*values)[0]


def _training_concrete(new, hparam_names: Sequence[str]):
  """The saved `__call__` for training=True with exactly these hparams."""
  for cf in new.__call__.concrete_functions:
    args, kwargs = cf.structured_input_signature
    training = args[1] if len(args) > 1 else kwargs.get("training")
    specs = [s for s in tf.nest.flatten((args[1:], kwargs))
             if isinstance(s, tf.TensorSpec)]
    if training is True and {s.name for s in specs} == set(hparam_names):
      return cf
  raise ValueError(f"no saved training function with hparams {sorted(hparam_names)}")


# -- what both sides run -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Spec:
  """What verification runs, fixed before either side starts.

  Made from the conversion plan (`spec_for_plan`, so that the reference side
  can start while the model is still being built) or from the converted
  model's metadata; `verify` runs the reference again if the two differ.
  `signature` is empty when the metadata names no output of the module: then
  only the checks that do not need `__call__` run.
  """

  seed: int = 0
  signature: str = ""
  output_key: str = ""
  hparams: tuple[str, ...] = ()
  output_dropout_removed: str = ""  # The train graph's dropout node bypassed.
  default_image_size: Optional[tuple[int, int]] = None
  optimize_graphs: bool = False


def _image_size(size) -> Optional[tuple[int, int]]:
  size = tuple(int(s) for s in (size or ()))
  return size if len(size) == 2 and all(size) else None


def spec_for_plan(module: legacy_format.LegacyModule,
                  plan: plan_lib.MigrationPlan, *,
                  seed: int = 0, optimize_graphs: bool = False) -> Spec:
  """The spec of a model converted with `plan`: what its metadata will say."""
  match = (plan_lib.output_dropout(module, plan)
           if plan.remove_output_dropout else None)
  removed = match.output_node if match else ""
  return Spec(seed=seed, signature=plan.signature, output_key=plan.output_key,
              hparams=tuple(h.name for h in plan.hparams),
              output_dropout_removed=removed,
              default_image_size=_image_size(plan.default_image_size),
              optimize_graphs=optimize_graphs)


def _spec_from_metadata(meta: Mapping[str, Any],
                        module: legacy_format.LegacyModule, seed: int,
                        optimize_graphs: bool) -> Spec:
  sig, key = meta.get("source_signature") or "", meta.get("source_output_key") or ""
  sigs = module.inference.signatures
  if sig not in sigs or key not in sigs[sig].outputs:
    sig = key = ""
  return Spec(seed=seed, signature=sig, output_key=key,
              hparams=tuple(n for n in (meta.get("hparams") or "").split(",") if n),
              output_dropout_removed=meta.get("output_dropout_removed") or "",
              default_image_size=_image_size(meta.get("default_image_size")),
              optimize_graphs=optimize_graphs)


def _images(seed: int, purpose: int, batch: int, size: Sequence[int]) -> np.ndarray:
  """Uniform [0, 1) images, the same for a (seed, purpose, batch, size) anywhere."""
  rng = np.random.default_rng([seed, purpose, batch, size[0], size[1]])
  return rng.uniform(0.0, 1.0, (batch, size[0], size[1], 3)).astype(np.float32)


def _sizes(module: legacy_format.LegacyModule, spec: Spec,
           sig: legacy_format.Signature) -> list[tuple[int, int]]:
  """The input resolutions: the default, and another for variable-size modules."""
  shape = sig.inputs["images"].shape
  if shape is not None and shape[1] and shape[2]:
    return [(shape[1], shape[2])]
  default = (spec.default_image_size or module.image_module_info_size() or
             FALLBACK_IMAGE_SIZE)
  h, w = default
  if h >= LARGE_IMAGE:  # Cheaper: a smaller, non-square second resolution.
    return [(h, w), (h // 2, w // 2 + SECOND_RESOLUTION_DELTA[1])]
  return [(h, w), (h + SECOND_RESOLUTION_DELTA[0], w + SECOND_RESOLUTION_DELTA[1])]


def _tags(module: legacy_format.LegacyModule, spec: Spec,
          sig: legacy_format.Signature) -> list[tuple[str, np.ndarray]]:
  """(batch tag, images): every batch size at the default resolution, the
  smallest at the others."""
  result = []
  for i, size in enumerate(_sizes(module, spec, sig)):
    for batch in (BATCH_SIZES if i == 0 else BATCH_SIZES[:1]):
      result.append((f"b{batch}_{size[0]}x{size[1]}",
                     _images(spec.seed, 0, batch, size)))
  return result


def _image_signatures(module: legacy_format.LegacyModule
                      ) -> dict[str, legacy_format.Signature]:
  return {name: s for name, s in module.inference.signatures.items()
          if "images" in s.inputs and s.inputs["images"].dtype == tf.float32}


def _hparam_tensors(module: legacy_format.LegacyModule, spec: Spec,
                    images_tensor: str) -> dict[str, str]:
  """Hyperparameter name -> tensor in the train graph (or inference graph)."""
  variant = module.train or module.inference
  result = {}
  for name in spec.hparams:
    for sig in variant.signatures.values():
      if (name in sig.inputs and "images" in sig.inputs and
          sig.inputs["images"].tensor_name == images_tensor):
        result[name] = sig.inputs[name].tensor_name
        break
  return result


def _train_steps(hparams: Mapping[str, str]) -> list[tuple[str, dict[str, float]]]:
  """(check prefix, hyperparameter values): the default step, then each
  hyperparameter at a non-default value."""
  return [("train", {})] + [
      (f"train[{name}={NON_DEFAULT_HPARAM}]", {name: NON_DEFAULT_HPARAM})
      for name in sorted(hparams)]


def _train_images(module: legacy_format.LegacyModule, spec: Spec) -> np.ndarray:
  """The training step's images, at the smallest resolution (batch-norm
  statistics, moving averages and gradients do not depend on it)."""
  sizes = _sizes(module, spec, module.inference.signatures[spec.signature])
  return _images(spec.seed, 1, TRAIN_BATCH, min(sizes, key=lambda s: s[0] * s[1]))


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


# -- the reference side ------------------------------------------------------------

@dataclasses.dataclass
class ExpectedStep:
  """One training step of the TF1 module (see `reference.TrainStepResult`)."""

  error: str = ""  # Why the step could not run ("" if it ran).
  output: Optional[np.ndarray] = None
  random_values: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  variable_names: list[str] = dataclasses.field(default_factory=list)
  changed: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  gradients: Optional[dict[str, np.ndarray]] = None  # The default step only.


@dataclasses.dataclass
class Expected:
  """What the TF1 module computed for a `Spec`: plain data, picklable."""

  spec: Spec
  outputs: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
  output_dropout: str = ""  # The train graph's output dropout node, if any.
  random_ops: list[str] = dataclasses.field(default_factory=list)
  steps: dict[str, ExpectedStep] = dataclasses.field(default_factory=dict)
  regularization: tuple[list[float], float] = dataclasses.field(
      default_factory=lambda: ([], 0.0))  # (each loss, their total)
  seconds: float = 0.0


def reference_side(old_path: str, spec: Spec, *,
                   module: Optional[legacy_format.LegacyModule] = None,
                   checkpoint: Optional[Mapping[str, np.ndarray]] = None
                   ) -> Expected:
  """Runs the TF1 module at `old_path` (graph mode, Session) for `spec`.

  Needs nothing of the converted model, so it can run before the model
  exists, in another process (`start_reference`). In this process, the
  caller may pass the module and its checkpoint, already read.
  """
  start = time.monotonic()
  module = module or legacy_format.read_module(old_path)
  expected = Expected(spec=spec)
  with _deterministic_ops(), reference_lib.ReferenceModule(
      old_path, module=module, checkpoint=checkpoint,
      optimize_graphs=spec.optimize_graphs) as ref:
    sigs = _image_signatures(module)
    feeds = {s.inputs["images"].tensor_name for s in sigs.values()}
    fetches = {o.tensor_name: o.tensor_name for s in sigs.values()
               for o in s.outputs.values()}
    for sig in sigs.values():
      for tag, x in _tags(module, spec, sig):
        if tag not in expected.outputs:
          expected.outputs[tag] = ref.infer_tensors(fetches,
                                                    {t: x for t in feeds})
    if spec.signature:
      _reference_training(ref, module, spec, expected)
    expected.regularization = ref.regularization_losses()
  expected.seconds = time.monotonic() - start
  return expected


def _reference_training(ref: reference_lib.ReferenceModule,
                        module: legacy_format.LegacyModule, spec: Spec,
                        expected: Expected) -> None:
  sig_name, key = spec.signature, spec.output_key
  sig = (module.train or module.inference).signatures.get(sig_name)
  if sig is None:
    return  # The converted side reports 'train/signature'.
  match = ref.output_dropout(sig_name, key)
  expected.output_dropout = match.output_node if match else ""
  bypass = bool(spec.output_dropout_removed)
  if bypass and expected.output_dropout != spec.output_dropout_removed:
    return  # The converted side reports 'train/output_dropout'.
  hparams = _hparam_tensors(module, spec, sig.inputs["images"].tensor_name)
  x = _train_images(module, spec)
  try:
    expected.random_ops = ref.train_random_ops(sig_name, key,
                                               bypass_output_dropout=bypass)
  except (ValueError, KeyError) as e:
    for prefix, _ in _train_steps(hparams):
      expected.steps[prefix] = ExpectedStep(error=_first_line(e))
    return
  for prefix, values in _train_steps(hparams):
    try:
      r = ref.train_step(
          sig_name, key, x, bypass_output_dropout=bypass, seed=spec.seed,
          feeds_by_tensor={hparams[n]: np.float32(v) for n, v in values.items()})
    except (TypeError, ValueError, KeyError, tf.errors.OpError) as e:
      expected.steps[prefix] = ExpectedStep(error=_first_line(e))
      continue
    finally:
      ref.reset()
    expected.steps[prefix] = ExpectedStep(
        output=r.output, random_values=r.random_values,
        variable_names=sorted(r.variables_after),
        changed={n: v for n, v in r.variables_after.items()
                 if not np.array_equal(v, r.variables_before[n])},
        gradients=r.gradients if prefix == "train" else None)


class PendingReference:
  """The reference side of one verification, running or to be run.

  In a child process (`isolation.start_isolated`), it runs while the caller
  converts or loads the model: the TF1 Session side needs only the module.
  Otherwise it runs in this process when its result is first asked for.
  A child that has finished stays (TensorFlow imported) for `offload`.
  """

  def __init__(self, old_path: str, spec: Spec, in_child: bool):
    self.spec = spec
    self.in_child = in_child
    self._old_path = old_path
    self._value: Optional[Expected] = None
    self._child = (isolation.start_isolated(
        "migrate.verify:reference_side", old_path, spec, reusable=True,
        what=f"{old_path} (reference side of the parity checks)")
                   if in_child else None)

  def result(self, **read: Any) -> Expected:
    """The `Expected`; `read` (module=, checkpoint=) is passed on to
    `reference_side` when it runs in this process."""
    if self._value is None:
      if self._child is not None:
        self._value = self._child.result()
      else:
        self._value = reference_side(self._old_path, self.spec, **read)
    return self._value

  def offload(self, fn: str, *args: Any) -> Optional[isolation.IsolatedCall]:
    """Starts `fn(*args)` in the child if it has already finished the
    reference side (else None: it would only queue behind it)."""
    if self._child is None or not (self._value is not None or
                                   self._child.ready()):
      return None
    self.result()
    return self._child.submit(
        fn, *args, what=f"{self._old_path} (converted side of the parity checks)")

  def cancel(self) -> None:
    """Stops the child, if any (a later `result()` runs in this process if
    the child had not answered)."""
    if self._child is not None:
      self._child.cancel()
      self._child = None


def start_reference(old_path: str, spec: Spec, *, parallel: Optional[bool] = None,
                    module: Optional[legacy_format.LegacyModule] = None
                    ) -> PendingReference:
  """Starts the reference side for `spec`.

  `parallel=None` runs it in a child process when
  `preflight.reference_child_pays` (2 CPUs, a checkpoint of 4 MiB);
  otherwise it runs in this process, when its result is first needed. A
  child prestarted for "migrate.verify" (`isolation.prestart`) is used.
  Even on 2 CPUs the child pays for its own TensorFlow import: conversion + verification of ResNet-v2-50 took 8.0-9.1 s with it
  and 9.6-10.6 s without (MobileNet-v2: 6.6-7.2 s against 7.7-8.2 s).
  The child inherits this process's environment, thread settings included:
  the same kernels on a different number of threads sum in another order
  (ResNet-v2-50's features then differ by 5e-5, over the inference
  tolerance).
  """
  if parallel is None:
    module = module or legacy_format.read_module(old_path)
    parallel = preflight.reference_child_pays(module.checkpoint_prefix)
  return PendingReference(old_path, spec, in_child=parallel)


# -- the converted side and the checks ---------------------------------------------

@dataclasses.dataclass
class ConvertedInference:
  """The converted model's inference runs (`_Verifier.run_inference`), as data."""

  signature_outputs: dict[tuple[str, str], dict[str, np.ndarray]]
  call_outputs: dict[str, np.ndarray]
  regularization: list[float]
  warnings: list[str]


def converted_inference(old_path: str, new_path: str, spec: Spec
                        ) -> ConvertedInference:
  """Runs the converted model's serving signatures, `__call__` in inference
  mode and the regularization losses for `spec`: what `verify` offloads to
  the reference child once that has finished, while it runs the training
  steps itself. Another process holds its own copy of the variables, so the
  training steps' updates cannot reach these runs."""
  with _grappler(spec.optimize_graphs), _deterministic_ops():
    v = _Verifier(old_path, new_path, spec.seed, None, None,
                  spec.optimize_graphs)
    v.spec = spec
    v.run_inference()
  return ConvertedInference(v.signature_outputs, v.call_outputs,
                            v.regularization, v.report.warnings)



@dataclasses.dataclass
class _ActualStep:
  """One training step of the converted model (cf. `ExpectedStep`)."""

  error: str = ""
  output: Optional[np.ndarray] = None
  changed: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  gradients: Optional[dict[str, np.ndarray]] = None


class _Verifier:
  """The converted model's side, and the checks against an `Expected`."""

  def __init__(self, old_path: str, new_path: str, seed: int,
               signature: Optional[str], output_key: Optional[str],
               optimize_graphs: bool):
    self.report = ParityReport(old_path=old_path, new_path=new_path)
    self.module = legacy_format.read_module(old_path)
    self.new = tf.saved_model.load(new_path)
    self.meta = _metadata(self.new)
    self.spec = _spec_from_metadata(self.meta, self.module, seed, optimize_graphs)
    self.requested = (signature, output_key)
    self.variables = {_var_name(v): v for v in self.new.variables}
    self.trainable = {_var_name(v): v for v in self.new.trainable_variables}
    self.fake_quant = any(node.op.startswith("FakeQuant")
                          for variant in self.module.variants.values()
                          for node in variant.graph_def.node)
    self.saved_values = {n: v.numpy() for n, v in self.variables.items()}
    self.checkpoint: dict[str, np.ndarray] = {}
    # What the converted model computed, filled by `run_converted`.
    self.signature_outputs: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    self.call_outputs: dict[str, np.ndarray] = {}
    self.steps: dict[str, _ActualStep] = {}
    self.regularization: list[float] = []

  def tolerance(self, name: str) -> str:
    """`name`, or its fake-quant entry for modules with FakeQuant* ops."""
    return f"{name}_fake_quant" if self.fake_quant else name

  def add(self, result: CheckResult) -> CheckResult:
    self.report.checks.append(result)
    return result

  def restore_variables(self, names: Optional[Sequence[str]] = None) -> None:
    """Puts the saved values back (into `names` only, if given)."""
    for name in (self.variables if names is None else names):
      self.variables[name].assign(self.saved_values[name])

  # ---- running the converted model

  def run_converted(self, inference_elsewhere: bool = False) -> None:
    """Everything the checks need from the converted model (but
    `run_inference` if `inference_elsewhere`: another process runs it).

    Tracing the training steps (building their backward pass) is Python
    work and running the signatures is mostly TensorFlow's C++ work, which
    releases the GIL: a background thread traces while this one runs the
    inference functions.
    """
    if inference_elsewhere:
      self.checkpoint = reference_lib.read_checkpoint(self.module)
      self.run_training(self.trace_steps(eager=True))
      return
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      steps = pool.submit(self.trace_steps)
      regularization = pool.submit(self.regularization_function)
      self.checkpoint = reference_lib.read_checkpoint(self.module)
      self.run_signatures()
      self.run_call()
      steps = steps.result()
      regularization = regularization.result()
    self.run_training(steps)
    self.run_regularization(regularization)

  def run_inference(self) -> None:
    """What no training step changes: the serving signatures, `__call__` in
    inference mode, the regularization losses."""
    self.run_signatures()
    self.run_call()
    self.run_regularization(self.regularization_function())

  def take_inference(self, done: ConvertedInference) -> None:
    """What `run_inference` found, run in another process."""
    self.signature_outputs = done.signature_outputs
    self.call_outputs = done.call_outputs
    self.regularization = done.regularization
    self.report.warnings.extend(done.warnings)

  def regularization_function(self) -> Optional[Callable]:
    """All regularization losses in one traced function (one instantiation
    instead of one per loss: ResNet-v2-50 has 54), or None."""
    losses = list(self.new.regularization_losses)
    if not losses:
      return None
    return tf.function(lambda: [f() for f in losses]).get_concrete_function()

  def run_regularization(self, fn: Optional[Callable]) -> None:
    self.regularization = [float(v) for v in fn()] if fn is not None else []

  def trace_steps(self, eager: bool = False
                  ) -> dict[str, tuple[Any, dict[str, float]]]:
    """Each training step: prefix -> (its traced function, or why it could
    not be traced, or None if `eager`; its hyperparameter values).

    Eager steps build the same backward pass once instead of tracing it into
    another function and instantiating that (ResNet-v2-50: 2.2 s instead of
    3.3 s), but cannot overlap the inference runs, which read the moving
    averages that a step updates.
    """
    steps: dict[str, tuple[Any, dict[str, float]]] = {}
    sig = (self.module.train or self.module.inference).signatures.get(
        self.spec.signature)
    if not self.spec.signature or sig is None:
      return steps
    hparams = _hparam_tensors(self.module, self.spec,
                              sig.inputs["images"].tensor_name)
    x = _train_images(self.module, self.spec)
    watched = list(self.trainable.values())
    new = self.new

    def make_step(with_gradients: bool) -> Callable:
      def step(images, probe, hparam_values):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
          tape.watch(watched)
          out = new(images, training=True, **hparam_values)
          loss = tf.reduce_sum(out * probe)
        return out, (tape.gradient(loss, watched) if with_gradients else [])
      return step

    for prefix, values in _train_steps(hparams):
      if eager:
        steps[prefix] = (None, values)
        continue
      try:
        fn = tf.function(make_step(prefix == "train")).get_concrete_function(
            tf.TensorSpec((None, *x.shape[1:]), tf.float32),
            tf.TensorSpec(None, tf.float32),
            {n: tf.TensorSpec([], tf.float32) for n in values})
      except (TypeError, ValueError, KeyError, tf.errors.OpError) as e:
        fn = _first_line(e)
      steps[prefix] = (fn, values)
    return steps

  def signature_inputs(self) -> list[tuple[str, str, legacy_format.Signature]]:
    """(saved signature, module signature, its spec) for each image signature."""
    sigs = _image_signatures(self.module)
    saved = set(self.new.signatures)
    result = []
    for name in sorted((set(self.module.inference.signatures) |
                        {"serving_default"}) & saved):
      ref_name = (self.meta.get("source_signature") if name == "serving_default"
                  else name)
      if ref_name in sigs:
        result.append((name, ref_name, sigs[ref_name]))
    return result

  def run_signatures(self) -> None:
    """Every serving signature: `serving_default` on every batch tag, the
    others (the same function, other outputs selected) on one image at the
    smallest resolution."""
    defaults = legacy_format.placeholder_defaults(self.module.inference.graph_def)
    for name, _, sig in self.signature_inputs():
      fn = self.new.signatures[name]
      tags = _tags(self.module, self.spec, sig)
      if name != "serving_default":  # One image, at the smallest resolution.
        tags = [min(tags, key=lambda t: t[1].size)]
      for tag, x in tags:
        inputs = {"images": x}
        for key, info in sig.inputs.items():
          if key != "images":
            inputs[key] = defaults.get(info.tensor_name,
                                       np.asarray(0.99, info.dtype.as_numpy_dtype))
        try:
          self.signature_outputs[(name, tag)] = {
              k: v.numpy() for k, v in fn(**{
                  k: tf.constant(v) for k, v in inputs.items()}).items()}
        except (TypeError, ValueError, tf.errors.OpError) as e:
          self.signature_outputs[(name, tag)] = {}
          self.report.warnings.append(
              f"signature '{name}' failed on {tag}: {type(e).__name__}: "
              f"{str(e).splitlines()[0][:200]}")

  def run_call(self) -> None:
    """`__call__` in inference mode on every batch tag (if the metadata
    names the signature behind it; else `check_metadata` fails)."""
    if not self.spec.signature:
      return
    sig = self.module.inference.signatures[self.spec.signature]
    for tag, x in _tags(self.module, self.spec, sig):
      self.call_outputs[tag] = np.asarray(self.new(tf.constant(x)))

  def run_training(self, steps: Mapping[str, tuple[Any, dict[str, float]]]
                   ) -> None:
    """The training steps, unfed: right unless the training path has random
    ops, in which case `check_training` runs them again, fed."""
    x = _train_images(self.module, self.spec)
    for prefix, (fn, values) in steps.items():
      if isinstance(fn, str):
        self.steps[prefix] = _ActualStep(error=fn)
        continue
      if fn is None:
        call = lambda images, **kwargs: self.new(images, training=True, **kwargs)
        self.steps[prefix] = self.train_step(
            self.eager_step(call, with_gradients=prefix == "train"), x, values)
        continue

      def run(images, kwargs, fn=fn):
        static = fn.structured_outputs[0].shape
        if static.rank is not None and static[1:].is_fully_defined():
          shape = (images.shape[0], *static[1:])
        else:  # Run once for the output's shape (the updates are undone).
          shape = fn(images, tf.zeros(()), kwargs)[0].shape
          self.restore_variables()
        out, grads = fn(images, tf.constant(
            reference_lib.probe_weights(self.spec.seed, shape)), kwargs)
        return out, grads or None

      self.steps[prefix] = self.train_step(run, x, values)

  def eager_step(self, call: Callable, with_gradients: bool) -> Callable:
    """A step runner (see `train_step`) for `call`, differentiated eagerly."""
    def run(images, kwargs):
      watched = list(self.trainable.values())
      with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(watched)
        out = call(images, **kwargs)
        probe = reference_lib.probe_weights(self.spec.seed, out.shape)
        loss = tf.reduce_sum(out * probe)
      return out, (tape.gradient(loss, watched) if with_gradients else None)
    return run

  def train_step(self, run: Callable, x: np.ndarray,
                 hparam_values: Mapping[str, float]) -> _ActualStep:
    """One training step; the variables are put back after it.

    `run(images, hparams)` returns the output and the gradients of
    `sum(output * probe)` with respect to the trainable variables (or None).
    """
    kwargs = {n: tf.constant(v, tf.float32) for n, v in hparam_values.items()}
    restored = False
    try:
      out, grads = run(tf.constant(x), kwargs)
      changed = {}
      for name, var in self.variables.items():
        value = var.numpy()
        if not np.array_equal(value, self.saved_values[name]):
          changed[name] = value
      self.restore_variables(list(changed))
      restored = True
    except (TypeError, ValueError, KeyError, tf.errors.OpError) as e:
      return _ActualStep(error=_first_line(e))
    finally:
      if not restored:
        self.restore_variables()
    gradients = None
    if grads is not None:
      gradients = {}
      for n, g in zip(self.trainable, grads):
        if g is not None:
          gradients[n] = (tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices)
                          else g).numpy()
    return _ActualStep(output=out.numpy(), changed=changed, gradients=gradients)

  # ---- the checks

  def check_all(self, expected: Expected) -> None:
    if self.check_metadata():
      self.check_variables(expected)
      self.check_signatures(expected)
      self.check_call_inference(expected)
      self.check_training(expected)
    else:
      self.check_variables(expected)
      self.check_signatures(expected)
    self.check_regularization(expected)

  def check_metadata(self) -> bool:
    sigs = self.module.inference.signatures
    sig, key = self.meta.get("source_signature"), self.meta.get("source_output_key")
    ok = sig in sigs and key in sigs[sig].outputs
    self.add(compare_lib.check(
        "metadata/source", ok,
        f"metadata names output '{sig}/{key}'" + ("" if ok else
        f", which the module does not have (signatures: {', '.join(sorted(sigs))})")))
    sha = self.meta.get("source_sha256")
    self.add(compare_lib.check(
        "metadata/source_sha256", sha == self.module.saved_model_sha256,
        f"converted from saved_model.pb {sha}, the module's is "
        f"{self.module.saved_model_sha256}"))
    wanted_sig, wanted_key = self.requested
    if wanted_sig is not None or wanted_key is not None:
      same = ((wanted_sig is None or wanted_sig == sig) and
              (wanted_key is None or wanted_key == key))
      self.add(compare_lib.check(
          "metadata/requested_output", same,
          f"asked for '{wanted_sig}/{wanted_key}', the model exposes '{sig}/{key}'"))
    has_train = bool(self.meta.get("has_train_graph"))
    module_has_train = self.module.train is not None
    self.add(compare_lib.check(
        "metadata/has_train_graph", has_train == module_has_train,
        f"metadata says {has_train}, the module "
        f"{'has' if module_has_train else 'has no'} train graph"))
    return ok

  def check_variables(self, reference: Expected) -> None:
    module_vars = {v.name for variant in self.module.variants.values()
                   for v in variant.variables}
    expected = {n: self.checkpoint[n] for n in module_vars if n in self.checkpoint}
    self.add(compare_lib.compare_many(
        "variables/values", self.saved_values, expected, "variables"))
    trainable = {v.name for variant in self.module.variants.values()
                 for v in variant.variables if v.trainable}
    # `trainable_variables` holds what `__call__`'s training computation
    # uses: the module's trainable variables that its gradient reaches.
    step = reference.steps.get("train")
    if step is not None and step.gradients is not None:
      trainable &= set(step.gradients)
    self.add(compare_lib.check(
        "variables/trainable", set(self.trainable) == trainable,
        f"{len(self.trainable)} trainable variables, the module has "
        f"{len(trainable)} that the output's gradient reaches" +
        _diff_names(set(self.trainable), trainable)))

  def check_signatures(self, expected: Expected) -> None:
    """Every TF1 signature and output key against the serving signatures."""
    sigs = self.module.inference.signatures
    saved = set(self.new.signatures)
    expected_names = set(sigs) | {"serving_default"}
    self.add(compare_lib.check(
        "signatures/names", expected_names <= saved,
        f"saved signatures {sorted(saved)}, expected {sorted(expected_names)}"))
    for name, _, sig in self.signature_inputs():
      actual: dict[str, dict[str, np.ndarray]] = {}
      wanted: dict[str, dict[str, np.ndarray]] = {}
      for tag in (t for (n, t) in self.signature_outputs if n == name):
        ref_out = {k: expected.outputs[tag][o.tensor_name]
                   for k, o in sig.outputs.items()}
        new_out = self.signature_outputs[(name, tag)]
        for key in set(ref_out) | set(new_out):
          if key in ref_out:
            wanted.setdefault(key, {})[tag] = ref_out[key]
          if key in new_out:
            actual.setdefault(key, {})[tag] = new_out[key]
      for key in sorted(set(wanted) | set(actual)):
        self.add(compare_lib.compare_many(
            f"signature/{name}/{key}", actual.get(key, {}),
            wanted.get(key, {}), self.tolerance("inference")))

  def check_call_inference(self, expected: Expected) -> None:
    sig = self.module.inference.signatures[self.spec.signature]
    tensor = sig.outputs[self.spec.output_key].tensor_name
    actual, wanted, widths = {}, {}, set()
    conventions = []
    for tag, x in _tags(self.module, self.spec, sig):
      wanted[tag] = expected.outputs[tag][tensor]
      out = actual[tag] = self.call_outputs[tag]
      if out.dtype != np.float32 or out.ndim != 2:
        conventions.append(f"{tag}: {out.dtype.name} of shape {list(out.shape)}")
      elif out.shape[0] != x.shape[0]:
        conventions.append(f"{tag}: batch {out.shape[0]} for {x.shape[0]} images")
      else:
        widths.add(int(out.shape[1]))
    self.add(compare_lib.compare_many("call/inference", actual, wanted,
                                      self.tolerance("inference")))
    self.add(compare_lib.check(
        "call/image_api", not conventions,
        "float32 [batch, width] for every input" if not conventions else
        "expected a float32 [batch, width] output, found " + "; ".join(conventions)))
    declared = int(self.meta.get("num_features") or 0) or int(
        self.meta.get("num_classes") or 0)
    ok = len(widths) == 1 and (not declared or widths == {declared})
    self.add(compare_lib.check(
        "call/output_width", ok,
        f"output widths {sorted(widths)} over input sizes "
        f"{_sizes(self.module, self.spec, sig)}; "
        f"metadata says {declared or 'unknown'}"))
    if self.meta.get("output_kind") == plan_lib.CLASSIFICATION and all(
        actual[t].shape == wanted[t].shape for t in wanted):
      a = np.concatenate([actual[t] for t in sorted(wanted)])
      e = np.concatenate([wanted[t] for t in sorted(wanted)])
      self.add(compare_lib.top_k("call/top1", a, e, 1))
      self.add(compare_lib.top_k("call/top5", a, e, 5))

  def check_training(self, expected: Expected) -> None:
    sig_name, key = self.spec.signature, self.spec.output_key
    sig = (self.module.train or self.module.inference).signatures.get(sig_name)
    if sig is None:
      self.add(compare_lib.check(
          "train/signature", False,
          f"signature '{sig_name}' is missing from the train graph"))
      return
    removed = self.spec.output_dropout_removed
    match = expected.output_dropout
    if removed:
      ok = match == removed
      self.add(compare_lib.check(
          "train/output_dropout", ok,
          f"metadata says the output dropout '{removed}' was removed; the "
          f"train graph's output dropout is '{match or None}'"))
      if not ok:
        return
      self.report.warnings.append(
          f"the train graph applies dropout to the output features (node "
          f"'{removed}'); in training mode the converted model outputs the "
          f"dropout's input, as the image feature vector API requires")
    elif match:
      self.report.warnings.append(
          f"the train graph applies dropout to the output features (node "
          f"'{match}') and the converted model keeps it in "
          f"training mode, against the image feature vector API")
    hparams = _hparam_tensors(self.module, self.spec,
                              sig.inputs["images"].tensor_name)
    missing = sorted(set(self.spec.hparams) - set(hparams))
    if missing:
      self.add(compare_lib.check(
          "train/hparams", False,
          f"hyperparameters {missing} are not inputs of the module's graph"))
    if expected.random_ops:
      self.report.method_for_random_ops = METHOD_FED
    x = _train_images(self.module, self.spec)
    for prefix, values in _train_steps(hparams):
      ref = expected.steps.get(prefix, ExpectedStep(error="not run"))
      actual = self.steps.get(prefix, _ActualStep(error="not run"))
      if not ref.error and ref.random_values:
        try:
          call = self.fed_call(list(values), ref.random_values, x.shape, prefix)
        except (TypeError, ValueError, KeyError, tf.errors.OpError) as e:
          actual = _ActualStep(error=_first_line(e))
        else:
          if call is None:
            continue  # The 'random_ops' check failed.
          actual = self.train_step(
              self.eager_step(call, with_gradients=prefix == "train"), x, values)
      if ref.error or actual.error:
        where = "the module's" if ref.error else "the converted model's"
        self.add(compare_lib.check(
            f"{prefix}/run", False,
            f"{where} training step failed: {ref.error or actual.error}"))
        continue
      self.compare_step(prefix, actual, ref)

  def compare_step(self, prefix: str, actual: _ActualStep,
                   ref: ExpectedStep) -> None:
    self.add(compare_lib.compare(f"{prefix}/output", actual.output, ref.output,
                                 self.tolerance("training_output")))
    changed_new, changed_ref = sorted(actual.changed), sorted(ref.changed)
    # Variables neither side changed are equal by `variables/values`.
    moved = set(changed_ref) | set(changed_new)
    names = set(ref.variable_names)
    self.add(compare_lib.compare_many(
        f"{prefix}/moving_averages",
        {n: actual.changed.get(n, self.saved_values[n]) for n in moved
         if n in self.saved_values},
        {n: ref.changed.get(n, self.checkpoint.get(n)) for n in moved if n in names},
        self.tolerance("moving_averages")))
    self.add(compare_lib.check(
        f"{prefix}/updated_variables", changed_ref == changed_new,
        f"{len(changed_new)} variables updated, the module updates "
        f"{len(changed_ref)}" + _diff_names(set(changed_new), set(changed_ref))))
    if ref.gradients is None or actual.gradients is None:
      return
    if actual.output.shape != ref.output.shape:
      return  # The output check failed; the probes differ in shape.
    # A variable the output does not depend on has no gradient in the TF1
    # Session (None) but may get an exact zero from the TF2 function (whose
    # other outputs use it): both mean zero, so both sides fill in zeros.
    actual_grads, expected_grads = {}, {}
    for n, var in self.trainable.items():
      zeros = np.zeros(var.shape, var.dtype.as_numpy_dtype)
      actual_grads[n] = actual.gradients.get(n, zeros)
      expected_grads[n] = ref.gradients.get(n, zeros)
    for n in ref.gradients:
      expected_grads.setdefault(n, ref.gradients[n])  # Unmatched: fails below.
    scale = max([float(np.abs(g).max()) for g in ref.gradients.values()] + [1e-30])
    self.add(compare_lib.compare_many("train/gradients", actual_grads,
                                      expected_grads, self.tolerance("gradients"),
                                      scale=scale))
    norms = {n: np.float64(np.linalg.norm(g.astype(np.float64)))
             for n, g in actual_grads.items()}
    ref_norms = {n: np.float64(np.linalg.norm(np.asarray(g, np.float64)))
                 for n, g in expected_grads.items()}
    self.add(compare_lib.compare_many(
        "train/gradient_norms", norms, ref_norms, self.tolerance("gradient_norms"),
        scale=max(list(ref_norms.values()) + [1e-30])))

  def fed_call(self, hparam_names: Sequence[str],
               random_values: Mapping[str, np.ndarray], shape, prefix: str
               ) -> Optional[Callable]:
    concrete = _training_concrete(self.new, hparam_names)
    fed = _FedTrainFunction(concrete, random_values, shape)
    ok = not fed.unmatched_reference and not fed.unmatched_converted
    self.add(compare_lib.check(
        f"{prefix}/random_ops", ok,
        f"{len(fed.matched)} random ops fed on both sides" if ok else
        f"random ops of the module not found in the converted function: "
        f"{fed.unmatched_reference[:3]}; random ops of the converted function "
        f"without a counterpart: {fed.unmatched_converted[:3]}"))
    return fed if ok else None

  def check_regularization(self, expected: Expected) -> None:
    ref_values, ref_total = expected.regularization
    new_values = self.regularization
    self.add(compare_lib.check(
        "regularization/count", len(new_values) == len(ref_values),
        f"{len(new_values)} regularization losses, the module has "
        f"{len(ref_values)}"))
    self.add(compare_lib.compare(
        "regularization/total", np.float32(sum(new_values)),
        np.float32(ref_total), "regularization"))
    if len(new_values) == len(ref_values):
      self.add(compare_lib.compare(
          "regularization/values", np.sort(np.asarray(new_values, np.float32)),
          np.sort(np.asarray(ref_values, np.float32)), "regularization"))


def _diff_names(actual: set[str], expected: set[str]) -> str:
  extra, missing = sorted(actual - expected), sorted(expected - actual)
  parts = []
  if extra:
    parts.append(f"unexpected: {extra[:3]}")
  if missing:
    parts.append(f"missing: {missing[:3]}")
  return (" (" + "; ".join(parts) + ")") if parts else ""


@contextlib.contextmanager
def _grappler(enabled: bool) -> Iterator[None]:
  """Grappler on or off for the TF2 functions run in this block.

  The setting is TensorFlow's process-wide optimizer option; the previous
  value is put back on exit.
  """
  previous = tf.config.optimizer.get_experimental_options().get(
      "disable_meta_optimizer", False)
  tf.config.optimizer.set_experimental_options(
      {"disable_meta_optimizer": not enabled})
  try:
    yield
  finally:
    tf.config.optimizer.set_experimental_options(
        {"disable_meta_optimizer": previous})


@contextlib.contextmanager
def _deterministic_ops() -> Iterator[None]:
  """TensorFlow's op determinism on in this block (process-wide), then as before.

  Without it, some CPU kernels split a reduction across threads and add the
  parts in the order they finish: the same graph on the same input differs
  by an ulp from run to run (mobilenet_quantops' training output: 2 distinct
  results in 30 runs). Through FakeQuant* ops such an ulp can move a value
  by a whole quantization step, and a correct conversion fails parity.
  """
  previous = tf_config.is_op_determinism_enabled()
  tf_config.enable_op_determinism()
  try:
    yield
  finally:
    if not previous:
      tf_config.disable_op_determinism()  # Public API has only enable_*.


def verify(old_path: str, new_path: str, *, seed: int = 0,
           signature: Optional[str] = None,
           output_key: Optional[str] = None,
           optimize_graphs: bool = False,
           reference: Optional[PendingReference] = None,
           parallel: Optional[bool] = None) -> ParityReport:
  """Compares the converted model at `new_path` with the TF1 module at `old_path`.

  `signature`/`output_key`, if given, are what the user asked `__call__` to
  expose; the model's metadata must name them. Returns a `ParityReport`
  (`report.passed`); raises only for unreadable inputs.

  The converted model runs here; the TF1 module's side comes from
  `reference` (started earlier with `start_reference`, e.g. while the model
  was being converted) if it was made for the same `Spec`, else it is started
  now (`parallel` as in `start_reference`). Both sides run their graphs as
  written, with Grappler off (`optimize_graphs=False`): parity is a property
  of the graphs, and Grappler's rewrites (layout, op fusion), which
  TensorFlow applies alike to any model, would cost each of the ~10
  functions a verification runs another optimisation pass (a quarter of
  verification's time on ResNet-v2-50: 11.0 s -> 8.5 s). `optimize_graphs=True` verifies with
  Grappler on; the tolerance table holds for both (tests/test_parity.py).
  Op determinism is on while both sides run (see `_deterministic_ops`).
  """
  start = time.monotonic()
  with _grappler(optimize_graphs), _deterministic_ops():
    v = _Verifier(old_path, new_path, seed, signature, output_key,
                  optimize_graphs)
    if reference is None or reference.spec != v.spec:
      if reference is not None:
        reference.cancel()
      reference = start_reference(old_path, v.spec, parallel=parallel,
                                  module=v.module)
    try:
      # A reference child that has already finished (the CLI prestarts it:
      # it works while this process converts) runs the inference half of
      # the converted side while this process runs the training steps. On
      # 2 CPUs, the CLI's verification of ResNet-v2-50 took 4.9-5.2 s so,
      # 5.9-6.3 s all here.
      inference = reference.offload("migrate.verify:converted_inference",
                                    old_path, new_path, v.spec)
      v.run_converted(inference_elsewhere=inference is not None)
      if inference is not None:
        v.take_inference(inference.result())
      here, child = "this process", "child process"
      v.report.processes = {
          "module (TF1 Session)": child if reference.in_child else here,
          "converted model, inference and regularization":
              child if inference else here,
          "converted model, training": here}
      v.check_all(reference.result(module=v.module, checkpoint=v.checkpoint))
    finally:
      reference.cancel()  # (The loaded model is dropped: no need to put
      # its variables back; each training step did.)
  v.report.seconds = time.monotonic() - start
  return v.report
