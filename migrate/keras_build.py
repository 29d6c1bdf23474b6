"""BUILD stage (`.keras` output): a `KerasPlan` -> a functional `keras.Model`.

Every layer is a Keras 3 built-in (`keras.layers.<cls>`), so the saved model
loads with `keras.saving.load_model(path)` in safe mode, on any backend,
without custom objects or this tool. Weights are copied from the module's
checkpoint; regularizers (`keras.regularizers.L2`/`L1`) are those read from
the module's loss subgraphs by `keras_translate`.

Layers are connected by `keras_side.wire`, which verification also uses, on
the layers of a loaded model, to build the twin it feeds the module's
dropout masks.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from migrate import errors
from migrate import keras_side
from migrate import keras_translate
from migrate import legacy_format

KerasPlan = keras_translate.KerasPlan
LayerSpec = keras_translate.LayerSpec


@dataclasses.dataclass
class BuiltKerasModel:
  """The Keras model and the plan it was built from."""

  model: keras.Model
  plan: KerasPlan


def _regularizer(cls: str, factor: float):
  return {"L2": keras.regularizers.L2, "L1": keras.regularizers.L1}[cls](factor)


def make_layer(spec: LayerSpec, regularizers: Mapping[str, Any]) -> keras.layers.Layer:
  """The built-in layer of one spec, with its regularizers."""
  config = dict(spec.config)
  config.update(regularizers)
  layer = getattr(keras.layers, spec.cls)(name=spec.name, **config)
  layer.trainable = spec.trainable
  return layer


def read_weights(module: legacy_format.LegacyModule,
                 names: Sequence[str]) -> dict[str, np.ndarray]:
  """The checkpoint values of `names`; `CorruptModuleError` if unreadable."""
  try:
    reader = tf.train.load_checkpoint(module.checkpoint_prefix)
    shapes = reader.get_variable_to_shape_map()
    missing = [n for n in names if n not in shapes]
    if missing:
      raise errors.CorruptModuleError(
          f"{module.checkpoint_prefix}: the variables index does not match the "
          f"graph: expected {len(names)} variables, missing {len(missing)} "
          f"(e.g. '{missing[0]}')")
    return {n: reader.get_tensor(n) for n in names}
  except (tf.errors.OpError, ValueError, IndexError, RuntimeError) as e:
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    raise errors.CorruptModuleError(
        f"{module.checkpoint_prefix}: expected a readable checkpoint, found "
        f"{type(e).__name__}: {text}") from None


def _check_flatten(model: keras.Model, plan: KerasPlan) -> None:
  """A `Squeeze` of the height and width became `Flatten`: same only on 1x1 maps."""
  for spec in plan.layers:
    if spec.cls != "Flatten":
      continue
    shape = tuple(model.get_layer(spec.name).input.shape)
    if shape[1:3] != (1, 1):
      raise errors.UnsupportedModuleError(
          f"node '{spec.source}' (op Squeeze): squeezes a map of size "
          f"{shape[1]}x{shape[2]} for the model's input "
          f"{list(plan.input_shape)}, expected 1x1 for every input size")


def build(module: legacy_format.LegacyModule, plan: KerasPlan) -> BuiltKerasModel:
  """The functional model of `plan` with the module's weights."""
  by_var = {var: (layer, weight) for var, (layer, weight) in plan.variables.items()}
  regularizers: dict[str, dict[str, Any]] = {}
  for var, (cls, factor) in plan.regularization.items():
    layer, weight = by_var[var]
    spec = plan.layer(layer)
    regularizers.setdefault(layer, {})[
        keras_translate.regularizer_argument(spec, weight)] = _regularizer(cls, factor)
  layers = {s.name: make_layer(s, regularizers.get(s.name, {}))
            for s in plan.layers}
  inputs = keras.Input(shape=plan.input_shape, name=keras_translate.INPUT,
                       dtype="float32")
  output, _ = keras_side.wire([dataclasses.asdict(s) for s in plan.layers], plan.output,
                   inputs, lambda spec, x: layers[spec["name"]](x))
  model = keras.Model(inputs, output, name=_model_name(module))
  _check_flatten(model, plan)
  values = read_weights(module, sorted(plan.variables))
  for var, (layer, weight) in plan.variables.items():
    target = getattr(model.get_layer(layer), weight)
    value = values[var]
    if tuple(target.shape) != value.shape or value.dtype != np.float32:
      raise errors.CorruptModuleError(
          f"{module.checkpoint_prefix}: variable '{var}' has shape "
          f"{list(value.shape)} ({value.dtype}) in the checkpoint; its layer "
          f"'{layer}' expects {list(target.shape)} (float32)")
    target.assign(value)
  return BuiltKerasModel(model=model, plan=plan)


def _model_name(module: legacy_format.LegacyModule) -> str:
  base = os.path.basename(os.path.normpath(module.path)) or "module"
  return "".join(c if c.isalnum() or c in "_-" else "_" for c in base)
