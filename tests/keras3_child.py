"""What tests/test_keras3.py runs in a fresh process per Keras backend.

Only numpy and `migrate.keras_side` (no TensorFlow) are imported here; Keras
is imported by `keras_side.import_keras` with the process's backend, which
the parent set in KERAS_BACKEND before starting it. Returns plain data; the
parent compares it with the goldens recorded by `hub.Module`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from migrate import keras_side


def golden_run(backend: str, cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """For each case (path, images by batch tag, fit images; for a module with
  a train graph: train images, the golden random draws, the plan's layers,
  output and variables, and the layer and probe of the gradients): loads the
  .keras file in safe mode without custom objects, runs inference,
  `model.losses`, one training call with the golden draws fed to its Dropout
  layers (`keras_side.fed_training_call`, as verification does), another for
  the gradients, then `model.fit`."""
  keras = keras_side.import_keras(backend)
  results = {"backend": keras.backend.backend()}
  for case in cases:
    model = keras.saving.load_model(case["path"], safe_mode=True)
    infer = keras_side.inference(backend, keras, model)
    r: dict[str, Any] = {
        "outputs": {tag: infer(x) for tag, x in case["images"].items()},
        "losses_total": float(sum(float(keras.ops.convert_to_numpy(l))
                                  for l in model.losses)),
        "num_losses": len(model.losses)}
    bns = [l for l in model.layers if type(l).__name__ == "BatchNormalization"]
    before = {f"{l.name}/{w}": np.asarray(keras.ops.convert_to_numpy(getattr(l, w)))
              for l in bns for w in ("moving_mean", "moving_variance")}
    weights = keras_side.weights_of(model, case["variables"])
    if case["train"] is not None:
      step = keras_side.fed_training_call(
          backend, keras, model, case["layers"], case["output"],
          case["random_values"], case["train"], weights)
      r["train_output"] = step["output"]
      r["counts"] = step["counts"]
      r["unfed"] = step["unfed"]
      r["moving_after"] = {
          f"{l.name}/{w}": np.asarray(keras.ops.convert_to_numpy(getattr(l, w)))
          for l in bns for w in ("moving_mean", "moving_variance")}
    if case["grad_output"]:
      # Batch norm in training mode reads no moving average: that they
      # moved once already changes nothing here.
      step = keras_side.fed_training_call(
          backend, keras, model, case["layers"], case["grad_output"],
          case["random_values"], case["grad_images"], weights, case["probe"])
      r["gradients"] = step["gradients"]
      r["grad_unfed"] = step["unfed"]
    r["moving_before"] = before
    r["fit"] = keras_side.fit_check(keras, model, case["fit"])
    results[case["name"]] = r
  return results
