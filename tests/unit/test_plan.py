"""PLAN's choices on hand-made module descriptions: which signature and output
`__call__` exposes, and what is refused (each refusal naming what it found).

Fast: `plan.make_plan` reads only the module's signatures (and, for the
hyperparameters, its graph's defaults); no file is read.
"""

from __future__ import annotations

from typing import Optional

import pytest
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2

from migrate import errors
from migrate import legacy_format as lf
from migrate import plan

IMAGES = lf.TensorSpecInfo("images:0", tf.float32, (None, None, None, 3))
FEATURES = lf.TensorSpecInfo("features:0", tf.float32, (None, 64))
LOGITS = lf.TensorSpecInfo("logits:0", tf.float32, (None, 10))


def _sig(name: str, outputs: dict, inputs: Optional[dict] = None) -> lf.Signature:
  return lf.Signature(name, inputs or {"images": IMAGES}, outputs)


def _module(*sigs: lf.Signature, train: Optional[tuple] = None) -> lf.LegacyModule:
  def variant(tags, signatures):
    return lf.GraphVariant(tags=tags, meta_graph=meta_graph_pb2.MetaGraphDef(),
                           signatures={s.name: s for s in signatures}, variables=(),
                           update_ops=(), regularization_losses=(), asset_files={})
  variants = {lf.INFERENCE_TAGS: variant(lf.INFERENCE_TAGS, sigs)}
  if train is not None:
    variants[lf.TRAIN_TAGS] = variant(lf.TRAIN_TAGS, train)
  return lf.LegacyModule(path="m", required_features=(), variants=variants,
                         attachments={}, checkpoint_prefix="m/variables/variables",
                         saved_model_sha256="0" * 64)


FV = _sig("image_feature_vector", {"default": FEATURES})
CLS = _sig("image_classification", {"default": LOGITS})


def test_the_signature_that_default_duplicates_comes_first():
  default = _sig("default", {"default": LOGITS})  # Same tensors as CLS.
  p = plan.make_plan(_module(default, FV, CLS))
  assert (p.signature, p.kind, p.output_width) == ("image_classification",
                                                   plan.CLASSIFICATION, 10)


def test_then_the_feature_vector_then_classification():
  p = plan.make_plan(_module(FV, CLS))
  assert (p.signature, p.output_key, p.kind) == ("image_feature_vector", "default",
                                                 plan.FEATURE_VECTOR)
  assert p.input_shape == (None, None, None, 3) and p.default_image_size is None
  assert plan.make_plan(_module(CLS)).signature == "image_classification"
  # A `default` signature of its own (no alias) with an images input.
  default = _sig("default", {"default": FEATURES})
  assert plan.make_plan(_module(default)).signature == "default"


def test_a_requested_signature_and_output_key():
  two = _sig("image_feature_vector", {"default": FEATURES, "pooled": FEATURES})
  p = plan.make_plan(_module(two, CLS), signature="image_classification")
  assert p.signature == "image_classification" and p.kind == plan.CLASSIFICATION
  assert plan.make_plan(_module(two), output_key="pooled").output_key == "pooled"
  with pytest.raises(errors.UnsupportedModuleError,
                     match=r"m: unknown signature 'nope' \(available signatures: "
                     r"image_classification, image_feature_vector\)"):
    plan.make_plan(_module(two, CLS), signature="nope")
  with pytest.raises(errors.UnsupportedModuleError,
                     match=r"unknown output key 'nope' of signature 'image_feature_vector' "
                     r"\(available output keys: default, pooled\)"):
    plan.make_plan(_module(two), output_key="nope")


def test_the_output_key_default_or_the_only_one():
  only = _sig("image_feature_vector", {"pool": FEATURES})
  assert plan.make_plan(_module(only)).output_key == "pool"
  two = _sig("image_feature_vector", {"a": FEATURES, "b": FEATURES})
  with pytest.raises(errors.UnsupportedModuleError,
                     match="has no output 'default'; choose one with --output_key"):
    plan.make_plan(_module(two))


@pytest.mark.parametrize("sig, words", [
    (_sig("image_feature_vector", {"default": lf.TensorSpecInfo("f:0", tf.float32, (None, 7, 7, 8))}),
     "of rank 2 [batch, features], found shape [None, 7, 7, 8]"),
    (_sig("image_feature_vector", {"default": lf.TensorSpecInfo("f:0", tf.int32, (None, 8))}),
     "to be float32, found int32"),
    (_sig("image_feature_vector", {"default": FEATURES},
          {"images": lf.TensorSpecInfo("i:0", tf.uint8, (None, 8, 8, 3))}),
     "of dtype float32, found uint8"),
    (_sig("image_feature_vector", {"default": FEATURES},
          {"images": lf.TensorSpecInfo("i:0", tf.float32, (None, 8, 8, 1))}),
     "3 RGB channels, found 1 channels"),
    (_sig("image_feature_vector", {"default": FEATURES},
          {"pixels": lf.TensorSpecInfo("i:0", tf.float32, (None, 8, 8, 3))}),
     "expected an input 'images', found inputs: pixels"),
    (_sig("default", {"default": FEATURES},
          {"text": lf.TensorSpecInfo("t:0", tf.string, (None,))}),
     "expected an image module, found a text module"),
    (_sig("embeddings", {"default": FEATURES}),
     "expected an image signature .* found signatures: embeddings"),
])
def test_refusals_name_what_they_found(sig, words):
  with pytest.raises(errors.UnsupportedModuleError, match=words.replace("[", r"\[")
                     .replace("]", r"\]")):
    plan.make_plan(_module(sig))


def test_a_fixed_image_size_and_the_train_graph():
  fixed = lf.TensorSpecInfo("images:0", tf.float32, (None, 224, 224, 3))
  sig = _sig("image_feature_vector", {"default": FEATURES}, {"images": fixed})
  p = plan.make_plan(_module(sig, train=(sig,)))
  assert p.input_shape == (None, 224, 224, 3) and p.default_image_size == (224, 224)
  assert p.has_train_graph and p.remove_output_dropout
  assert not plan.make_plan(_module(sig), remove_output_dropout=False).remove_output_dropout
  with pytest.raises(errors.CorruptModuleError,
                     match="'image_feature_vector' is in the inference graph but not in "
                     "the train graph"):
    plan.make_plan(_module(sig, train=(CLS,)))


def test_the_bn_hparams_signature_gives_keyword_arguments():
  momentum = lf.TensorSpecInfo("momentum:0", tf.float32, ())
  hparams = _sig("image_feature_vector_with_bn_hparams", {"default": FEATURES},
                 {"images": IMAGES, "batch_norm_momentum": momentum})
  p = plan.make_plan(_module(FV, hparams))
  assert p.hparams_signature == "image_feature_vector_with_bn_hparams"
  assert [(h.name, h.tensor_name) for h in p.hparams] == [("batch_norm_momentum",
                                                           "momentum:0")]
  # Its images must be the same tensor, or it is another model.
  other = _sig("image_feature_vector_with_bn_hparams", {"default": FEATURES},
               {"images": lf.TensorSpecInfo("other:0", tf.float32, (None, None, None, 3)),
                "batch_norm_momentum": momentum})
  assert plan.make_plan(_module(FV, other)).hparams == ()
