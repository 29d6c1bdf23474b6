"""VERIFY stage helper: the converted SavedModel through each of its consumers.

`tf.saved_model.load` restores through the object graph; the model's users
also reach it through loaders that do not: the TF1 loader in a Session
(`saved_model_cli run`), the C++ `LoadSavedModel` of TensorFlow Serving (here
through TensorFlow's C API), the TFLite converter, Keras 3's `TFSMLayer` and
tf_keras' `hub.KerasLayer`. Each runner here loads the model the way that
consumer does, runs it on the given inputs and returns plain data
(`ConsumerResult`): the outputs per (signature or endpoint, input tag), or
why the consumer cannot take this model (`not_applicable`, e.g. "not
convertible to TFLite: op X"), or how it failed (`error`: a defect of the
model). A runner never raises for what a consumer does not support.

`CONSUMERS` lists them with their cost (measured in docs/PERFORMANCE.md).
Every verification (the default selection) runs the TF1 loader: it restores
through the SavedModel's saver, the path that the C++ loader and the TFLite
converter take too and that `tf.saved_model.load` does not, and runs every
serving signature. The rest cost a child process (the C API), a Keras import
and another load of the model each (the Keras layers), or a conversion
(TFLite): they run with a selection of "all" (`--consumers=all`), which also
adds the Keras fit steps (`fit_images`). What the Keras layers compute
without Keras is checked in every verification all the same: `TFSMLayer(DST)`
calls the `serve` endpoint ('call/serve_endpoint'), `hub.KerasLayer`
`__call__` ('call/inference', the training steps). `selected(selection)`
says which runs a selection makes, and which it skips.

A fit step draws random values of its own (the Dense head's initializer,
the model's dropout, drop path, drop connect), without seeds: it runs with
TensorFlow's op determinism off (`_unseeded_random_ops`), which would
refuse them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import time
import warnings
from typing import Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.framework import config as tf_config  # pylint: disable=g-direct-tensorflow-import

from migrate import build as build_lib
from migrate import errors
from migrate import isolation

SERVING_TAGS = ("serve",)
SERVING_DEFAULT = "serving_default"
_INIT_OP_SIGNATURE = "__saved_model_init_op"
# The output key of the Keras runners (one tensor: `__call__`'s output).
CALL_OUTPUT = "output"
_NO_GRADIENT = "Gradients do not exist for variables"

# Input tag (e.g. "b4_32x32") -> input name ("images", "batch_norm_momentum")
# -> value. The Keras runners use "images" only (their endpoints take one
# tensor; other inputs keep their defaults).
Inputs = Mapping[str, Mapping[str, np.ndarray]]


@dataclasses.dataclass
class FitStep:
  """One `model.fit` step through a Keras consumer (one batch, SGD)."""

  non_trainable_after: dict[str, np.ndarray]  # Every non-trainable variable.
  moved: list[str]  # Trainable variables of the model that the step changed.
  unmoved: list[str]  # Trainable variables it left as they were.
  no_gradient_warnings: list[str]  # Keras's "Gradients do not exist ..." lines.
  trainable: list[str]  # The consumer's trainable variables (module names).


@dataclasses.dataclass
class ConsumerResult:
  """What one consumer computed from the converted model: plain data."""

  consumer: str
  # (signature or endpoint, input tag) -> output key -> value.
  outputs: dict[tuple[str, str], dict[str, np.ndarray]] = dataclasses.field(
      default_factory=dict)
  not_applicable: str = ""  # Why this consumer cannot take the model.
  error: str = ""  # How the consumer failed on a model it should take.
  fit: Optional[FitStep] = None
  notes: list[str] = dataclasses.field(default_factory=list)
  seconds: float = 0.0

  @property
  def ran(self) -> bool:
    return not (self.not_applicable or self.error)


def _first_line(error: BaseException) -> str:
  return f"{type(error).__name__}: {errors.first_line(error)}"


def _timed(consumer: str, run: Callable[[ConsumerResult], None]) -> ConsumerResult:
  """Runs `run(result)`; whatever the consumer raises becomes `error` (a
  consumer failing on the model is a finding about the model)."""
  result = ConsumerResult(consumer=consumer)
  start = time.perf_counter()
  try:
    run(result)
  except Exception as e:  # pylint: disable=broad-except
    result.outputs.clear()
    result.error = f"{consumer} failed: {_first_line(e)}"
  finally:
    result.seconds = time.perf_counter() - start
  return result


def _var_name(variable) -> str:
  return variable.name.rsplit(":", 1)[0]


# ---- the signatures a loader sees

@dataclasses.dataclass
class _SignatureTensors:
  inputs: dict[str, str]  # Input key -> tensor name.
  outputs: dict[str, str]  # Output key -> tensor name.


def _signature_tensors(meta_graph) -> dict[str, _SignatureTensors]:
  """The serving signatures of a MetaGraphDef (not the init op's entry)."""
  return {name: _SignatureTensors(
      inputs={k: v.name for k, v in sig.inputs.items()},
      outputs={k: v.name for k, v in sig.outputs.items()})
          for name, sig in meta_graph.signature_def.items()
          if name != _INIT_OP_SIGNATURE}


def _serving_meta_graph(path: str):
  saved_model = saved_model_pb2.SavedModel()
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    saved_model.ParseFromString(f.read())
  for mg in saved_model.meta_graphs:
    if set(mg.meta_info_def.tags) == set(SERVING_TAGS):
      return mg
  raise ValueError(f"no MetaGraph with tags {list(SERVING_TAGS)}")


def _feeds(name: str, sig: _SignatureTensors, tag: str,
           values: Mapping[str, np.ndarray], result: ConsumerResult
           ) -> Optional[dict[str, np.ndarray]]:
  missing = sorted(set(sig.inputs) - set(values))
  if missing:
    result.notes.append(f"signature '{name}' not run on {tag}: no value "
                        f"given for its inputs {missing}")
    return None
  return {sig.inputs[k]: np.asarray(values[k]) for k in sig.inputs}


# ---- TF1 loader

def tf1_loader(path: str, inputs: Inputs,
               signature_tags: Optional[Mapping[str, Sequence[str]]] = None
               ) -> ConsumerResult:
  """`tf.compat.v1.saved_model.load` in a `tf.compat.v1.Session` (what
  `saved_model_cli run` does), every serving signature on every input, or
  each signature of `signature_tags` on the input tags it names."""
  def run(result: ConsumerResult) -> None:
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
      try:
        meta_graph = tf.compat.v1.saved_model.load(session, list(SERVING_TAGS), path)
      except (tf.errors.OpError, RuntimeError, ValueError, OSError) as e:
        result.error = f"the TF1 loader cannot load it: {_first_line(e)}"
        return
      for name, sig in sorted(_signature_tensors(meta_graph).items()):
        tags = inputs if signature_tags is None else signature_tags.get(name, ())
        for tag in tags:
          values = inputs[tag]
          feeds = _feeds(name, sig, tag, values, result)
          if feeds is None:
            continue
          try:
            result.outputs[(name, tag)] = session.run(sig.outputs, feeds)
          except (tf.errors.OpError, ValueError, TypeError) as e:
            result.error = (f"signature '{name}' failed on {tag} in a TF1 "
                            f"Session: {_first_line(e)}")
            return
  return _timed("tf1_loader", run)


# ---- the C++ loader (TensorFlow Serving's), through the C API

def c_api_loader(path: str, inputs: Inputs,
                 signature: str = SERVING_DEFAULT) -> ConsumerResult:
  """`TF_LoadSessionFromSavedModel` + `TF_SessionRun` (TensorFlow's C API,
  the C++ `LoadSavedModel`), `signature` on every input, in a child process:
  a crash in C++ costs only this result."""
  def run(result: ConsumerResult) -> None:
    try:
      sig = _signature_tensors(_serving_meta_graph(path)).get(signature)
    except (OSError, ValueError) as e:
      result.error = f"cannot read the serving MetaGraph: {_first_line(e)}"
      return
    if sig is None:
      result.error = f"the model has no signature '{signature}'"
      return
    tags, runs = [], []
    for tag, values in inputs.items():
      feeds = _feeds(signature, sig, tag, values, result)
      if feeds is not None:
        tags.append(tag)
        runs.append((feeds, sig.outputs))
    try:
      outputs, error = isolation.run_isolated(
          "migrate.c_api:run_or_error", path, list(SERVING_TAGS), runs,
          what=path)
    except errors.MigrationError as e:  # The child died.
      message = str(e).replace(isolation.NOTHING_WRITTEN, "")
      result.error = f"the C API loader's process failed: {message}"
      return
    if error:
      result.error = f"the C API loader failed: {error}"
      return
    for tag, values in zip(tags, outputs):
      result.outputs[(signature, tag)] = values
  return _timed("c_api_loader", run)


# ---- TFLite

def _unsupported_ops(error: BaseException) -> list[str]:
  """The TensorFlow ops a TFLite ConverterError names as unsupported."""
  names = set()
  for data in getattr(error, "errors", None) or []:
    operator = getattr(getattr(data, "operator", None), "name", "")
    if operator:
      names.add(operator.removeprefix("tf."))
  names.update(re.findall(r"'tf\.(\w+)' op is neither", str(error)))
  return sorted(names)


@contextlib.contextmanager
def _quiet_tflite() -> Iterator[None]:
  with warnings.catch_warnings():
    # tf.lite.Interpreter warns that it moves to the ai_edge_litert package.
    warnings.filterwarnings("ignore", message=r".*tf\.lite\.Interpreter is deprecated")
    yield


def tflite(path: str, inputs: Inputs,
           signature: str = SERVING_DEFAULT) -> ConsumerResult:
  """`tf.lite.TFLiteConverter.from_saved_model(path)` (a float model, no
  optimizations) and the interpreter's runner of `signature`, on every input.

  A model with ops TFLite cannot express gives `not_applicable` ("not
  convertible to TFLite: op X"), not an error.
  """
  def run(result: ConsumerResult) -> None:
    converter = tf.lite.TFLiteConverter.from_saved_model(
        path, signature_keys=[signature])
    try:
      flatbuffer = converter.convert()
    except Exception as e:  # pylint: disable=broad-except  # ConverterError and friends.
      ops = _unsupported_ops(e)
      if ops:
        result.not_applicable = (f"not convertible to TFLite: op"
                                 f"{'s' if len(ops) > 1 else ''} {', '.join(ops)}")
      else:
        result.error = f"the TFLite converter failed: {_first_line(e)}"
      return
    with _quiet_tflite():
      interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    try:
      runner = interpreter.get_signature_runner(signature)
    except ValueError as e:
      result.error = f"the TFLite model has no runner '{signature}': {_first_line(e)}"
      return
    details = runner.get_input_details()
    for tag, values in inputs.items():
      missing = sorted(set(details) - set(values))
      if missing:
        result.notes.append(f"signature '{signature}' not run on {tag}: no "
                            f"value given for its inputs {missing}")
        continue
      feeds = {k: np.asarray(values[k], details[k]["dtype"]) for k in details}
      try:
        result.outputs[(signature, tag)] = {
            k: np.array(v) for k, v in runner(**feeds).items()}
      except (ValueError, RuntimeError) as e:
        result.error = f"the TFLite interpreter failed on {tag}: {_first_line(e)}"
        return
  return _timed("tflite", run)


# ---- Keras

@contextlib.contextmanager
def _no_gradient_warnings(found: list[str]) -> Iterator[None]:
  """Collects Keras's "Gradients do not exist for variables ..." messages:
  a Python warning from Keras 3, a `tensorflow` log record from tf_keras."""
  class Handler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
      message = record.getMessage()
      if _NO_GRADIENT in message:
        found.append(message)

  handler = Handler(logging.WARNING)
  logger = logging.getLogger("tensorflow")
  logger.addHandler(handler)
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      yield
    found.extend(str(w.message) for w in caught if _NO_GRADIENT in str(w.message))
  finally:
    logger.removeHandler(handler)


def _by_size(inputs: Inputs) -> dict[tuple[int, ...], list[str]]:
  """Input tags grouped by image size (one Keras model per input shape)."""
  groups: dict[tuple[int, ...], list[str]] = {}
  for tag, values in inputs.items():
    groups.setdefault(tuple(np.shape(values["images"])[1:]), []).append(tag)
  return groups


@contextlib.contextmanager
def _unseeded_random_ops() -> Iterator[None]:
  """TensorFlow's op determinism off in this block (it refuses random ops
  without a seed, which a fit step runs), then as before."""
  previous = tf_config.is_op_determinism_enabled()
  if previous:
    tf_config.disable_op_determinism()
  try:
    yield
  finally:
    if previous:
      tf_config.enable_op_determinism()


def _fit_step(keras_module, model, variables: Sequence, trainable: Sequence,
              images: np.ndarray) -> FitStep:
  """One `fit` step (SGD, mean squared error against ones) of `model`."""
  model.compile(optimizer=keras_module.optimizers.SGD(0.1), loss="mse")
  before = {_var_name(v): np.array(v.numpy()) for v in variables}
  trainable_names = {_var_name(v) for v in trainable}
  found: list[str] = []
  targets = np.ones((len(images), 1), np.float32)
  with _no_gradient_warnings(found), _unseeded_random_ops():
    model.fit(images, targets, epochs=1, batch_size=len(images), verbose=0,
              shuffle=False)
  after = {_var_name(v): np.array(v.numpy()) for v in variables}
  moved = sorted(n for n in trainable_names
                 if not np.array_equal(before[n], after[n]))
  return FitStep(
      non_trainable_after={n: a for n, a in after.items()
                           if n not in trainable_names},
      moved=moved, unmoved=sorted(trainable_names - set(moved)),
      no_gradient_warnings=found, trainable=sorted(trainable_names))


def keras3_tfsm_layer(path: str, inputs: Inputs,
                      fit_images: Optional[np.ndarray] = None) -> ConsumerResult:
  """Keras 3: `keras.layers.TFSMLayer(path)` with its defaults (endpoint
  `serve`) in a `keras.Sequential`, `predict` on every input; with
  `fit_images`, one `fit` step of `TFSMLayer(path,
  call_training_endpoint="call_training")` under a Dense head."""
  def run(result: ConsumerResult) -> None:
    import keras  # pylint: disable=g-import-not-at-top
    if keras.backend.backend() != "tensorflow":
      result.not_applicable = (f"Keras 3 runs on the {keras.backend.backend()} "
                               f"backend; TFSMLayer needs TensorFlow")
      return
    try:
      layer = keras.layers.TFSMLayer(path)
    except ValueError as e:  # No `serve` endpoint: not made by this tool.
      result.error = f"TFSMLayer cannot load it: {_first_line(e)}"
      return
    for shape, tags in _by_size(inputs).items():
      model = keras.Sequential([keras.Input(shape=shape), layer])
      for tag in tags:
        result.outputs[(build_lib.SERVE_ENDPOINT, tag)] = {
            CALL_OUTPUT: np.asarray(model.predict(inputs[tag]["images"], verbose=0))}
    if fit_images is None:
      return
    layer = keras.layers.TFSMLayer(
        path, call_training_endpoint=build_lib.TRAINING_ENDPOINT)
    model = keras.Sequential([keras.Input(shape=fit_images.shape[1:]), layer,
                              keras.layers.Dense(1)])
    model.build((None, *fit_images.shape[1:]))
    # The layer's Keras variables wrap the loaded tf.Variables (`.value`).
    variables = [w.value for w in layer.weights]
    trainable = [w.value for w in layer.trainable_weights]
    result.fit = _fit_step(keras, model, variables, trainable, fit_images)
  return _timed("keras3_tfsm_layer", run)


def tf_keras_hub_layer(path: str, inputs: Inputs,
                       fit_images: Optional[np.ndarray] = None) -> ConsumerResult:
  """tf_keras (Keras 2): `hub.KerasLayer(path, trainable=True)` in a
  `tf_keras.Sequential`, `predict` on every input; with `fit_images`, one
  `fit` step under a Dense head (tf_keras runs the layer in training mode)."""
  def run(result: ConsumerResult) -> None:
    import tensorflow_hub as hub  # pylint: disable=g-import-not-at-top
    import tf_keras  # pylint: disable=g-import-not-at-top
    layer = hub.KerasLayer(path, trainable=True)
    for shape, tags in _by_size(inputs).items():
      model = tf_keras.Sequential([tf_keras.Input(shape=shape), layer])
      for tag in tags:
        result.outputs[("__call__", tag)] = {
            CALL_OUTPUT: np.asarray(model.predict(inputs[tag]["images"], verbose=0))}
    if fit_images is None:
      return
    layer = hub.KerasLayer(path, trainable=True)  # Fresh variables.
    model = tf_keras.Sequential([tf_keras.Input(shape=fit_images.shape[1:]),
                                 layer, tf_keras.layers.Dense(1)])
    obj = layer.resolved_object
    result.fit = _fit_step(tf_keras, model, obj.variables,
                           obj.trainable_variables, fit_images)
  return _timed("tf_keras_hub_layer", run)


@dataclasses.dataclass(frozen=True)
class Consumer:
  """A runner: `run(path, inputs)`, and `run(path, inputs, fit_images=...)`
  if `trains` (one fit step; the expensive part of that runner)."""

  name: str
  run: Callable[..., ConsumerResult]
  expensive: bool  # Behind `--consumers=all` rather than in every verification.
  trains: bool
  what: str


CONSUMERS: Mapping[str, Consumer] = {c.name: c for c in [
    Consumer("tf1_loader", tf1_loader, False, False,
             "TF1 loader in a Session (saved_model_cli run), every signature"),
    Consumer("c_api_loader", c_api_loader, True, False,
             "C++ LoadSavedModel through the C API (TensorFlow Serving), "
             "serving_default"),
    Consumer("keras3_tfsm_layer", keras3_tfsm_layer, True, True,
             "Keras 3 TFSMLayer (serve; fit through call_training)"),
    Consumer("tf_keras_hub_layer", tf_keras_hub_layer, True, True,
             "tf_keras hub.KerasLayer(trainable=True)"),
    Consumer("tflite", tflite, True, False,
             "TFLite converter and interpreter, serving_default"),
]}


# ---- which runs a verification makes

DEFAULT, ALL = "default", "all"
SELECTIONS = (DEFAULT, ALL)
FIT = "fit"  # The name of a runner's fit step: "<runner>/fit".


@dataclasses.dataclass(frozen=True)
class Selected:
  """What a selection runs: (runner, with its fit step), and what it skips
  as expensive (runner names, "<runner>/fit" for a fit step alone)."""

  runs: tuple[tuple[str, bool], ...]
  skipped: tuple[str, ...]

  @property
  def ran(self) -> tuple[str, ...]:
    """The runs by name: runners, and "<runner>/fit" for their fit steps."""
    return tuple(n for name, fit in self.runs
                 for n in ((name, f"{name}/{FIT}") if fit else (name,)))


def check_selection(selection: str) -> str:
  """`selection` if it is one of `SELECTIONS`; else a ValueError naming them."""
  if selection not in SELECTIONS:
    raise ValueError(f"consumers={selection!r}: expected one of "
                     f"{', '.join(SELECTIONS)}")
  return selection


def selected(selection: str = DEFAULT) -> Selected:
  """The runs of `selection`: "all" every runner with its fit step;
  "default" the runners that are not `expensive`, without fit steps."""
  everything = check_selection(selection) == ALL
  runs, skipped = [], []
  for c in CONSUMERS.values():
    if c.expensive and not everything:
      skipped.extend((c.name, f"{c.name}/{FIT}") if c.trains else (c.name,))
      continue
    runs.append((c.name, c.trains and everything))
    if c.trains and not everything:
      skipped.append(f"{c.name}/{FIT}")
  return Selected(runs=tuple(runs), skipped=tuple(skipped))
