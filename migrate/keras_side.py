"""The Keras side of verification: a converted `.keras` model, run on one backend.

`produce(backend, path, request)` runs in its own process (Keras fixes its
backend when it is imported: `KERAS_BACKEND` is set here, before that), loads
the file with `keras.saving.load_model(path, safe_mode=True)` and no custom
objects, and returns plain data mirroring `verify.Expected`: the outputs per
batch tag, one training call's output, the variables it changed, the
gradients of `sum(output * probe)`, and `model.losses`.

Dropout draws random masks on every backend in its own way. For the training
call, the model's layers are wired again (`wire`) into a twin that shares
them (same layers, same weights) but multiplies the input of each Dropout
layer by the module's mask from the TF1 reference's draw (`dropout_multiplier`);
what Keras's Dropout layer itself does is checked separately
(`dropout_semantics`): its values are 0 or 1/(1-rate), its mask is shared
along the noise shape's 1s, and it is the identity in inference.

This module imports neither TensorFlow nor Keras at import time: its
process may be a JAX or PyTorch one.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

BACKENDS = ("tensorflow", "jax", "torch")
# The package each backend needs besides Keras.
BACKEND_PACKAGES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
INPUT = "images"  # As keras_translate.INPUT.


def installed_backends() -> list[str]:
  """The Keras backends whose package is installed here (TensorFlow always)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  return [b for b in BACKENDS
          if importlib.util.find_spec(BACKEND_PACKAGES[b]) is not None]


def wire(layers: Sequence[Mapping[str, Any]], output: str, inputs: Any,
         call: Callable[[Mapping[str, Any], Any], Any]) -> tuple[Any, dict]:
  """Applies `call(spec, layer_inputs)` along `layers` (dicts with "name" and
  "inputs", inputs first) from `inputs`, the value of the model's input.
  Returns the value of `output` and every layer's value by name."""
  values = {INPUT: inputs}
  for spec in layers:
    args = [values[i] for i in spec["inputs"]]
    values[spec["name"]] = call(spec, args if len(args) > 1 else args[0])
  return values[output], values


def dropout_multiplier(spec: Mapping[str, Any], draw: np.ndarray) -> np.ndarray:
  """What the module's dropout multiplies its input by, for one draw of its
  RandomUniform op: 0 where dropped, else 1/keep (float32, as TF computes)."""
  rate = float(spec["config"]["rate"])
  u = np.asarray(draw, np.float32)
  if spec["mask"] == "floor_keep_plus_u":  # TF 1.x: x / keep * floor(keep + u).
    keep = np.float32(1.0 - rate)
    return (np.floor(keep + u) / keep).astype(np.float32)
  # TF 2.x: select(u >= rate, x * (1 / keep), 0).
  return np.where(u >= np.float32(rate), np.float32(1.0 / (1.0 - rate)),
                  np.float32(0.0)).astype(np.float32)


def import_keras(backend: str):
  os.environ["KERAS_BACKEND"] = backend
  loaded = sys.modules.get("keras")
  if loaded is not None and loaded.backend.backend() != backend:
    raise RuntimeError(f"Keras was already imported with backend "
                       f"{loaded.backend.backend()}, not {backend}")
  import keras  # pylint: disable=g-import-not-at-top
  return keras


def _backend_version(backend: str) -> str:
  module = __import__(BACKEND_PACKAGES[backend])
  return getattr(module, "__version__", "?")


def _numpy(keras, x) -> np.ndarray:
  return np.asarray(keras.ops.convert_to_numpy(x))


def _weights(model, variables: Mapping[str, Sequence[str]]) -> dict[str, Any]:
  return {var: getattr(model.get_layer(layer), weight)
          for var, (layer, weight) in variables.items()}


def _twin(keras, model, request: Mapping[str, Any], images: np.ndarray
          ) -> tuple[Any, list[np.ndarray], dict[str, int], list[str]]:
  """(twin model, its inputs, BN layer -> values per channel in the call,
  Dropout layers left random). The twin shares the model's layers; each
  Dropout whose random op the reference drew is replaced by a product with
  the module's mask."""
  draws = request["random_values"]
  x = keras.Input(batch_shape=images.shape, name=INPUT)
  inputs, feeds, unfed = [x], [images], []

  def call(spec, value):
    if spec["cls"] == "Dropout":
      if spec["random_op"] in draws:
        multiplier = dropout_multiplier(spec, draws[spec["random_op"]])
        m = keras.Input(batch_shape=multiplier.shape,
                        name=f"mask_{len(inputs)}")
        inputs.append(m)
        feeds.append(multiplier)
        return keras.layers.Multiply()([value, m])
      unfed.append(spec["name"])
    return model.get_layer(spec["name"])(value)

  out, values = wire(request["layers"], request["output"], x, call)
  counts = {}
  for spec in request["layers"]:
    if spec["cls"] == "BatchNormalization":
      shape = values[spec["inputs"][0]].shape
      counts[spec["name"]] = int(np.prod(shape[:-1]))
  return keras.Model(inputs, out), feeds, counts, unfed


def batch_norm_counts(keras, model, shape: Sequence[int]) -> dict[str, int]:
  """BatchNormalization layer -> values per channel it normalizes over when
  `model` is called on inputs of `shape` (symbolically: nothing runs)."""
  layers = [l for l in model.layers if type(l).__name__ == "BatchNormalization"]
  if not layers:
    return {}
  probe = keras.Model(model.inputs, [l.input for l in layers])
  specs = probe.compute_output_spec(keras.KerasTensor(tuple(shape)))
  return {l.name: int(np.prod(s.shape[:-1])) for l, s in zip(layers, specs)}


def train_call(backend: str, keras, twin, feeds: Any,
               probe: Optional[np.ndarray] = None) -> tuple[np.ndarray, list[Any]]:
  """One training call of `twin` (a model): its output and the gradients of
  sum(output * probe) for `twin.trainable_variables` (none without a
  probe), with its state (moving averages) updated, on `backend`."""
  if probe is None:
    probe = np.zeros((), np.float32)
  trainable = twin.trainable_variables
  if backend == "tensorflow":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with tf.GradientTape() as tape:
      out = twin(feeds, training=True)
      loss = keras.ops.sum(out * probe)
    grads = tape.gradient(loss, trainable)
    return _numpy(keras, out), [None if g is None else _numpy(keras, g) for g in grads]
  if backend == "jax":
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    non_trainable = twin.non_trainable_variables

    def loss_fn(tv, ntv):
      out, ntv_after = twin.stateless_call(tv, ntv, feeds, training=True)
      return jnp.sum(out * probe), (out, ntv_after)

    # Compiled once: eager JAX compiles every op on its own (minutes).
    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (_, (out, ntv_after)), grads = step(
        [v.value for v in trainable], [v.value for v in non_trainable])
    for v, value in zip(non_trainable, ntv_after):
      v.assign(value)
    return _numpy(keras, out), [_numpy(keras, g) for g in grads]
  if backend == "torch":
    import torch  # pylint: disable=g-import-not-at-top
    for v in trainable:
      v.value.grad = None
    out = twin(feeds, training=True)
    loss = (out * torch.as_tensor(probe, device=out.device)).sum()
    loss.backward()
    grads = [v.value.grad for v in trainable]
    return _numpy(keras, out), [None if g is None else _numpy(keras, g) for g in grads]
  raise ValueError(f"unknown Keras backend {backend}")


def inference(backend: str, keras, model) -> Callable[[np.ndarray], np.ndarray]:
  """`model(x, training=False)` as a numpy function (compiled on JAX)."""
  if backend != "jax":
    return lambda x: _numpy(keras, model(x, training=False))
  import jax  # pylint: disable=g-import-not-at-top
  fn = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x)[0])
  return lambda x: _numpy(keras, fn([v.value for v in model.trainable_variables],
                                    [v.value for v in model.non_trainable_variables], x))


def _regularization(backend: str, keras, weights: Mapping[str, Any]
                    ) -> dict[str, float]:
  """Each weight's regularizer applied to it, as `model.losses` computes it
  (`variable.regularizer(variable)`; on JAX in one compiled function)."""
  names = [var for var, v in weights.items()
           if v.trainable and v.regularizer is not None]
  regs = [weights[n].regularizer for n in names]
  if backend == "jax" and names:
    import jax  # pylint: disable=g-import-not-at-top
    values = jax.jit(lambda xs: [r(x) for r, x in zip(regs, xs)])(
        [weights[n].value for n in names])
  else:
    values = [r(weights[n]) for r, n in zip(regs, names)]
  return {n: float(_numpy(keras, v)) for n, v in zip(names, values)}


def dropout_semantics(keras, model, layers: Sequence[Mapping[str, Any]]) -> list[str]:
  """What is wrong with each Dropout layer of `model` ([] if nothing): in
  training its values are 0 or 1/(1-rate) and its mask is shared along the
  noise shape's 1s; in inference it is the identity."""
  problems = []
  for spec in layers:
    if spec["cls"] != "Dropout":
      continue
    layer = model.get_layer(spec["name"])
    rate = float(spec["config"]["rate"])
    shape = (4, 3, 3, 8) if spec["rank"] == 4 else (4, 64)
    x = np.ones(shape, np.float32)
    y = _numpy(keras, layer(x, training=True))
    kept = 1.0 / (1.0 - rate)
    if not np.all(np.isclose(y, 0.0) | np.isclose(y, kept, rtol=1e-6)):
      problems.append(f"{spec['name']}: training values other than 0 and "
                      f"1/(1-rate) = {kept:.6g}")
    noise = spec["config"].get("noise_shape")
    for axis, size in enumerate(noise or ()):
      if size == 1 and not np.all(y == np.take(y, [0], axis=axis)):
        problems.append(f"{spec['name']}: mask not shared along axis {axis} "
                        f"(noise_shape {noise})")
    if not np.array_equal(_numpy(keras, layer(x, training=False)), x):
      problems.append(f"{spec['name']}: not the identity in inference")
  return problems


def _plain(value: Any) -> Any:
  """Tuples as lists, at any depth (configs come back with either)."""
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def _structure(model, layers: Sequence[Mapping[str, Any]]) -> list[str]:
  """Layers of the plan missing from the model or configured otherwise."""
  problems = []
  for spec in layers:
    try:
      layer = model.get_layer(spec["name"])
    except ValueError:
      problems.append(f"no layer '{spec['name']}'")
      continue
    if type(layer).__name__ != spec["cls"]:
      problems.append(f"'{spec['name']}' is a {type(layer).__name__}, "
                      f"expected {spec['cls']}")
      continue
    config = layer.get_config()
    for key, want in spec["config"].items():
      have, want = _plain(config.get(key)), _plain(want)
      if have != want and not (isinstance(want, float) and have is not None and
                               np.isclose(have, want, rtol=1e-7)):
        problems.append(f"'{spec['name']}' has {key}={have}, expected {want}")
  return problems


def produce(backend: str, path: str, request: Mapping[str, Any]) -> dict[str, Any]:
  """Runs the `.keras` model at `path` on `backend` as `request` asks (see
  `keras_verify.keras_request`); returns plain data."""
  start = time.monotonic()
  keras = import_keras(backend)
  result: dict[str, Any] = {"backend": backend, "keras_version": keras.__version__,
                            "backend_version": _backend_version(backend)}
  model = keras.saving.load_model(path, safe_mode=True)
  result["structure"] = _structure(model, request["layers"])
  if result["structure"]:
    result["seconds"] = time.monotonic() - start
    return result
  weights = _weights(model, request["variables"])
  result["variables"] = {var: _numpy(keras, v) for var, v in weights.items()}
  result["trainable"] = sorted(var for var, v in weights.items() if v.trainable)
  infer = inference(backend, keras, model)
  result["outputs"] = {tag: infer(x) for tag, x in request["images"].items()}
  result["losses"] = _regularization(backend, keras, weights)
  losses = model.losses
  result["num_losses"] = len(losses)
  result["losses_total"] = float(sum(float(_numpy(keras, l)) for l in losses))
  result["dropout"] = dropout_semantics(keras, model, request["layers"])
  if request.get("train_images") is not None:
    twin, feeds, counts, unfed = _twin(keras, model, request,
                                       request["train_images"])
    by_id = {id(v): var for var, v in weights.items()}
    before = result["variables"]
    out, grads = train_call(backend, keras, twin, feeds, request["probe"])
    after = {var: _numpy(keras, v) for var, v in weights.items()}
    result["train_output"] = out
    result["changed"] = {var: value for var, value in after.items()
                         if not np.array_equal(value, before[var])}
    result["gradients"] = {by_id[id(v)]: g for v, g in
                           zip(twin.trainable_variables, grads)
                           if g is not None and id(v) in by_id}
    result["batch_norm_counts"] = counts
    result["unfed_dropout"] = unfed
  result["seconds"] = time.monotonic() - start
  return result


def fit_check(keras, model, images: np.ndarray, steps: int = 3) -> dict[str, Any]:
  """Fine-tunes `model` with `model.fit` for `steps` steps (SGD on a
  mean-squared error to a fixed target); returns which weights moved
  (trainable ones, moving averages), the losses, and whether the model
  still gives finite outputs."""
  before = {v.path: _numpy(keras, v) for v in model.weights}
  out = _numpy(keras, model(images, training=False))
  target = np.zeros_like(out)
  model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse")
  history = model.fit(images, target, batch_size=len(images), epochs=steps,
                      verbose=0, shuffle=False)
  after = {v.path: _numpy(keras, v) for v in model.weights}
  moved = sorted(p for p in before if not np.array_equal(before[p], after[p]))
  trainable = sorted(v.path for v in model.trainable_weights)
  moving = sorted(v.path for v in model.non_trainable_weights
                  if v.path.endswith(("moving_mean", "moving_variance")))
  return {"moved": moved, "trainable": trainable,
          "moving_averages": moving, "loss": [float(l) for l in history.history["loss"]],
          "finite": bool(np.all(np.isfinite(_numpy(keras, model(images)))))}
