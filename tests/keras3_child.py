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
  """For each case (path, images by batch tag, train images or None, fit
  images): loads the .keras file in safe mode without custom objects, runs
  inference, one training call, `model.losses`, then `model.fit`."""
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
    if case["train"] is not None:
      out, _ = keras_side.train_call(backend, keras, model, case["train"])
      r["train_output"] = out
      r["counts"] = keras_side.batch_norm_counts(keras, model, case["train"].shape)
      r["momentum"] = {l.name: float(l.momentum) for l in bns}
      r["moving_after"] = {
          f"{l.name}/{w}": np.asarray(keras.ops.convert_to_numpy(getattr(l, w)))
          for l in bns for w in ("moving_mean", "moving_variance")}
    r["moving_before"] = before
    r["fit"] = keras_side.fit_check(keras, model, case["fit"])
    results[case["name"]] = r
  return results
