"""VERIFY stage: does the converted model compute what the TF1 module did?

`verify(old_path, new_path)` loads the converted SavedModel with
`tf.saved_model.load`, runs the TF1 module with `migrate.reference` (graph
mode, Session) and compares, with the one helper `migrate.compare` and the one
table `migrate.tolerances`:

- the variables, bit for bit, against the module's checkpoint;
- every TF1 signature and every output key (the serving signatures), and
  `serving_default`, at batch sizes 1 and 3 and, for variable-size modules,
  two resolutions;
- `__call__` in inference mode, its dtype, rank and width (the image API),
  and top-1/top-5 for classifiers;
- one training step: the output of `__call__(x, training=True, **hparams)`,
  every variable after it (moving averages), the gradients of
  `sum(output * probe)`; again with each hyperparameter at a non-default value;
- the regularization losses (each, and their total).

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

import dataclasses
import json
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from tensorflow.python.framework import function_def_to_graph

from migrate import compare as compare_lib
from migrate import legacy_format
from migrate import reference as reference_lib
from migrate import tolerances

CheckResult = compare_lib.CheckResult
BATCH_SIZES = (1, 2)
TRAIN_BATCH = 2
FALLBACK_IMAGE_SIZE = (32, 32)
SECOND_RESOLUTION_DELTA = (8, 16)
LARGE_IMAGE = 128
NON_DEFAULT_HPARAM = 0.5
CLASSIFICATION = "image_classification"
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


# -- the checks ------------------------------------------------------------------

class _Verifier:
  """State shared by the checks of one `verify` call."""

  def __init__(self, old_path: str, new_path: str, seed: int,
               signature: Optional[str], output_key: Optional[str]):
    self.report = ParityReport(old_path=old_path, new_path=new_path)
    self.rng = np.random.RandomState(seed)
    self.seed = seed
    self.module = legacy_format.read_module(old_path)
    self.ref = reference_lib.ReferenceModule(old_path, module=self.module)
    self.new = tf.saved_model.load(new_path)
    self.meta = _metadata(self.new)
    self.requested = (signature, output_key)
    self.variables = {_var_name(v): v for v in self.new.variables}
    self.trainable = {_var_name(v): v for v in self.new.trainable_variables}
    self.fake_quant = any(node.op.startswith("FakeQuant")
                          for variant in self.module.variants.values()
                          for node in variant.graph_def.node)
    self.saved_values = {n: v.numpy() for n, v in self.variables.items()}
    self._images: dict[str, np.ndarray] = {}
    self._ref_outputs: dict[str, dict[str, np.ndarray]] = {}

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

  # ---- inputs

  def images(self, batch: int, size: tuple[int, int]) -> np.ndarray:
    return self.rng.uniform(0.0, 1.0, (batch, size[0], size[1], 3)).astype(
        np.float32)

  def sizes(self, sig: legacy_format.Signature) -> list[tuple[int, int]]:
    shape = sig.inputs["images"].shape
    fixed = shape is not None and shape[1] and shape[2]
    if fixed:
      return [(shape[1], shape[2])]
    default = tuple(self.meta.get("default_image_size") or ()) or ()
    if len(default) != 2 or not all(default):
      default = self.module.image_module_info_size() or FALLBACK_IMAGE_SIZE
    h, w = default
    if h >= LARGE_IMAGE:  # Cheaper: a smaller, non-square second resolution.
      return [(h, w), (h // 2, w // 2 + SECOND_RESOLUTION_DELTA[1])]
    return [(h, w), (h + SECOND_RESOLUTION_DELTA[0], w + SECOND_RESOLUTION_DELTA[1])]

  # ---- metadata and variables

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
    self.add(compare_lib.check(
        "metadata/has_train_graph", has_train == self.ref.has_train_graph,
        f"metadata says {has_train}, the module "
        f"{'has' if self.ref.has_train_graph else 'has no'} train graph"))
    return ok

  def check_variables(self) -> None:
    ckpt = self.ref.checkpoint_values()
    module_vars = {v.name for variant in self.module.variants.values()
                   for v in variant.variables}
    expected = {n: ckpt[n] for n in module_vars if n in ckpt}
    self.add(compare_lib.compare_many(
        "variables/values", self.saved_values, expected, "variables"))
    trainable = {v.name for variant in self.module.variants.values()
                 for v in variant.variables if v.trainable}
    self.add(compare_lib.check(
        "variables/trainable", set(self.trainable) == trainable,
        f"{len(self.trainable)} trainable variables, the module has "
        f"{len(trainable)}" + _diff_names(set(self.trainable), trainable)))

  # ---- inference

  def tags(self, sig: legacy_format.Signature) -> list[tuple[str, np.ndarray]]:
    """(batch tag, images): every batch size at the default resolution, the
    smallest at the others (made once)."""
    result = []
    for i, size in enumerate(self.sizes(sig)):
      for batch in (BATCH_SIZES if i == 0 else BATCH_SIZES[:1]):
        tag = f"b{batch}_{size[0]}x{size[1]}"
        if tag not in self._images:
          self._images[tag] = self.images(batch, size)
        result.append((tag, self._images[tag]))
    return result

  def ref_outputs(self, tag: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every output tensor of every image signature on `x` (one Session run)."""
    if tag not in self._ref_outputs:
      sigs = self.module.inference.signatures.values()
      images = {s.inputs["images"].tensor_name for s in sigs
                if "images" in s.inputs and s.inputs["images"].dtype == tf.float32}
      fetches = {o.tensor_name: o.tensor_name for s in sigs
                 if "images" in s.inputs and s.inputs["images"].tensor_name in images
                 for o in s.outputs.values()}
      self._ref_outputs[tag] = self.ref.infer_tensors(
          fetches, {t: x for t in images})
    return self._ref_outputs[tag]

  def check_signatures(self) -> None:
    """Every TF1 signature and output key against the serving signatures.

    `serving_default` runs on every batch tag; the others (which compute the
    same function with other outputs selected) on one image only, to keep
    verification cheap for big modules.
    """
    sigs = self.module.inference.signatures
    defaults = legacy_format.placeholder_defaults(self.module.inference.graph_def)
    saved = dict(self.new.signatures)
    expected_names = set(sigs) | {"serving_default"}
    self.add(compare_lib.check(
        "signatures/names", expected_names <= set(saved),
        f"saved signatures {sorted(saved)}, expected {sorted(expected_names)}"))
    source = self.meta.get("source_signature")
    for name in sorted(expected_names):
      ref_name = source if name == "serving_default" else name
      if name not in saved or ref_name not in sigs:
        continue
      sig = sigs[ref_name]
      if "images" not in sig.inputs or sig.inputs["images"].dtype != tf.float32:
        continue
      fn = saved[name]
      actual: dict[str, dict[str, np.ndarray]] = {}
      expected: dict[str, dict[str, np.ndarray]] = {}
      tags = self.tags(sig)
      if name != "serving_default":
        tags = tags[:1]  # Batch 1 at the default resolution.
      for tag, x in tags:
        inputs = {"images": x}
        for key, info in sig.inputs.items():
          if key != "images":
            inputs[key] = defaults.get(info.tensor_name,
                                       np.asarray(0.99, info.dtype.as_numpy_dtype))
        all_outputs = self.ref_outputs(tag, x)
        ref_out = {k: all_outputs[o.tensor_name] for k, o in sig.outputs.items()}
        try:
          new_out = {k: v.numpy() for k, v in fn(**{
              k: tf.constant(v) for k, v in inputs.items()}).items()}
        except (TypeError, ValueError, tf.errors.OpError) as e:
          new_out = {}
          self.report.warnings.append(
              f"signature '{name}' failed on {tag}: {type(e).__name__}: "
              f"{str(e).splitlines()[0][:200]}")
        for key in set(ref_out) | set(new_out):
          if key in ref_out:
            expected.setdefault(key, {})[tag] = ref_out[key]
          if key in new_out:
            actual.setdefault(key, {})[tag] = new_out[key]
      for key in sorted(set(expected) | set(actual)):
        self.add(compare_lib.compare_many(
            f"signature/{name}/{key}", actual.get(key, {}),
            expected.get(key, {}), "inference"))

  def call_inputs(self) -> tuple[legacy_format.Signature, str]:
    sig = self.module.inference.signatures[self.meta["source_signature"]]
    return sig, self.meta["source_output_key"]

  def check_call_inference(self) -> None:
    sig, key = self.call_inputs()
    actual, expected, widths = {}, {}, set()
    conventions = []
    for tag, x in self.tags(sig):
      expected[tag] = self.ref_outputs(tag, x)[sig.outputs[key].tensor_name]
      out = self.new(tf.constant(x))
      actual[tag] = out.numpy()
      if out.dtype != tf.float32 or out.shape.rank != 2:
        conventions.append(f"{tag}: {out.dtype.name} of shape {out.shape}")
      elif out.shape[0] != x.shape[0]:
        conventions.append(f"{tag}: batch {out.shape[0]} for {x.shape[0]} images")
      else:
        widths.add(int(out.shape[1]))
    self.add(compare_lib.compare_many("call/inference", actual, expected,
                                      "inference"))
    self.add(compare_lib.check(
        "call/image_api", not conventions,
        "float32 [batch, width] for every input" if not conventions else
        "expected a float32 [batch, width] output, found " + "; ".join(conventions)))
    declared = int(self.meta.get("num_features") or 0) or int(
        self.meta.get("num_classes") or 0)
    ok = len(widths) == 1 and (not declared or widths == {declared})
    self.add(compare_lib.check(
        "call/output_width", ok,
        f"output widths {sorted(widths)} over input sizes {self.sizes(sig)}; "
        f"metadata says {declared or 'unknown'}"))
    if self.meta.get("output_kind") == CLASSIFICATION and all(
        actual[t].shape == expected[t].shape for t in expected):
      a = np.concatenate([actual[t] for t in sorted(expected)])
      e = np.concatenate([expected[t] for t in sorted(expected)])
      self.add(compare_lib.top_k("call/top1", a, e, 1))
      self.add(compare_lib.top_k("call/top5", a, e, 5))

  # ---- training

  def hparam_tensors(self, images_tensor: str) -> dict[str, str]:
    """Hyperparameter name -> tensor in the train graph (or inference graph)."""
    names = [n for n in (self.meta.get("hparams") or "").split(",") if n]
    variant = self.module.train or self.module.inference
    result = {}
    for name in names:
      for sig in variant.signatures.values():
        if (name in sig.inputs and "images" in sig.inputs and
            sig.inputs["images"].tensor_name == images_tensor):
          result[name] = sig.inputs[name].tensor_name
          break
    return result

  def check_training(self) -> None:
    sig_name, key = self.meta["source_signature"], self.meta["source_output_key"]
    variant = self.module.train or self.module.inference
    sig = variant.signatures.get(sig_name)
    if sig is None:
      self.add(compare_lib.check(
          "train/signature", False,
          f"signature '{sig_name}' is missing from the train graph"))
      return
    removed = self.meta.get("output_dropout_removed") or ""
    match = self.ref.output_dropout(sig_name, key)
    if removed:
      ok = match is not None and match.output_node == removed
      self.add(compare_lib.check(
          "train/output_dropout", ok,
          f"metadata says the output dropout '{removed}' was removed; the "
          f"train graph's output dropout is "
          f"'{match.output_node if match else None}'"))
      if not ok:
        return
      self.report.warnings.append(
          f"the train graph applies dropout to the output features (node "
          f"'{removed}'); in training mode the converted model outputs the "
          f"dropout's input, as the image feature vector API requires")
    elif match is not None:
      self.report.warnings.append(
          f"the train graph applies dropout to the output features (node "
          f"'{match.output_node}') and the converted model keeps it in "
          f"training mode, against the image feature vector API")
    bypass = bool(removed)
    hparams = self.hparam_tensors(sig.inputs["images"].tensor_name)
    missing = sorted(set(n for n in (self.meta.get("hparams") or "").split(",") if n)
                     - set(hparams))
    if missing:
      self.add(compare_lib.check(
          "train/hparams", False,
          f"hyperparameters {missing} are not inputs of the module's graph"))
    size = self.sizes(self.module.inference.signatures[sig_name])[0]
    x = self.images(TRAIN_BATCH, size)
    random_ops = self.ref.train_random_ops(sig_name, key,
                                           bypass_output_dropout=bypass)
    if random_ops:
      self.report.method_for_random_ops = METHOD_FED
    steps = [("train", {})] + [
        (f"train[{name}={NON_DEFAULT_HPARAM}]", {name: NON_DEFAULT_HPARAM})
        for name in sorted(hparams)]
    for prefix, values in steps:
      try:
        self.train_step(prefix, sig_name, key, x, values, hparams, bypass)
      except (TypeError, ValueError, KeyError, tf.errors.OpError) as e:
        self.add(compare_lib.check(
            f"{prefix}/run", False,
            f"the training step failed: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"))

  def train_step(self, prefix: str, sig_name: str, key: str, x: np.ndarray,
                 hparam_values: Mapping[str, float],
                 hparam_tensors: Mapping[str, str], bypass: bool) -> None:
    ref = self.ref.train_step(
        sig_name, key, x, bypass_output_dropout=bypass, seed=self.seed,
        feeds_by_tensor={hparam_tensors[n]: np.float32(v)
                         for n, v in hparam_values.items()})
    self.ref.reset()
    kwargs = {n: tf.constant(v, tf.float32) for n, v in hparam_values.items()}
    images = tf.constant(x)
    restored = False
    try:
      if ref.random_values:
        call = self.fed_call(list(kwargs), ref.random_values, x.shape, prefix)
        if call is None:
          return
      else:
        call = lambda images, **kw: self.new(images, training=True, **kw)
      watched = list(self.trainable.values())
      with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(watched)
        out = call(images, **kwargs)
        same_shape = tuple(out.shape) == ref.probe.shape
        # With another shape the output check fails; no gradient to compare.
        probe = tf.constant(ref.probe) if same_shape else tf.zeros_like(out)
        loss = tf.reduce_sum(out * probe)
      grads = tape.gradient(loss, watched)
      after = {n: v.numpy() for n, v in self.variables.items()}
      changed_new = sorted(n for n in after
                           if not np.array_equal(after[n], self.saved_values[n]))
      self.restore_variables(changed_new)
      restored = True
    finally:
      if not restored:
        self.restore_variables()
    self.add(compare_lib.compare(f"{prefix}/output", out.numpy(), ref.output,
                                 "training_output"))
    changed_ref = sorted(n for n in ref.variables_after
                         if not np.array_equal(ref.variables_after[n],
                                               ref.variables_before[n]))
    # Variables neither side changed are equal by `variables/values`.
    moved = set(changed_ref) | set(changed_new)
    self.add(compare_lib.compare_many(
        f"{prefix}/moving_averages", {n: after[n] for n in moved if n in after},
        {n: ref.variables_after[n] for n in moved if n in ref.variables_after},
        "moving_averages"))
    self.add(compare_lib.check(
        f"{prefix}/updated_variables", changed_ref == changed_new,
        f"{len(changed_new)} variables updated, the module updates "
        f"{len(changed_ref)}" + _diff_names(set(changed_new), set(changed_ref))))
    if prefix != "train" or not same_shape:
      return
    # A variable the output does not depend on has no gradient in the TF1
    # Session (None) but may get an exact zero from the TF2 function (whose
    # other outputs use it): both mean zero, so both sides fill in zeros.
    actual_grads, expected_grads = {}, {}
    for n, g in zip(self.trainable, grads):
      zeros = np.zeros(self.trainable[n].shape, self.trainable[n].dtype.as_numpy_dtype)
      actual_grads[n] = (zeros if g is None else g.numpy()
                         if not isinstance(g, tf.IndexedSlices)
                         else tf.convert_to_tensor(g).numpy())
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

  # ---- regularization

  def check_regularization(self) -> None:
    ref_values, ref_total = self.ref.regularization_losses()
    losses = list(self.new.regularization_losses)
    # One traced call instead of one eager call (and function instantiation)
    # per loss: ResNet-v2-50 has 54.
    new_values = ([float(v) for v in tf.function(lambda: [f() for f in losses])()]
                  if losses else [])
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


def verify(old_path: str, new_path: str, *, seed: int = 0,
           signature: Optional[str] = None,
           output_key: Optional[str] = None) -> ParityReport:
  """Compares the converted model at `new_path` with the TF1 module at `old_path`.

  `signature`/`output_key`, if given, are what the user asked `__call__` to
  expose; the model's metadata must name them. Returns a `ParityReport`
  (`report.passed`); raises only for unreadable inputs.
  """
  start = time.monotonic()
  v = _Verifier(old_path, new_path, seed, signature, output_key)
  try:
    if v.check_metadata():
      v.check_variables()
      v.check_signatures()
      v.check_call_inference()
      v.check_training()
      v.check_regularization()
    else:
      v.check_variables()
      v.check_signatures()
      v.check_regularization()
  finally:
    v.restore_variables()
    v.ref.close()
  v.report.seconds = time.monotonic() - start
  return v.report
