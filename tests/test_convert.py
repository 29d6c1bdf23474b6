"""The converted model works with every TF2 consumer (issue: migrate-hub-module).

Expected values come from the goldens recorded by `hub.Module` in the legacy
environment (legacy_fixtures/goldens), never from this converter.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub
import tf_keras

from migrate import errors
from migrate import convert
from migrate import fileutil

from tests.conftest import golden_arrays, golden_meta, module_path, convertible_fixture_names

RTOL = ATOL = 1e-5


def _variables_by_name(obj) -> dict[str, tf.Variable]:
  return {v.name.rsplit(":", 1)[0]: v for v in obj.variables}


def _tree_digest(path: str) -> str:
  digest = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      digest.update(os.path.relpath(full, path).encode())
      with open(full, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def test_hub_load_gives_the_reusable_savedmodel_api(convert_cached):
  path = convert_cached("resnet_v2_tiny")
  meta, gold = golden_meta("resnet_v2_tiny"), golden_arrays("resnet_v2_tiny")
  obj = hub.load(path)
  assert callable(obj)
  for batch in meta["batches"]:
    np.testing.assert_allclose(
        obj(gold[f"images/{batch}"]),
        gold[f"infer/image_feature_vector/default/{batch}"], rtol=RTOL, atol=ATOL)
  names = [v.name.rsplit(":", 1)[0] for v in obj.variables]
  assert len(names) == len(set(names)), "each variable is held once"
  assert sorted(names) == sorted(meta["variables"])
  # The feature vector is the pooled output before the logits: the
  # classification head gets no gradient from it, so it is not trainable.
  head = {"resnet_v2/logits/weights", "resnet_v2/logits/biases"}
  assert head <= set(meta["trainable_variables"])
  assert sorted(v.name.rsplit(":", 1)[0] for v in obj.trainable_variables) == sorted(
      set(meta["trainable_variables"]) - head)
  total = sum(float(loss()) for loss in obj.regularization_losses)
  np.testing.assert_allclose(total, gold["regularization_loss"], rtol=RTOL)
  assert list(obj.metadata.default_image_size.numpy()) == meta["expected_image_size"]


def test_tf_saved_model_load_and_metadata(convert_cached):
  path = convert_cached("resnet_v2_tiny")
  obj = tf.saved_model.load(path)
  src_pb = os.path.join(module_path("resnet_v2_tiny"), "saved_model.pb")
  assert obj.metadata.source_sha256.numpy().decode() == fileutil.file_sha256(src_pb)
  assert obj.metadata.num_features.numpy() == 32
  assert obj.metadata.output_kind.numpy().decode() == "image_feature_vector"
  card = open(os.path.join(path, "MODEL_CARD.md"), encoding="utf-8").read()
  assert "image_feature_vector" in card and "sha256" in card


def test_serving_signatures_reproduce_every_golden_output(convert_cached):
  path = convert_cached("resnet_v2_tiny")
  meta, gold = golden_meta("resnet_v2_tiny"), golden_arrays("resnet_v2_tiny")
  obj = tf.saved_model.load(path)
  assert set(obj.signatures) == set(meta["signatures"]) | {"serving_default"}
  for key in gold:
    if not key.startswith("infer/"):
      continue
    parts = key.split("/")
    signature, output, batch = parts[1], "/".join(parts[2:-1]), parts[-1]
    result = obj.signatures[signature](images=tf.constant(gold[f"images/{batch}"]))
    np.testing.assert_allclose(result[output], gold[key], rtol=RTOL, atol=ATOL)
  served = obj.signatures["serving_default"](images=tf.constant(gold["images/b4_32x32"]))
  assert set(served) == set(meta["signatures"]["image_feature_vector"]["outputs"])


def test_keras_layer_inference_matches_golden(convert_cached):
  path = convert_cached("resnet_v2_tiny")
  gold = golden_arrays("resnet_v2_tiny")
  layer = hub.KerasLayer(path)
  np.testing.assert_allclose(
      layer(gold["images/b4_32x32"]), gold["infer/image_feature_vector/default/b4_32x32"],
      rtol=RTOL, atol=ATOL)


def test_keras_fit_fine_tunes_weights_and_moving_averages(convert_cached):
  path = convert_cached("resnet_v2_tiny")
  gold = golden_arrays("resnet_v2_tiny")
  layer = hub.KerasLayer(path, trainable=True)
  model = tf_keras.Sequential([
      tf_keras.layers.InputLayer(input_shape=(32, 32, 3)), layer,
      tf_keras.layers.Dense(3)])
  model.compile(optimizer=tf_keras.optimizers.SGD(0.1),
                loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  assert len(model.losses) == len(layer.resolved_object.regularization_losses) > 0
  by_name = _variables_by_name(layer.resolved_object)
  weight = by_name["resnet_v2/conv1/weights"]
  moving = by_name["resnet_v2/postnorm/moving_mean"]
  before_w, before_m = weight.numpy().copy(), moving.numpy().copy()
  x = gold["images/b4_32x32"]
  model.fit(x, np.array([0, 1, 2, 0]), epochs=1, batch_size=4, verbose=0)
  assert not np.allclose(weight.numpy(), before_w), "fit() changed no weight"
  assert not np.allclose(moving.numpy(), before_m), "fit() left BN statistics"


def test_bn_hparams_become_keyword_arguments(convert_cached):
  name = "mobilenet_v1_bn_hparams"
  path = convert_cached(name)
  meta, gold = golden_meta(name), golden_arrays(name)
  momentum = meta["hparams"]["batch_norm_momentum"]
  x = gold[f"images/{meta['train_batch']}"]

  layer = hub.KerasLayer(path, trainable=True,
                         arguments=dict(batch_norm_momentum=momentum))
  layer(x, training=True)
  by_name = _variables_by_name(layer.resolved_object)
  for var in meta["non_trainable_variables"]:
    np.testing.assert_allclose(by_name[var], gold[f"moving_after_hparams/{var}"],
                               rtol=RTOL, atol=ATOL)

  obj = tf.saved_model.load(path)  # Fresh variables; the default momentum.
  obj(x, training=True)
  by_name = _variables_by_name(obj)
  for var in meta["non_trainable_variables"]:
    np.testing.assert_allclose(by_name[var], gold[f"moving_after/{var}"],
                               rtol=RTOL, atol=ATOL)


def test_output_dropout_is_removed_by_default(convert_cached):
  name = "inception_v3_tiny"
  meta, gold = golden_meta(name), golden_arrays(name)
  x = gold[f"images/{meta['train_batch']}"]
  obj = tf.saved_model.load(convert_cached(name))
  assert obj.metadata.output_dropout_removed.numpy().decode().endswith("SelectV2")
  out = obj(x, training=True)
  np.testing.assert_allclose(out, gold["train_nodropout/image_feature_vector/default"],
                             rtol=RTOL, atol=ATOL)
  card = open(os.path.join(convert_cached(name), "MODEL_CARD.md")).read()
  assert "dropout" in card


def test_keep_output_dropout_keeps_it(convert_cached):
  name = "inception_v3_tiny"
  meta, gold = golden_meta(name), golden_arrays(name)
  x = gold[f"images/{meta['train_batch']}"]
  obj = tf.saved_model.load(convert_cached(name, keep_output_dropout=True))
  assert obj.metadata.output_dropout_removed.numpy().decode() == ""
  first, second = obj(x, training=True).numpy(), obj(x, training=True).numpy()
  assert not np.allclose(first, second), "dropout draws differ between calls"
  zeros = np.mean(first == 0) - np.mean(gold["train_nodropout/image_feature_vector/default"] == 0)
  assert zeros > 0.05, "some features are dropped"


def test_inference_only_module_training_changes_nothing(convert_cached):
  name = "inference_only_asset"
  path = convert_cached(name)
  meta, gold = golden_meta(name), golden_arrays(name)
  obj = tf.saved_model.load(path)
  batch = meta["batches"][-1]
  before = [v.numpy().copy() for v in obj.variables]
  out = obj(gold[f"images/{batch}"], training=True)
  signature = obj.metadata.source_signature.numpy().decode()
  np.testing.assert_allclose(out, gold[f"infer/{signature}/default/{batch}"],
                             rtol=RTOL, atol=ATOL)
  for b, v in zip(before, obj.variables):
    np.testing.assert_array_equal(b, v.numpy())
  assert not obj.metadata.has_train_graph.numpy()
  assert "no train graph" in open(os.path.join(path, "MODEL_CARD.md")).read()
  for asset in meta["assets"]:
    copied = os.path.join(path, "assets", asset)
    with open(copied, "rb") as a, open(os.path.join(module_path(name), "assets", asset), "rb") as b:
      assert a.read() == b.read()


def test_reference_variables_become_resource_variables(convert_cached):
  name = "refvars_bn"
  meta, gold = golden_meta(name), golden_arrays(name)
  assert meta["reference_variables"]
  obj = tf.saved_model.load(convert_cached(name))
  x = gold[f"images/{meta['train_batch']}"]
  obj(x, training=True)
  by_name = _variables_by_name(obj)
  for var in meta["non_trainable_variables"]:
    np.testing.assert_allclose(by_name[var], gold[f"moving_after/{var}"],
                               rtol=RTOL, atol=ATOL)
  assert "reference variables" in obj.metadata.notes.numpy().decode()


def test_single_output_under_a_non_default_key(convert_cached):
  name = "classifier_probabilities"
  meta, gold = golden_meta(name), golden_arrays(name)
  obj = tf.saved_model.load(convert_cached(name))
  key = obj.metadata.source_output_key.numpy().decode()
  signature = obj.metadata.source_signature.numpy().decode()
  assert key == "image_classifier"
  batch = meta["batches"][-1]
  np.testing.assert_allclose(obj(gold[f"images/{batch}"]),
                             gold[f"infer/{signature}/{key}/{batch}"], rtol=RTOL, atol=ATOL)
  assert obj.metadata.num_classes.numpy() == gold[f"infer/{signature}/{key}/{batch}"].shape[1]


def test_images_under_another_input_key(tmp_path):
  """`hub.add_signature(inputs=images)` names the only input 'default'
  (callers of hub.Module never name it): the module converts with full
  parity, and the converted signatures call the input 'images'."""
  from tests import bad_inputs as bi  # pylint: disable=g-import-not-at-top
  name = "resnet_v2_tiny"
  meta, gold = golden_meta(name), golden_arrays(name)

  def rename(sm):
    for mg in sm.meta_graphs:
      for sig in mg.signature_def.values():
        sig.inputs["default"].CopyFrom(sig.inputs["images"])
        del sig.inputs["images"]
  src = bi.copy_fixture(name, str(tmp_path / "src"))
  bi.edit_saved_model(src, rename)
  dst = str(tmp_path / "out")
  result = convert.convert(src, dst)
  assert result.verified
  assert any("input 'default'" in note for note in result.notes), result.notes
  obj = tf.saved_model.load(dst)
  for batch in meta["batches"]:
    images = gold[f"images/{batch}"]
    np.testing.assert_allclose(
        obj(images), gold[f"infer/image_feature_vector/default/{batch}"],
        rtol=RTOL, atol=ATOL)
    served = obj.signatures["image_classification"](images=tf.constant(images))
    np.testing.assert_allclose(
        served["default"], gold[f"infer/image_classification/default/{batch}"],
        rtol=RTOL, atol=ATOL)


def test_signature_and_output_key_selection(tmp_path):
  src = module_path("resnet_v2_tiny")
  gold = golden_arrays("resnet_v2_tiny")
  result = convert.convert(src, str(tmp_path / "cls"), signature="image_classification",
                           verify=False)
  assert result.kind == "image_classification"
  obj = tf.saved_model.load(str(tmp_path / "cls"))
  np.testing.assert_allclose(obj(gold["images/b4_32x32"]),
                             gold["infer/image_classification/default/b4_32x32"],
                             rtol=RTOL, atol=ATOL)
  with pytest.raises(errors.UnsupportedModuleError,
                     match=r"unknown signature 'nope'.*image_classification"):
    convert.convert(src, str(tmp_path / "x"), signature="nope", verify=False)
  with pytest.raises(errors.UnsupportedModuleError, match=r"available output keys: default"):
    convert.convert(src, str(tmp_path / "x"), output_key="nope", verify=False)
  with pytest.raises(errors.UnsupportedModuleError, match=r"rank 2.*found shape"):
    convert.convert(src, str(tmp_path / "x"), output_key="resnet_v2/block2", verify=False)
  assert not os.path.exists(tmp_path / "x")


def test_text_module_is_refused(tmp_path):
  with pytest.raises(errors.UnsupportedModuleError, match="text module"):
    convert.convert(module_path("text_module"), str(tmp_path / "out"), verify=False)
  assert not os.path.exists(tmp_path / "out")


# A TF2 SavedModel carries a fixed ~20-30 KB that a TF1 module does not (the
# object graph, signature wrappers, checkpoint object graph, metadata), and
# its saver (the save and restore functions that the TF1 and C++ loaders
# run) ~1.6-1.8 KB per variable, the metadata's included. It only shows on
# the kilobyte-scale fixtures; full-size figures: README.
FIXED_OVERHEAD_BYTES = 32 * 1024
SAVER_BYTES_PER_VARIABLE = 2 * 1024


@pytest.mark.parametrize("name", convertible_fixture_names())
def test_output_is_at_most_1_02x_the_input(convert_cached, name):
  path = convert_cached(name)
  out, src = _size(path), _size(module_path(name))
  variables = len(tf.train.list_variables(os.path.join(path, "variables", "variables")))
  assert out <= 1.02 * src + FIXED_OVERHEAD_BYTES + SAVER_BYTES_PER_VARIABLE * variables, (
      f"{name}: output is {out / src:.3f}x the input ({out} vs {src} bytes)")


def _size(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def test_saved_model_cli_shows_the_output(convert_cached):
  path = convert_cached("resnet_v2_tiny")
  cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  proc = subprocess.run([cli, "show", "--dir", path, "--all"], capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "signature_def['serving_default']" in proc.stdout
  assert "signature_def['image_classification']" in proc.stdout


def test_existing_output_is_refused_and_overwrite_replaces(tmp_path):
  src = module_path("classifier_probabilities")
  src_digest = _tree_digest(src)
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  with pytest.raises(errors.OutputError, match="--overwrite"):
    convert.convert(src, str(dst), verify=False)
  assert (dst / "keep.txt").read_text() == "mine"
  convert.convert(src, str(dst), overwrite=True, verify=False)
  assert not (dst / "keep.txt").exists()
  assert (dst / "saved_model.pb").exists()
  assert _tree_digest(src) == src_digest, "the input was modified"
  leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".out.")]
  assert not leftovers, leftovers


def test_stale_temporaries_of_killed_runs_are_cleaned(tmp_path):
  dead_pid = 2 ** 22 + 12345  # Above the default pid_max: never alive.
  stale = tmp_path / f".out.migrate-tmp-{dead_pid}-abc"
  stale.mkdir()
  (stale / "saved_model.pb").write_bytes(b"partial")
  convert.convert(module_path("classifier_probabilities"), str(tmp_path / "out"),
                  verify=False)
  assert not stale.exists()
  assert (tmp_path / "out" / "saved_model.pb").exists()


@pytest.mark.parametrize("name", ["mobilenet_v1_bn_hparams", "resnet_v2_tiny"])
def test_the_export_traces_call_no_second_time(name, tmp_path):
  # Every trace of `__call__` captures every variable (seconds on a large
  # graph). BUILD traces it in the save's context, with the input names the
  # save looks traces up by, so tf.saved_model.save finds them all.
  from migrate import build  # pylint: disable=g-import-not-at-top
  from migrate import legacy_format  # pylint: disable=g-import-not-at-top
  from migrate import plan as plan_lib  # pylint: disable=g-import-not-at-top
  module = legacy_format.read_module(module_path(name))
  built = build.build(module, plan_lib.make_plan(module))
  call = built.root.__call__
  traced = call.experimental_get_tracing_count()
  assert traced >= 2  # Inference and training, each hparam subset.
  tf.saved_model.save(built.root, str(tmp_path / "out"),
                      signatures=dict(built.signatures), options=build.SAVE_OPTIONS)
  assert call.experimental_get_tracing_count() == traced
  loaded = tf.saved_model.load(str(tmp_path / "out"))
  x = tf.zeros([1] + [d or 8 for d in built.plan.input_shape[1:]])
  np.testing.assert_allclose(loaded(x), built.root(x), rtol=1e-6, atol=1e-6)


def test_alike_signatures_share_one_function():
  # A TF1 module's `default` and `image_feature_vector` signatures often
  # compute the same outputs from the same input; tracing one function each
  # captured every variable twice.
  from migrate import build  # pylint: disable=g-import-not-at-top
  from migrate import legacy_format  # pylint: disable=g-import-not-at-top
  from migrate import plan as plan_lib  # pylint: disable=g-import-not-at-top
  module = legacy_format.read_module(module_path("mobilenet_v1_bn_hparams"))
  built = build.build(module, plan_lib.make_plan(module))
  sigs = built.signatures
  assert sigs["default"] is sigs["image_feature_vector"]
  others = ["image_classification", "image_classification_with_bn_hparams",
            "image_feature_vector_with_bn_hparams", "default"]
  assert len({id(sigs[k]) for k in others}) == len(others)
  assert sigs["serving_default"] is sigs[built.plan.signature]
