"""VERIFY: what both sides of the parity checks run, fixed before either starts.

- `Spec`: which output `__call__` exposes, its hyperparameters, the seed.
  Known from the conversion plan (`spec_for_plan`), so the reference side
  can start before the converted model exists, or from the converted
  model's metadata (`spec_from_metadata`).
- `ModuleFacts` (`module_facts`): what the converted side and the checks
  need to know of the TF1 module for a spec, as plain data: its signatures,
  the resolutions each is run at, its variables, the hyperparameter inputs.
  Made once per process from the parsed module; a child process gets it
  instead of parsing the module again.
- The inputs, pure functions of a spec and the facts, so that every side in
  every process runs the same: `batch_tags` (batch sizes and resolutions,
  each with its seeded images), `train_steps` and `train_images`.
- `run_conditions`: op determinism on and Grappler as the spec says, the
  same for both sides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

from migrate import errors
from migrate import graph_rewrite
from migrate import legacy_format
from migrate import plan as plan_lib

BATCH_SIZES = (1, 2)
TRAIN_BATCH = 2
FALLBACK_IMAGE_SIZE = (32, 32)
SECOND_RESOLUTION_DELTA = (8, 16)
LARGE_IMAGE = 128
NON_DEFAULT_HPARAM = 0.5
# The converted model's metadata fields that verification reads.
_METADATA_KEYS = ("source_signature", "source_output_key", "hparams",
                  "output_dropout_removed", "train_output_tensor",
                  "has_train_graph", "default_image_size", "num_features",
                  "num_classes", "output_kind", "source_sha256")


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


def read_metadata(model: Any) -> dict[str, Any]:
  """The converted model's `metadata` fields, as Python values."""
  meta = getattr(model, "metadata", None)
  result = {}
  if meta is None:
    return result
  for key in _METADATA_KEYS:
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


def spec_from_metadata(meta: Mapping[str, Any],
                       module: legacy_format.LegacyModule, *, seed: int = 0,
                       optimize_graphs: bool = False) -> Spec:
  """The spec of a converted model, from its metadata (`read_metadata`)."""
  sig, key = meta.get("source_signature") or "", meta.get("source_output_key") or ""
  sigs = module.inference.signatures
  if sig not in sigs or key not in sigs[sig].outputs:
    sig = key = ""
  return Spec(seed=seed, signature=sig, output_key=key,
              hparams=tuple(n for n in (meta.get("hparams") or "").split(",") if n),
              output_dropout_removed=meta.get("output_dropout_removed") or "",
              default_image_size=_image_size(meta.get("default_image_size")),
              optimize_graphs=optimize_graphs)


# -- what the module is, for a spec -------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SignatureFacts:
  """One signature of the inference graph that takes float32 images."""

  outputs: Mapping[str, str]  # Output key -> graph tensor.
  images_tensor: str
  other_inputs: Mapping[str, np.ndarray]  # Input key -> value fed (its default).
  sizes: tuple[tuple[int, int], ...]  # The input resolutions it is run at.


@dataclasses.dataclass(frozen=True)
class ModuleFacts:
  """What the converted side and the checks need to know of the TF1 module.

  Plain data (picklable), made by `module_facts` for one spec. The module's
  variable values are not here: the reference side reads them (`Expected`).
  """

  saved_model_sha256: str = ""
  has_train_graph: bool = False
  # Every signature of the inference graph: output key -> graph tensor.
  signatures: Mapping[str, Mapping[str, str]] = dataclasses.field(
      default_factory=dict)
  image_signatures: Mapping[str, SignatureFacts] = dataclasses.field(
      default_factory=dict)
  variables: frozenset[str] = frozenset()  # Every variable of every graph.
  trainable: frozenset[str] = frozenset()
  fake_quant: bool = False  # The graphs have FakeQuant* ops.
  # For the spec's output (empty if the spec names none):
  call_sizes: tuple[tuple[int, int], ...] = ()  # Resolutions of its signature.
  train_signature: bool = False  # The train graph (or the inference graph,
  # if there is none) has the spec's signature: the training steps run.
  hparam_tensors: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # What the caller asked `__call__` to expose (verify's signature=, output_key=).
  requested: tuple[Optional[str], Optional[str]] = (None, None)
  # Variables whose training update depends on a random op (the moving
  # averages of batch norms after a drop path, drop connect or dropout).
  random_updates: frozenset[str] = frozenset()


def has_fake_quant(module: legacy_format.LegacyModule) -> bool:
  """Whether any graph of the module has FakeQuant* ops."""
  return any(node.op.startswith("FakeQuant")
             for variant in module.variants.values()
             for node in variant.graph_def.node)


def _sizes(module: legacy_format.LegacyModule, spec: Spec,
           sig: legacy_format.Signature) -> tuple[tuple[int, int], ...]:
  """The input resolutions: the default, and another for variable-size modules."""
  shape = sig.inputs["images"].shape
  if shape is not None and shape[1] and shape[2]:
    return ((shape[1], shape[2]),)
  default = (spec.default_image_size or module.image_module_info_size() or
             FALLBACK_IMAGE_SIZE)
  h, w = default
  if h >= LARGE_IMAGE:  # Cheaper: a smaller, non-square second resolution.
    return ((h, w), (h // 2, w // 2 + SECOND_RESOLUTION_DELTA[1]))
  return ((h, w), (h + SECOND_RESOLUTION_DELTA[0], w + SECOND_RESOLUTION_DELTA[1]))


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


def module_facts(module: legacy_format.LegacyModule, spec: Spec, *,
                 requested: tuple[Optional[str], Optional[str]] = (None, None)
                 ) -> ModuleFacts:
  """The facts of `module` for `spec` (see `ModuleFacts`)."""
  inference = module.inference.signatures
  defaults = legacy_format.placeholder_defaults(module.inference.graph_def)
  image_signatures = {}
  for name, sig in inference.items():
    if "images" not in sig.inputs or sig.inputs["images"].dtype != tf.float32:
      continue
    image_signatures[name] = SignatureFacts(
        outputs={k: o.tensor_name for k, o in sig.outputs.items()},
        images_tensor=sig.inputs["images"].tensor_name,
        other_inputs={
            k: defaults.get(i.tensor_name, np.asarray(0.99, i.dtype.as_numpy_dtype))
            for k, i in sig.inputs.items() if k != "images"},
        sizes=_sizes(module, spec, sig))
  train_sig = None
  if spec.signature:
    train_sig = (module.train or module.inference).signatures.get(spec.signature)
  variables = [v for variant in module.variants.values() for v in variant.variables]
  train = module.train or module.inference
  return ModuleFacts(
      saved_model_sha256=module.saved_model_sha256,
      has_train_graph=module.train is not None,
      signatures={name: {k: o.tensor_name for k, o in sig.outputs.items()}
                  for name, sig in inference.items()},
      image_signatures=image_signatures,
      variables=frozenset(v.name for v in variables),
      trainable=frozenset(v.name for v in variables if v.trainable),
      fake_quant=has_fake_quant(module),
      call_sizes=(_sizes(module, spec, inference[spec.signature])
                  if spec.signature else ()),
      train_signature=train_sig is not None,
      hparam_tensors=(_hparam_tensors(module, spec,
                                      train_sig.inputs["images"].tensor_name)
                      if train_sig is not None else {}),
      requested=requested,
      random_updates=frozenset(graph_rewrite.random_updated_variables(
          train.graph_def, train.update_ops)))


# -- the inputs ------------------------------------------------------------------------

def images(seed: int, purpose: int, batch: int, size: Sequence[int]) -> np.ndarray:
  """Uniform [0, 1) images, the same for a (seed, purpose, batch, size) anywhere."""
  rng = np.random.default_rng([seed, purpose, batch, size[0], size[1]])
  return rng.uniform(0.0, 1.0, (batch, size[0], size[1], 3)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class BatchTag:
  """One inference input: a batch size at a resolution, e.g. 'b2_32x32'."""

  name: str
  batch: int
  size: tuple[int, int]

  def images(self, seed: int) -> np.ndarray:
    return images(seed, 0, self.batch, self.size)


def batch_tags(sizes: Sequence[tuple[int, int]]) -> list[BatchTag]:
  """Every batch size at the first resolution, the smallest at the others."""
  return [BatchTag(f"b{batch}_{size[0]}x{size[1]}", batch, tuple(size))
          for i, size in enumerate(sizes)
          for batch in (BATCH_SIZES if i == 0 else BATCH_SIZES[:1])]


def train_steps(facts: ModuleFacts) -> list[tuple[str, dict[str, float]]]:
  """(check prefix, hyperparameter values) of each training step: the
  default step, then each hyperparameter at a non-default value (none if
  the spec's signature has no training graph)."""
  if not facts.train_signature:
    return []
  return [("train", {})] + [
      (f"train[{name}={NON_DEFAULT_HPARAM}]", {name: NON_DEFAULT_HPARAM})
      for name in sorted(facts.hparam_tensors)]


def train_images(spec: Spec, facts: ModuleFacts) -> np.ndarray:
  """The training step's images, at the smallest resolution (batch-norm
  statistics, moving averages and gradients do not depend on it)."""
  size = min(facts.call_sizes, key=lambda s: s[0] * s[1])
  return images(spec.seed, 1, TRAIN_BATCH, size)


def signature_pairs(facts: ModuleFacts, saved: Sequence[str],
                    source_signature: Optional[str]) -> list[tuple[str, str]]:
  """(saved serving signature, the module's image signature it computes):
  every signature of the module by its name, and `serving_default` as the
  one behind `__call__` (`source_signature`)."""
  result = []
  for name in sorted((set(facts.signatures) | {"serving_default"}) & set(saved)):
    module_name = source_signature if name == "serving_default" else name
    if module_name in facts.image_signatures:
      result.append((name, module_name))
  return result


def signature_runs(facts: ModuleFacts, saved: Sequence[str],
                   source_signature: Optional[str]
                   ) -> list[tuple[str, str, list[BatchTag]]]:
  """(saved serving signature, the module's signature, the inputs it runs)
  for each of `signature_pairs`: `serving_default` on every batch tag, the
  others (the same function, other outputs selected) on one image at the
  smallest resolution."""
  result = []
  for name, module_name in signature_pairs(facts, saved, source_signature):
    tags = batch_tags(facts.image_signatures[module_name].sizes)
    if name != "serving_default":
      tags = [min(tags, key=lambda t: t.batch * t.size[0] * t.size[1])]
    result.append((name, module_name, tags))
  return result


def signature_inputs(spec: Spec, facts: ModuleFacts, tags: Sequence[BatchTag]
                     ) -> dict[str, dict[str, np.ndarray]]:
  """Tag name -> input name -> value: the images of each tag, and the other
  inputs of the image signatures (hyperparameters) at their defaults."""
  others: dict[str, np.ndarray] = {}
  for sig in facts.image_signatures.values():
    others.update(sig.other_inputs)
  return {tag.name: {"images": tag.images(spec.seed), **others} for tag in tags}


def error_text(e: BaseException) -> str:
  """How either side reports a run that failed: the error's type and cause."""
  return f"{type(e).__name__}: {errors.first_line(e)}"


# -- the conditions both sides run under -----------------------------------------------

@contextlib.contextmanager
def grappler(enabled: bool) -> Iterator[None]:
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


_DETERMINISM_LOCK = threading.Lock()
_determinism_blocks = 0  # `deterministic_ops` blocks open, in any thread.
_determinism_was_on = False  # Its state when the first of them opened.


@contextlib.contextmanager
def deterministic_ops() -> Iterator[None]:
  """TensorFlow's op determinism on in this block (process-wide), then as before.

  Without it, some CPU kernels split a reduction across threads and add the
  parts in the order they finish: the same graph on the same input differs
  by an ulp from run to run (mobilenet_quantops' training output: 2 distinct
  results in 30 runs). Through FakeQuant* ops such an ulp can move a value
  by a whole quantization step, and a correct conversion fails parity.

  The setting is process-wide and the blocks may overlap across threads
  (verification's reference side runs in one while the other verifies): it
  is put back only when the last open block closes.
  """
  global _determinism_blocks, _determinism_was_on
  with _DETERMINISM_LOCK:
    if _determinism_blocks == 0:
      _determinism_was_on = tf_config.is_op_determinism_enabled()
      tf_config.enable_op_determinism()
    _determinism_blocks += 1
  try:
    yield
  finally:
    with _DETERMINISM_LOCK:
      _determinism_blocks -= 1
      if _determinism_blocks == 0 and not _determinism_was_on:
        tf_config.disable_op_determinism()  # Public API has only enable_*.


@contextlib.contextmanager
def run_conditions(optimize_graphs: bool) -> Iterator[None]:
  """Grappler as asked (the TF2 side; the TF1 Sessions get it in their
  config) and op determinism on, for the block."""
  with grappler(optimize_graphs), deterministic_ops():
    yield
