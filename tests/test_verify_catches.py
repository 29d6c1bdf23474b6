"""verify() must fail, naming the right check, on models that are subtly wrong.

Each broken model is a real conversion of a small fixture with one defect
introduced: a perturbed weight, the wrong signature behind `__call__` or a
serving signature, the batch-norm updates removed, a regularization loss
dropped, the random ops of the training path fed differently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import pytest
import tensorflow as tf

from migrate import build
from migrate import legacy_format
from migrate import plan as plan_lib
from migrate import verify as verify_lib
from migrate import verify_random_ops
from tests import conftest

NAME = "mobilenet_v1_bn_hparams"  # Small, fixed size, BN, weight decay, hparams.


def _save(module: legacy_format.LegacyModule, dst: str, *,
          signature: str | None = None, edit=None) -> str:
  """Converts `module` like convert() does, with `edit(built)` before saving."""
  plan = plan_lib.make_plan(module, signature=signature)
  built = build.build(module, plan)
  signatures = dict(built.signatures)
  if edit is not None:
    signatures = edit(built, signatures) or signatures
  tf.saved_model.save(built.root, dst, signatures=signatures)
  return dst


def _with_train(module: legacy_format.LegacyModule, **changes) -> legacy_format.LegacyModule:
  train = dataclasses.replace(module.train, **changes)
  variants = dict(module.variants)
  variants[legacy_format.TRAIN_TAGS] = train
  return dataclasses.replace(module, variants=variants)


def _tree_digest(path: str) -> str:
  digest = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for f in sorted(files):
      digest.update(f.encode())
      with open(os.path.join(root, f), "rb") as fh:
        digest.update(fh.read())
  return digest.hexdigest()


def _failed(report: verify_lib.ParityReport) -> set[str]:
  return {c.name for c in report.failures}


@pytest.fixture(scope="module")
def module() -> legacy_format.LegacyModule:
  return legacy_format.read_module(conftest.module_path(NAME))


@pytest.fixture(scope="module")
def good(module, tmp_path_factory) -> str:
  return _save(module, str(tmp_path_factory.mktemp("good") / "model"))


def test_the_unbroken_conversion_passes_and_is_left_untouched(good):
  before = _tree_digest(good)
  report = verify_lib.verify(conftest.module_path(NAME), good)
  assert report.passed, report.format_table()
  assert report.first_failure is None
  assert _tree_digest(good) == before
  assert '"passed": true' in report.to_json()
  assert "PASSED" in report.format_table()


def test_perturbed_weight(module, tmp_path):
  def edit(built, signatures):
    var = next(v for v in built.root.trainable_variables
               if v.name == "MobilenetV1/Conv2d_4_pointwise/weights:0")
    noise = np.random.RandomState(0).standard_normal(var.shape)
    var.assign(var.numpy() + 0.05 * noise.astype(np.float32))
  path = _save(module, str(tmp_path / "m"), edit=edit)
  report = verify_lib.verify(conftest.module_path(NAME), path)
  assert not report.passed
  assert report.first_failure.name == "variables/values"
  # The outputs move too: the checks downstream see it, not only the copy check.
  assert {"call/inference", "signature/serving_default/default",
          "train/output"} <= _failed(report)
  assert "FAIL variables/values" in report.format_table()


def test_perturbed_moving_average(module, tmp_path):
  def edit(built, signatures):
    var = next(v for v in built.root.variables if v.name ==
               "MobilenetV1/Conv2d_4_pointwise/BatchNorm/moving_mean:0")
    var.assign(var + 0.5)
  path = _save(module, str(tmp_path / "m"), edit=edit)
  report = verify_lib.verify(conftest.module_path(NAME), path)
  failed = _failed(report)
  assert report.first_failure.name == "variables/values"
  # Inference uses the moving mean; training uses batch statistics.
  assert "call/inference" in failed
  assert "train/output" not in failed


def test_wrong_signature_behind_serving_signature(module, tmp_path):
  def edit(built, signatures):
    signatures["image_feature_vector"] = signatures["image_classification"]
    return signatures
  path = _save(module, str(tmp_path / "m"), edit=edit)
  report = verify_lib.verify(conftest.module_path(NAME), path)
  # The signature's own row, and the TF1 loader (saved_model_cli), which
  # runs every serving signature.
  assert _failed(report) == {"signature/image_feature_vector/default",
                             "consumer/tf1_loader"}
  assert "shape" in report.first_failure.detail


def test_wrong_signature_behind_call(module, tmp_path):
  # __call__ computes the logits while the metadata claims the feature vector.
  def edit(built, signatures):
    built.root.metadata.source_signature.assign("image_feature_vector")
    signatures["serving_default"] = signatures["image_feature_vector"]
    return signatures
  path = _save(module, str(tmp_path / "m"), signature="image_classification",
               edit=edit)
  report = verify_lib.verify(conftest.module_path(NAME), path)
  # The logits' head is trainable, which the feature vector's gradient does
  # not reach: variables/trainable, checked first, fails too.
  # The training step: the logits' path has the dropout that the feature
  # vector's has not, so the random ops do not pair up and it is not run.
  failed = _failed(report)
  assert {"variables/trainable", "call/inference", "train/random_ops"} <= failed
  assert "train/output" not in failed  # (Not run: no half-compared step.)
  # And the endpoint Keras 3's TFSMLayer calls, which calls __call__.
  assert "call/serve_endpoint" in failed
  call = next(c for c in report.checks if c.name == "call/inference")
  assert "shape" in call.detail


def test_signature_not_the_one_asked_for(module, tmp_path):
  path = _save(module, str(tmp_path / "m"), signature="image_classification")
  report = verify_lib.verify(conftest.module_path(NAME), path,
                             signature="image_feature_vector")
  assert _failed(report) == {"metadata/requested_output"}


def test_batch_norm_updates_removed(module, tmp_path):
  broken = _with_train(module, update_ops=())
  path = _save(broken, str(tmp_path / "m"))
  report = verify_lib.verify(conftest.module_path(NAME), path)
  failed = _failed(report)
  assert report.first_failure.name == "train/moving_averages"
  assert {"train/moving_averages", "train/updated_variables",
          "train[batch_norm_momentum=0.5]/moving_averages"} <= failed
  assert "train/output" not in failed  # Only the updates are missing.


def test_regularization_loss_dropped(module, tmp_path):
  losses = module.train.regularization_losses
  assert len(losses) > 1
  broken = _with_train(module, regularization_losses=tuple(losses[1:]))
  path = _save(broken, str(tmp_path / "m"))
  report = verify_lib.verify(conftest.module_path(NAME), path)
  assert _failed(report) == {"regularization/count", "regularization/total"}


def test_hparam_missing_from_call(module, tmp_path):
  # The metadata promises `batch_norm_momentum`, but __call__ does not take it.
  plan = plan_lib.make_plan(module)
  assert plan.hparams
  built = build.build(module, dataclasses.replace(plan, hparams=()))
  built.root.metadata.hparams.assign(",".join(h.name for h in plan.hparams))
  path = str(tmp_path / "m")
  tf.saved_model.save(built.root, path, signatures=built.signatures)
  report = verify_lib.verify(conftest.module_path(NAME), path)
  assert report.first_failure.name == "train[batch_norm_momentum=0.5]/run"
  assert _failed(report) == {"train[batch_norm_momentum=0.5]/run"}


def test_random_ops_fed_differently_are_noticed(tmp_path):
  # inception_v2_tiny applies dropout before the logits in the train graph.
  name = "inception_v2_tiny"
  src = conftest.module_path(name)
  module = legacy_format.read_module(src)
  path = _save(module, str(tmp_path / "m"), signature="image_classification")
  report = verify_lib.verify(src, path)
  assert report.passed, report.format_table()
  assert report.method_for_random_ops == verify_lib.METHOD_FED
  assert report.check("train/random_ops").passed
  # Feeding other values on one side must show in the output: the fed
  # comparison can fail.
  model = tf.saved_model.load(path)
  arrays = conftest.golden_arrays(name)
  prefix = "train_random/image_classification/"
  randoms = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  x = tf.constant(arrays["images/" + conftest.golden_meta(name)["train_batch"]])
  concrete = verify_random_ops.training_function(model, [])
  same = verify_random_ops.FedTrainFunction(concrete, randoms, x.shape)(x)
  flipped = {k: (1.0 - v).astype(v.dtype) for k, v in randoms.items()}
  other = verify_random_ops.FedTrainFunction(concrete, flipped, x.shape)(x)
  np.testing.assert_allclose(same.numpy(), arrays["train/image_classification/default"],
                             rtol=1e-4, atol=1e-4)
  assert not np.allclose(same.numpy(), other.numpy(), rtol=1e-3, atol=1e-3)
