"""PLAN stage: decide what the TF2 model exposes, and refuse what it cannot.

From a `LegacyModule` this picks the signature and output behind `__call__`,
the hyperparameter inputs that become keyword arguments, the input spec and
the metadata (default image size, number of features or classes). Every
refusal names the path, what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import tensorflow as tf

from migrate import errors
from migrate import graph_rewrite
from migrate import legacy_format

IMAGES_INPUT = legacy_format.IMAGES_INPUT
DEFAULT_SIGNATURE = "default"
DEFAULT_OUTPUT_KEY = "default"
FEATURE_VECTOR = "image_feature_vector"
CLASSIFICATION = "image_classification"
HPARAMS_SUFFIX = "_with_bn_hparams"


@dataclasses.dataclass(frozen=True)
class HParam:
  """An optional keyword argument of `__call__`, fed to a TF1 input."""

  name: str
  tensor_name: str  # In the graph, the same in every variant.
  dtype: tf.DType
  shape: tuple[Optional[int], ...]
  default: Optional[float]  # The TF1 graph's default (PlaceholderWithDefault).


@dataclasses.dataclass(frozen=True)
class MigrationPlan:
  """What the converted model will be; see `make_plan`."""

  signature: str  # The TF1 signature behind __call__.
  output_key: str
  kind: str  # FEATURE_VECTOR or CLASSIFICATION.
  images_tensor: str
  output_tensor: str
  input_shape: tuple[Optional[int], ...]  # [None, h or None, w or None, 3].
  output_width: Optional[int]  # num_features or num_classes.
  default_image_size: Optional[tuple[int, int]]
  hparams: Sequence[HParam]
  hparams_signature: Optional[str]  # The `*_with_bn_hparams` signature used.
  has_train_graph: bool
  remove_output_dropout: bool  # Wanted by the user; whether applied: build.


def _duplicated_signature(sigs: Mapping[str, legacy_format.Signature]
                          ) -> Optional[str]:
  """The non-default signature that `default` duplicates (same tensors)."""
  default = sigs.get(DEFAULT_SIGNATURE)
  if default is None:
    return None
  for name in (FEATURE_VECTOR, CLASSIFICATION, *sorted(sigs)):
    sig = sigs.get(name)
    if sig is None or name == DEFAULT_SIGNATURE:
      continue
    same_inputs = ({k: v.tensor_name for k, v in sig.inputs.items()} ==
                   {k: v.tensor_name for k, v in default.inputs.items()})
    same_outputs = all(
        k in sig.outputs and sig.outputs[k].tensor_name == v.tensor_name
        for k, v in default.outputs.items())
    if same_inputs and same_outputs:
      return name
  return None


def _is_text_module(sigs: Mapping[str, legacy_format.Signature]) -> bool:
  return any(i.dtype == tf.string for s in sigs.values()
             for i in s.inputs.values())


def choose_signature(module: legacy_format.LegacyModule,
                     requested: Optional[str] = None) -> str:
  sigs = module.inference.signatures
  if requested:
    if requested not in sigs:
      raise errors.UnsupportedModuleError(
          f"{module.path}: unknown signature '{requested}' (available "
          f"signatures: {', '.join(sorted(sigs)) or 'none'})")
    return requested
  for name in (_duplicated_signature(sigs), FEATURE_VECTOR, CLASSIFICATION):
    if name and name in sigs:
      return name
  image_sigs = [n for n, s in sigs.items() if IMAGES_INPUT in s.inputs]
  if DEFAULT_SIGNATURE in image_sigs:
    return DEFAULT_SIGNATURE
  if _is_text_module(sigs):
    raise errors.UnsupportedModuleError(
        f"{module.path}: expected an image module, found a text module "
        f"(string inputs in signatures {', '.join(sorted(sigs))})")
  raise errors.UnsupportedModuleError(
      f"{module.path}: expected an image signature ('{FEATURE_VECTOR}', "
      f"'{CLASSIFICATION}' or '{DEFAULT_SIGNATURE}' with an '{IMAGES_INPUT}' "
      f"input), found signatures: {', '.join(sorted(sigs)) or 'none'}")


def _check_images(path: str, sig: legacy_format.Signature) -> legacy_format.TensorSpecInfo:
  where = f"{path}: signature '{sig.name}'"
  if IMAGES_INPUT not in sig.inputs:
    if any(i.dtype == tf.string for i in sig.inputs.values()):
      raise errors.UnsupportedModuleError(
          f"{where}: expected an image module, found a text module (string "
          f"input '{next(iter(sig.inputs))}')")
    raise errors.UnsupportedModuleError(
        f"{where}: expected an input '{IMAGES_INPUT}', found inputs: "
        f"{', '.join(sig.inputs) or 'none'}")
  images = sig.inputs[IMAGES_INPUT]
  if images.dtype != tf.float32:
    raise errors.UnsupportedModuleError(
        f"{where}: expected input '{IMAGES_INPUT}' of dtype float32, found "
        f"{images.dtype.name}")
  if images.rank not in (None, 4):
    raise errors.UnsupportedModuleError(
        f"{where}: expected input '{IMAGES_INPUT}' of rank 4 [batch, height, "
        f"width, 3], found shape {list(images.shape)}")
  if images.shape is not None and images.shape[3] not in (None, 3):
    raise errors.UnsupportedModuleError(
        f"{where}: expected input '{IMAGES_INPUT}' with 3 RGB channels, found "
        f"{images.shape[3]} channels")
  return images


def _choose_output(path: str, sig: legacy_format.Signature,
                   requested: Optional[str]) -> str:
  keys = sorted(sig.outputs)
  if requested and requested != DEFAULT_OUTPUT_KEY:
    if requested not in sig.outputs:
      raise errors.UnsupportedModuleError(
          f"{path}: unknown output key '{requested}' of signature "
          f"'{sig.name}' (available output keys: {', '.join(keys)})")
    return requested
  if DEFAULT_OUTPUT_KEY in sig.outputs:
    return DEFAULT_OUTPUT_KEY
  if len(keys) == 1:
    return keys[0]
  raise errors.UnsupportedModuleError(
      f"{path}: signature '{sig.name}' has no output '{DEFAULT_OUTPUT_KEY}'; "
      f"choose one with --output_key (available output keys: "
      f"{', '.join(keys)})")


def _kind(sig_name: str, output_key: str,
          sigs: Mapping[str, legacy_format.Signature]) -> str:
  if sig_name == DEFAULT_SIGNATURE:
    sig_name = _duplicated_signature(sigs) or sig_name
  text = f"{sig_name}/{output_key}"
  if "classif" in text or "logits" in text or "predictions" in text:
    return CLASSIFICATION
  return FEATURE_VECTOR


def _hparams(module: legacy_format.LegacyModule, signature: str,
             images: legacy_format.TensorSpecInfo) -> tuple[list[HParam], Optional[str]]:
  sigs = module.inference.signatures
  base = _duplicated_signature(sigs) if signature == DEFAULT_SIGNATURE else signature
  name = f"{base}{HPARAMS_SUFFIX}"
  hsig = sigs.get(name)
  if hsig is None:
    return [], None
  hsig_images = hsig.inputs.get(IMAGES_INPUT)
  if hsig_images is None or hsig_images.tensor_name != images.tensor_name:
    return [], None
  defaults = {name: float(value) for name, value in
              legacy_format.placeholder_defaults(module.inference.graph_def).items()
              if value.shape == ()}
  hparams = []
  for key, info in sorted(hsig.inputs.items()):
    if key == IMAGES_INPUT:
      continue
    hparams.append(HParam(name=key, tensor_name=info.tensor_name,
                          dtype=info.dtype, shape=info.shape or (),
                          default=defaults.get(info.tensor_name)))
  return hparams, name


def make_plan(module: legacy_format.LegacyModule, *,
              signature: Optional[str] = None,
              output_key: Optional[str] = None,
              remove_output_dropout: bool = True) -> MigrationPlan:
  """Chooses what `__call__` computes; raises `MigrationError` if impossible."""
  sigs = module.inference.signatures
  name = choose_signature(module, signature)
  sig = sigs[name]
  images = _check_images(module.path, sig)
  key = _choose_output(module.path, sig, output_key)
  out = sig.outputs[key]
  if out.dtype != tf.float32:
    raise errors.UnsupportedModuleError(
        f"{module.path}: expected output '{key}' of signature '{name}' to be "
        f"float32, found {out.dtype.name}")
  if out.rank is not None and out.rank != 2:
    raise errors.UnsupportedModuleError(
        f"{module.path}: expected output '{key}' of signature '{name}' of "
        f"rank 2 [batch, features], found shape {list(out.shape)}; pick "
        f"another with --output_key (available output keys: "
        f"{', '.join(sorted(sig.outputs))})")
  train = module.train
  if train is not None and name not in train.signatures:
    raise errors.CorruptModuleError(
        f"{module.path}: signature '{name}' is in the inference graph but not "
        f"in the train graph")
  input_shape = tuple(images.shape) if images.shape else (None, None, None, 3)
  input_shape = (None, input_shape[1], input_shape[2], 3)
  for variant in module.variants.values():  # Verification feeds them all.
    for sig in variant.signatures.values():
      shape = sig.inputs[IMAGES_INPUT].shape if IMAGES_INPUT in sig.inputs else None
      if shape is not None and len(shape) == 4:
        legacy_format.check_image_size(
            f"{module.path}: signature '{sig.name}' input '{IMAGES_INPUT}'",
            "fixed image size", shape[1:3])
  size = module.image_module_info_size()
  if size is None and input_shape[1] and input_shape[2]:
    size = (input_shape[1], input_shape[2])
  hparams, hparams_signature = _hparams(module, name, images)
  return MigrationPlan(
      signature=name, output_key=key, kind=_kind(name, key, sigs),
      images_tensor=images.tensor_name, output_tensor=out.tensor_name,
      input_shape=input_shape,
      output_width=out.shape[1] if out.shape else None,
      default_image_size=size, hparams=tuple(hparams),
      hparams_signature=hparams_signature,
      has_train_graph=train is not None,
      remove_output_dropout=remove_output_dropout)


def output_dropout(module: legacy_format.LegacyModule, plan: MigrationPlan,
                   train_graph_def=None) -> Optional[graph_rewrite.DropoutMatch]:
  """The dropout the train graph applies last to the chosen feature vector.

  None for classifiers (dropout before logits is theirs to keep) and for
  modules without a train graph. `train_graph_def` (default: the module's)
  is searched, e.g. a rewritten copy with the same node names.
  """
  if not plan.has_train_graph or plan.kind != FEATURE_VECTOR:
    return None
  tensor = module.train.signatures[plan.signature].outputs[plan.output_key].tensor_name
  return graph_rewrite.find_output_dropout(
      module.train.graph_def if train_graph_def is None else train_graph_def,
      tensor)
