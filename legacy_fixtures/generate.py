#!/usr/bin/env python3
"""Build the legacy TF1 Hub fixture corpus and record its goldens (runs in the LEGACY venv only).

    .legacy-venv/bin/python legacy_fixtures/generate.py                  # all small fixtures
    .legacy-venv/bin/python legacy_fixtures/generate.py --only resnet_v2_tiny,refvars_bn
    .legacy-venv/bin/python legacy_fixtures/generate.py --check          # regenerate in a temp dir
                                                                         # and compare with committed
    .legacy-venv/bin/python legacy_fixtures/generate.py --full resnet_v2_50   # -> legacy_fixtures/full/

Modules are made with the original exporter (``hub.create_module_spec`` + ``hub.Module.export``)
and the goldens are recorded by ``hub.Module`` itself in graph mode. The golden format is defined
in docs/CONTRACT.md. Everything is seeded; see README.md for what each fixture covers.
"""
import argparse
import dataclasses
import datetime
import functools
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import _legacy_shims  # noqa: E402,F401  (must come before tf_slim)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_hub as hub  # noqa: E402
import tf_slim as slim  # noqa: E402
from tf_slim.nets import inception_v2, inception_v3, resnet_utils, resnet_v2  # noqa: E402
from tensorflow.core.protobuf import saved_model_pb2  # noqa: E402

import fixture_nets  # noqa: E402

tf1 = tf.compat.v1
GRAPH_SEED = 20240611
RANDOM_OP_TYPES = {"RandomUniform", "RandomStandardNormal", "TruncatedNormal",
                   "RandomUniformInt", "Multinomial", "RandomShuffle", "RandomGamma",
                   "RandomPoisson", "RandomPoissonV2", "StatelessRandomUniformV2",
                   "StatelessRandomNormalV2", "StatelessTruncatedNormalV2"}
ASSIGN_OP_TYPES = {"Assign", "AssignAdd", "AssignSub", "AssignVariableOp",
                   "AssignAddVariableOp", "AssignSubVariableOp"}
TRAIN_TAGS = [(set(), {"is_training": False}), ({"train"}, {"is_training": True})]
INFER_TAGS = [(set(), {"is_training": False})]
BN_MOMENTUM_DEFAULT = 0.99
BN_MOMENTUM_HPARAM = 0.997
_SUPPORTED_COLLECTIONS = None  # filled lazily from hub's native_module


def _session_config():
    # One thread each: reductions are then summed in a fixed order -> reproducible goldens.
    return tf1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1)


def _seed_for(name, salt=""):
    return zlib.crc32((name + "/" + salt).encode()) & 0x7FFFFFFF


def batch_tag(b, h, w):
    return "b%d_%dx%d" % (b, h, w)


# =============================================================================================
# Fixture cases
# =============================================================================================
@dataclasses.dataclass
class Case:
    name: str
    description: str
    case: str
    build: Callable  # build(is_training) -> None; called inside module_fn, adds signatures
    tags_and_args: list = dataclasses.field(default_factory=lambda: list(TRAIN_TAGS))
    image_size: Optional[Tuple[int, int]] = (32, 32)  # default (= fixed if not variable) size
    variable_input_size: bool = False
    extra_sizes: List[Tuple[int, int]] = dataclasses.field(default_factory=list)
    grad: Optional[Tuple[str, str, bool]] = ("image_classification", "default", False)
    # signature -> {output key: name of the dropout INPUT tensor relative to the apply scope}
    nodropout: Dict[str, Dict[str, str]] = dataclasses.field(default_factory=dict)
    hparams: Dict[str, float] = dataclasses.field(default_factory=dict)
    hparams_signature: Optional[str] = None
    init_values: Optional[Callable] = None  # extra (session, var_map, rng) initialisation
    expect_refusal: Optional[str] = None
    asset_files: Dict[str, str] = dataclasses.field(default_factory=dict)
    is_text: bool = False
    # The same network with the forward computation in place of a custom gradient hub.Module
    # cannot run (build(case, is_training)): grad_norm/ is then the analytic gradient from it.
    analytic_grad_build: Optional[Callable] = None
    # Also record grad_norm_infer/: gradients in the set() graph, free of random ops.
    infer_grads: bool = False
    # Export in a fresh process: op attributes that embed a process counter (the
    # `_gradient_op_type` "CustomGradient-<uid>" of tf.custom_gradient) stay reproducible.
    export_in_subprocess: bool = False

    @property
    def has_train(self):
        return any(tags == {"train"} for tags, _ in self.tags_and_args)

    def batches(self):
        if self.image_size is None:
            return []
        sizes = [self.image_size] + list(self.extra_sizes)
        return [(b, h, w) for (h, w) in sizes for b in (1, 4)]

    def train_batch(self):
        return (4,) + tuple(self.image_size)


def _image_placeholder(case, name="images"):
    if case.variable_input_size:
        shape = [None, None, None, 3]
    else:
        shape = [None, case.image_size[0], case.image_size[1], 3]
    return tf1.placeholder(tf.float32, shape, name=name)


def _attach_size(case, via_message=False):
    info = hub.ImageModuleInfo()
    info.default_image_size.height = case.image_size[0]
    info.default_image_size.width = case.image_size[1]
    if via_message:
        hub.attach_message("image_module_info", info)
    else:
        hub.attach_image_module_info(info)


def _standard_signatures(images, features, logits, extra_features=None):
    fv = {"default": features}
    fv.update(extra_features or {})
    hub.add_signature("default", {"images": images}, fv)
    hub.add_signature("image_feature_vector", {"images": images}, fv)
    hub.add_signature("image_classification", {"images": images}, {"default": logits})


def _momentum_input():
    """The `batch_norm_momentum` input of the *_with_bn_hparams signatures (the BN decay)."""
    return tf1.placeholder_with_default(
        tf.constant(BN_MOMENTUM_DEFAULT, tf.float32), [], name="batch_norm_momentum")


def _hparams_signatures(images, momentum, features, logits):
    hub.add_signature("image_feature_vector_with_bn_hparams",
                      {"images": images, "batch_norm_momentum": momentum}, {"default": features})
    hub.add_signature("image_classification_with_bn_hparams",
                      {"images": images, "batch_norm_momentum": momentum}, {"default": logits})


# ---- 1. resnet_v2_tiny -----------------------------------------------------------------------
def build_resnet_v2_tiny(case, is_training, full=False):
    images = _image_placeholder(case)
    if full:
        blocks = [
            resnet_v2.resnet_v2_block("block1", base_depth=64, num_units=3, stride=2),
            resnet_v2.resnet_v2_block("block2", base_depth=128, num_units=4, stride=2),
            resnet_v2.resnet_v2_block("block3", base_depth=256, num_units=6, stride=2),
            resnet_v2.resnet_v2_block("block4", base_depth=512, num_units=3, stride=1),
        ]
        scope, num_classes = "resnet_v2_50", 1001
    else:
        blocks = [
            resnet_v2.resnet_v2_block("block1", base_depth=4, num_units=2, stride=2),
            resnet_v2.resnet_v2_block("block2", base_depth=8, num_units=1, stride=2),
            resnet_v2.resnet_v2_block("block3", base_depth=8, num_units=1, stride=1),
        ]
        scope, num_classes = "resnet_v2", 10
    with slim.arg_scope(resnet_v2.resnet_arg_scope(weight_decay=1e-4)):
        net, end_points = resnet_v2.resnet_v2(
            images, blocks, num_classes=num_classes, is_training=is_training, global_pool=True,
            include_root_block=True, scope=scope)
    # tf_slim 1.1.0's resnet_v2 has no spatial_squeeze and no 'global_pool' end point.
    pool5 = tf1.get_default_graph().get_tensor_by_name(scope + "/pool5:0")
    logits = tf.squeeze(net, [1, 2], name="logits")
    features = tf.squeeze(pool5, [1, 2], name="feature_vector")
    block = "%s/block2" % scope
    _standard_signatures(images, features, logits, {block: end_points[block]})
    _attach_size(case)


# ---- 2. mobilenet_v1_bn_hparams --------------------------------------------------------------
def build_mobilenet_v1_bn_hparams(case, is_training):
    images = _image_placeholder(case)
    momentum = _momentum_input()
    logits, features, _ = fixture_nets.mobilenet_v1(
        images, num_classes=10, is_training=is_training, batch_norm_decay=momentum)
    _standard_signatures(images, features, logits)
    _hparams_signatures(images, momentum, features, logits)
    _attach_size(case)


# ---- 3. inception_v2_tiny --------------------------------------------------------------------
def build_inception_v2_tiny(case, is_training):
    images = _image_placeholder(case)
    with slim.arg_scope(inception_v2.inception_v2_arg_scope(weight_decay=4e-5)):
        # slim inception_v2, base cut after Mixed_4a to keep the committed graph small.
        logits, end_points = fixture_nets.inception_v2_truncated(
            images, num_classes=10, is_training=is_training, final_endpoint="Mixed_4a")
    features = tf.squeeze(end_points["AvgPool_1a"], [1, 2], name="feature_vector")
    _standard_signatures(images, features, logits)
    _attach_size(case)


# ---- 4. inception_v3_tiny --------------------------------------------------------------------
def build_inception_v3_tiny(case, is_training, full=False):
    images = _image_placeholder(case)
    with slim.arg_scope(inception_v3.inception_v3_arg_scope(weight_decay=4e-5)):
        if full:
            logits, end_points = inception_v3.inception_v3(
                images, num_classes=1001, is_training=is_training, dropout_keep_prob=0.8,
                create_aux_logits=False, scope="InceptionV3")
        else:
            # slim inception_v3, base cut after Mixed_5d to keep the committed graph small.
            logits, end_points = fixture_nets.inception_v3_truncated(
                images, num_classes=10, is_training=is_training, final_endpoint="Mixed_5d")
    # As the tfhub.dev inception_v3 feature vectors: PreLogits, which is AFTER Dropout_1b.
    features = tf.squeeze(end_points["PreLogits"], [1, 2], name="feature_vector")
    _standard_signatures(images, features, logits)
    _attach_size(case)


# ---- 5. mobilenet_quantops -------------------------------------------------------------------
def build_mobilenet_quantops(case, is_training):
    images = _image_placeholder(case)
    logits, features, _ = fixture_nets.mobilenet_quant(images, 10, is_training)
    _standard_signatures(images, features, logits)
    _attach_size(case)


def init_quant_ranges(session, var_map, rng):
    """Weight ranges = the weights' actual min/max (as LastValueQuantize leaves them);
    activation ranges = non-trivial seeded values."""
    for name, var in sorted(var_map.items()):
        if name.endswith("weights_quant/min") or name.endswith("weights_quant/max"):
            scope = name.rsplit("/", 2)[0]
            wname = scope + ("/depthwise_weights" if "depthwise" in scope.split("/")[-1]
                             else "/weights")
            w = session.run(var_map[wname])
            val = min(float(w.min()), 0.0) if name.endswith("min") else max(float(w.max()), 0.0)
            var.load(np.float32(val), session)
        elif name.endswith("act_quant/min"):
            var.load(np.float32(0.0), session)
        elif name.endswith("act_quant/max"):
            var.load(np.float32(rng.uniform(2.0, 6.0)), session)


# ---- 6. refvars_bn ---------------------------------------------------------------------------
def build_refvars_bn(case, is_training):
    images = _image_placeholder(case)
    # Opt out of resource variables, as modules exported with TF1.x did: VariableV2 + ref updates.
    with tf1.variable_scope(tf1.get_variable_scope(), use_resource=False):
        logits, features = fixture_nets.small_convnet(images, 10, is_training, scope="RefNet")
    _standard_signatures(images, features, logits)
    _attach_size(case)


def build_bn_in_place_mixed(case, is_training):
    images = _image_placeholder(case)
    # The first batch norm updates in place (updates_collections=None), the later ones through
    # UPDATE_OPS: their updates depend on its output, which carries its update.
    logits, features = fixture_nets.small_convnet(images, 5, is_training, depths=(6, 8),
                                                  scope="MixedNet", in_place_updates=(1,))
    _standard_signatures(images, features, logits)
    _attach_size(case)


# ---- 7. inference_only_asset -----------------------------------------------------------------
LABELS = ["background"] + ["class_%d" % i for i in range(1, 10)]


def build_inference_only_asset(case, is_training, asset_dir=None):
    images = _image_placeholder(case)
    labels_path = os.path.join(asset_dir, "labels.txt")
    asset = tf.constant(labels_path, name="labels_filename")
    tf1.add_to_collection(tf1.GraphKeys.ASSET_FILEPATHS, asset)
    logits, features = fixture_nets.small_convnet(images, 10, is_training, depths=(8, 12),
                                                  scope="AssetNet")
    hub.add_signature("default", {"images": images}, {"default": logits})
    hub.add_signature("image_classification", {"images": images}, {"default": logits})
    hub.add_signature("image_feature_vector", {"images": images}, {"default": features})
    _attach_size(case)


# ---- 8. classifier_probabilities -------------------------------------------------------------
def build_classifier_probabilities(case, is_training):
    images = _image_placeholder(case)
    logits, _ = fixture_nets.small_convnet(images, 12, is_training, depths=(8, 16),
                                           scope="Classifier")
    probs = tf.nn.softmax(logits, name="Predictions")
    hub.add_signature("default", {"images": images}, {"image_classifier": probs})
    hub.add_signature("image_classification", {"images": images}, {"image_classifier": probs})
    _attach_size(case, via_message=True)


# ---- 9. text_module --------------------------------------------------------------------------
def build_text_module(case, is_training):
    sentences = tf1.placeholder(tf.string, [None], name="sentences")
    tokens = tf.compat.v1.string_split(sentences, delimiter=" ")
    ids = tf.SparseTensor(tokens.indices, tf.strings.to_hash_bucket_fast(tokens.values, 64),
                          tokens.dense_shape)
    emb = tf1.get_variable("embeddings", [64, 8],
                           initializer=tf1.random_normal_initializer(stddev=0.3))
    out = tf.nn.embedding_lookup_sparse(emb, ids, None, combiner="sqrtn")
    hub.add_signature("default", {"default": sentences}, {"default": out})


# ---- 10. nasnet_cell_droppath ----------------------------------------------------------------
def build_nasnet_cell_droppath(case, is_training):
    images = _image_placeholder(case)
    with fixture_nets.nasnet_arg_scope(is_training, weight_decay=4e-5, batch_norm_decay=0.9997):
        # CIFAR stem, then a reduction cell and a normal cell (slim's layout for num_cells=1,
        # num_reduction_layers=1); drop path at NASNet-A Large's 0.7.
        logits, features = fixture_nets.nasnet_a(
            images, 10, is_training, num_cells=1, num_conv_filters=8, num_reduction_layers=1,
            drop_path_keep_prob=0.7, dense_dropout_keep_prob=0.5, stem="cifar")
    _standard_signatures(images, tf.identity(features, "feature_vector"), logits)
    _attach_size(case)


# ---- 11./12. efficientnet_defun_swish, efficientnet_tf2_swish --------------------------------
# (kernel, repeats, stride, expand, in, out, se): a strided block without expansion (as
# EfficientNet's first), then an expanding residual one with drop connect: survival 0.6
# (B0's last block has 0.8), so that the train batch of 4 really loses an example.
EFFICIENTNET_TINY_BLOCKS = [(3, 1, 2, 1, 8, 16, 0.25), (5, 1, 1, 6, 16, 16, 0.25)]


def build_efficientnet_tiny(case, is_training, swish):
    images = _image_placeholder(case)
    logits, features = fixture_nets.efficientnet(
        images, 10, is_training, blocks=EFFICIENTNET_TINY_BLOCKS, stem_filters=8,
        head_filters=32, dropout_rate=0.2, survival_prob=0.2, swish=swish,
        scope="efficientnet-tiny")
    _standard_signatures(images, tf.identity(features, "feature_vector"), logits)
    _attach_size(case)


def _case_list():
    C = Case
    return [
        C("resnet_v2_tiny",
          "slim resnet_v2 (3 tiny bottleneck blocks), variable input size, weight decay, "
          "image_module_info 32x32; image_feature_vector also outputs the rank-4 "
          "'resnet_v2/block2'.",
          "variable_size+bn+weight_decay+extra_spatial_output",
          build_resnet_v2_tiny, image_size=(32, 32), variable_input_size=True,
          extra_sizes=[(40, 48)]),
        C("mobilenet_v1_bn_hparams",
          "MobileNet-V1-style depthwise-separable net, fixed 32x32, with *_with_bn_hparams "
          "signatures taking batch_norm_momentum (placeholder_with_default 0.99) as BN decay.",
          "bn_hparams_signatures",
          build_mobilenet_v1_bn_hparams, image_size=(32, 32),
          hparams={"batch_norm_momentum": BN_MOMENTUM_HPARAM},
          hparams_signature="image_feature_vector_with_bn_hparams"),
        C("inception_v2_tiny",
          "slim inception_v2 (depth_multiplier 0.1, base cut after Mixed_4a), fixed 64x64; dropout before the logits in "
          "the train graph, feature vector = AvgPool_1a before dropout.",
          "dropout_before_logits",
          build_inception_v2_tiny, image_size=(64, 64)),
        C("inception_v3_tiny",
          "slim inception_v3 (depth_multiplier 0.1, no aux logits, base cut after Mixed_5d), "
          "fixed 75x75; "
          "image_feature_vector = PreLogits which comes AFTER Dropout_1b (dropout on output "
          "features in the train graph).",
          "dropout_on_feature_output",
          build_inception_v3_tiny, image_size=(75, 75),
          nodropout={"default": {"default": "InceptionV3/Logits/AvgPool_1a_7x7/AvgPool:0"},
                     "image_feature_vector": {
                         "default": "InceptionV3/Logits/AvgPool_1a_7x7/AvgPool:0"}}),
        C("mobilenet_quantops",
          "tiny MobileNet-V1 with fake_quant_with_min_max_vars on weights and activations; "
          "min/max are non-trainable variables, updated in training via UPDATE_OPS.",
          "fake_quant",
          build_mobilenet_quantops, image_size=(32, 32), init_values=init_quant_ranges),
        C("refvars_bn",
          "small conv+BN net built with use_resource=False: VariableV2 variables, ref-typed "
          "AssignSub moving-average updates, weight decay.",
          "reference_variables",
          build_refvars_bn, image_size=(32, 32)),
        C("bn_in_place_mixed",
          "small conv+BN net whose first batch norm updates its moving averages in place "
          "(updates_collections=None) and the second through UPDATE_OPS, fixed 16x16, weight "
          "decay.",
          "in_place_and_collection_bn_updates",
          build_bn_in_place_mixed, image_size=(16, 16)),
        C("inference_only_asset",
          "only the set() graph (no train tag) and an asset file assets/labels.txt registered "
          "in ASSET_FILEPATHS.",
          "inference_only+asset",
          build_inference_only_asset, tags_and_args=list(INFER_TAGS), image_size=(32, 32),
          asset_files={"labels.txt": "\n".join(LABELS) + "\n"}),
        C("classifier_probabilities",
          "AIY-style classifier: only output is softmax probabilities under key "
          "'image_classifier'; image_module_info attached via hub.attach_message.",
          "probabilities_nondefault_key",
          build_classifier_probabilities, image_size=(32, 32),
          grad=("image_classification", "image_classifier", False)),
        C("text_module",
          "text module: string input 'default' [None], hashed bag-of-words embedding. "
          "Not an image module: the converter must refuse it.",
          "not_an_image_module",
          build_text_module, tags_and_args=list(INFER_TAGS), image_size=None, grad=None,
          is_text=True,
          expect_refusal="not an image module: signature 'default' takes a tf.string input "
                         "'default' of shape [None], not float32 images"),
        C("nasnet_cell_droppath",
          "NASNet-A cells (a reduction and a normal cell; separable convs, relu, batch norm, "
          "concatenation, factorized reduction) on a CIFAR-style stem, fixed 32x32, weight decay; "
          "the train graph applies drop path (keep 0.7 scaled by cell depth) after every cell "
          "operation and dropout before the logits, all from UNSEEDED RandomUniform ops.",
          "unseeded_drop_path",
          build_nasnet_cell_droppath, image_size=(32, 32), infer_grads=True),
        C("efficientnet_defun_swish",
          "EfficientNet MBConv blocks (1x1 expand, depthwise, squeeze-excite, 1x1 project, "
          "drop connect from UNSEEDED RandomUniform, skip) with tf.layers batch norm, fixed "
          "32x32; swish as TF 1.x built it: the function.Defun 'swish_f32' whose gradient "
          "'swish_grad_f32f32' is registered in the function library (library.gradient).",
          "library_gradient+unseeded_drop_connect",
          functools.partial(build_efficientnet_tiny, swish="defun"), image_size=(32, 32),
          infer_grads=True),
        C("efficientnet_tf2_swish",
          "The same EfficientNet blocks with swish built by TF 2.x's tf.nn.swish: an IdentityN "
          "whose _gradient_op_type names a Python gradient that export does not save, so "
          "hub.Module cannot differentiate the module; grad_norm/ is the analytic gradient of "
          "the forward computation (the same weights with x * sigmoid(x) in place of swish).",
          "lost_custom_gradient+unseeded_drop_connect",
          functools.partial(build_efficientnet_tiny, swish="tf2"), image_size=(32, 32),
          infer_grads=True, analytic_grad_build=functools.partial(build_efficientnet_tiny, swish="plain"),
          export_in_subprocess=True),
    ]


CASES = {c.name: c for c in _case_list()}

# Full-size modules (not committed; benchmarks and memory measurements). Each has set() and
# {"train"} graphs, the standard signatures, non-trivial BN statistics.
FULL = {
    "resnet_v2_50": dict(image_size=(224, 224), variable=True),
    "inception_v3": dict(image_size=(299, 299), variable=False),
    "mobilenet_v2_100": dict(image_size=(224, 224), variable=False),
    "mobilenet_v1_100": dict(image_size=(224, 224), variable=False),
    "inception_resnet_v2": dict(image_size=(299, 299), variable=False),
    "nasnet_mobile": dict(image_size=(224, 224), variable=False),
    "efficientnet_b0": dict(image_size=(224, 224), variable=False),
    "efficientnet_b0_defun_swish": dict(image_size=(224, 224), variable=False),
    # Synthetic: graph size without model size (issue 17's scaling series). A stack of tiny
    # residual conv + batch norm blocks, ~10k / 30k / 100k nodes over the two MetaGraphs.
    "scaling_10k": dict(image_size=(32, 32), variable=False, blocks=105),
    "scaling_30k": dict(image_size=(32, 32), variable=False, blocks=315),
    "scaling_100k": dict(image_size=(32, 32), variable=False, blocks=1050),
}
# The layer tables these follow (fixture_nets.py): MobileNet-V1 (Howard et al. 2017, table 1),
# MobileNet-V2 (Sandler et al. 2018, table 2), Inception-ResNet-v2 (Szegedy et al. 2016,
# figures 9-18 as slim builds them), NASNet-A Mobile (Zoph et al. 2018: 4 @ 1056, N=4,
# 44 filters), EfficientNet-B0 (Tan & Le 2019, table 1).


def _build_full(name, case, is_training):
    if name == "resnet_v2_50":
        build_resnet_v2_tiny(case, is_training, full=True)
        return
    if name == "inception_v3":
        build_inception_v3_tiny(case, is_training, full=True)
        return
    images = _image_placeholder(case)
    momentum = None
    if name.startswith("scaling_"):
        logits, features = _scaling_net(images, FULL[name]["blocks"], is_training)
    elif name == "mobilenet_v2_100":
        momentum = _momentum_input()
        logits, features, _ = fixture_nets.mobilenet_v2(
            images, 1001, is_training, depth_multiplier=1.0, batch_norm_decay=momentum)
    elif name == "mobilenet_v1_100":
        momentum = _momentum_input()
        logits, features, _ = fixture_nets.mobilenet_v1(
            images, 1001, is_training, batch_norm_decay=momentum,
            conv_defs=fixture_nets.MOBILENET_V1_DEFS, first_depth=32, dropout_keep_prob=0.999)
    elif name == "inception_resnet_v2":
        momentum = _momentum_input()
        # Without slim's auxiliary head (3.4M parameters), as the published 55.8M count.
        logits, end_points = fixture_nets.inception_resnet_v2(
            images, 1001, is_training, batch_norm_decay=momentum, create_aux_logits=False)
        # As slim's PreLogitsFlatten: AFTER the dropout (like inception_v3's PreLogits).
        features = end_points["PreLogitsFlatten"]
    elif name == "nasnet_mobile":
        momentum = _momentum_input()
        with fixture_nets.nasnet_arg_scope(is_training, batch_norm_decay=momentum):
            # NASNet-A Mobile trains without drop path (keep 1.0); Large's 0.7 is used here so
            # that the train graph has the unseeded drop-path ops of the NASNet family.
            logits, features = fixture_nets.nasnet_a(
                images, 1001, is_training, num_cells=12, num_conv_filters=44,
                drop_path_keep_prob=0.7, stem="imagenet")
    elif name in ("efficientnet_b0", "efficientnet_b0_defun_swish"):
        # EfficientNet's hub modules classify into 1000 classes (no background class).
        logits, features = fixture_nets.efficientnet(
            images, 1000, is_training,
            swish="defun" if name.endswith("defun_swish") else "tf2")
    else:
        raise ValueError(name)
    _standard_signatures(images, features, logits)
    if momentum is not None:
        _hparams_signatures(images, momentum, features, logits)
    _attach_size(case)


def _scaling_net(images, blocks, is_training):
    """`blocks` residual blocks of an 8-channel 3x3 conv with slim's batch norm and L2 weight
    decay, on 32x32 images: node count grows with `blocks`, compute and variables stay tiny."""
    with slim.arg_scope([slim.conv2d], normalizer_fn=slim.batch_norm,
                        weights_regularizer=slim.l2_regularizer(1e-4)), \
            slim.arg_scope([slim.batch_norm], is_training=is_training, decay=0.997):
        net = slim.conv2d(images, 8, [3, 3], scope="stem")
        for i in range(blocks):
            net = tf.nn.relu(net + slim.conv2d(net, 8, [3, 3], activation_fn=None,
                                               scope="block%d" % i))
    features = tf.reduce_mean(net, [1, 2], name="feature_vector")
    logits = slim.fully_connected(features, 10, activation_fn=None, scope="logits")
    return logits, features


# =============================================================================================
# Export
# =============================================================================================
def _supported_collections():
    global _SUPPORTED_COLLECTIONS
    if _SUPPORTED_COLLECTIONS is None:
        from tensorflow_hub import native_module
        _SUPPORTED_COLLECTIONS = set(native_module._SUPPORTED_COLLECTIONS)  # pylint: disable=protected-access
    return _SUPPORTED_COLLECTIONS


def _module_fn(build, is_training):
    tf1.set_random_seed(GRAPH_SEED)  # seeds initializers and dropout (op seeds become attrs)
    build(is_training=is_training)


def _collections_to_drop(module_fn, tags_and_args):
    """Dry-run module_fn and list the collections hub would reject (slim end_points etc.)."""
    drop = set()
    for _, args in tags_and_args:
        g = tf.Graph()
        with g.as_default():
            # attach/add_signature record into the graph's collections; that's fine here.
            module_fn(**args)
            drop.update(k for k in g.get_all_collection_keys()
                        if k not in _supported_collections())
    return sorted(drop)


def _var_map(module):
    out = {}
    for name, var in module.variable_map.items():
        if isinstance(var, (list, tuple)):
            raise ValueError("partitioned variables are not used in the fixtures: %s" % name)
        out[name[:-2] if name.endswith(":0") else name] = var
    return out


def _nontrivial_values(session, var_map, rng):
    """Seeded non-trivial BN statistics/affine params so train and inference really differ."""
    values = {}
    for name in sorted(var_map):
        var = var_map[name]
        shape = var.get_shape().as_list()
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "moving_mean":
            val = rng.normal(0.0, 0.5, shape)
        elif leaf == "moving_variance":
            val = rng.uniform(0.5, 2.0, shape)
        elif leaf == "gamma":
            val = rng.uniform(0.5, 1.5, shape)
        elif leaf == "beta":
            val = rng.normal(0.0, 0.2, shape)
        else:
            continue
        values[var] = val.astype(np.float32)
    # One run for all (what Variable.load does per variable: a run per variable prunes the
    # whole graph each time, quadratic at 100k nodes).
    session.run([v.initializer for v in values],
                {v.initial_value: val for v, val in values.items()})


def export_module(case, path, build=None, drop_collections=None):
    """Create the module spec, instantiate it once, set seeded values and export to `path`."""
    build = build or functools.partial(case.build, case)
    tmp_assets = None
    if case.asset_files:
        tmp_assets = tempfile.mkdtemp(prefix="legacy_assets_")
        for fname, content in case.asset_files.items():
            with open(os.path.join(tmp_assets, fname), "w") as f:
                f.write(content)
        build = functools.partial(build, asset_dir=tmp_assets)
    module_fn = functools.partial(_module_fn, build)
    if drop_collections is None:
        drop_collections = _collections_to_drop(module_fn, case.tags_and_args)
    spec = hub.create_module_spec(module_fn, tags_and_args=case.tags_and_args,
                                  drop_collections=drop_collections)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.Graph().as_default():
        tf1.set_random_seed(GRAPH_SEED)
        module = hub.Module(spec, name="module")
        var_map = _var_map(module)
        with tf1.Session(config=_session_config()) as sess:
            sess.run(tf1.global_variables_initializer())
            sess.run(tf1.tables_initializer())
            rng = np.random.RandomState(_seed_for(case.name, "values"))
            _nontrivial_values(sess, var_map, rng)
            if case.init_values:
                case.init_values(sess, var_map, rng)
            module.export(path, sess)
    if tmp_assets:
        shutil.rmtree(tmp_assets)
    _canonicalize_saved_model(path)
    return drop_collections


def _canonicalize_saved_model(path):
    """Re-serialize saved_model.pb deterministically (sorted map entries).

    hub's exporter writes the SavedModel proto with non-deterministic map ordering (collection_def,
    signature_def, attr maps), so two exports differ bytewise while the protos are equal. Parsing
    and re-serializing with deterministic=True keeps the proto identical and the bytes stable.
    """
    pb = os.path.join(path, "saved_model.pb")
    sm = saved_model_pb2.SavedModel()
    with open(pb, "rb") as f:
        sm.ParseFromString(f.read())
    with open(pb, "wb") as f:
        f.write(sm.SerializeToString(deterministic=True))


# =============================================================================================
# Goldens
# =============================================================================================
def _read_saved_model(path):
    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    return sm


def _default_alias(path):
    """Which non-default signature the `default` signature duplicates (same tensors), if any."""
    sm = _read_saved_model(path)
    mg = [m for m in sm.meta_graphs if not m.meta_info_def.tags][0]
    sigs = mg.signature_def
    if "default" not in sigs:
        return None
    key = lambda s: (sorted((k, v.name) for k, v in s.inputs.items()),  # noqa: E731
                     sorted((k, v.name) for k, v in s.outputs.items()))
    for name in sorted(sigs):
        if name != "default" and key(sigs[name]) == key(sigs["default"]):
            return name
    return None


def _variable_op_types(path):
    sm = _read_saved_model(path)
    types = set()
    for mg in sm.meta_graphs:
        for node in mg.graph_def.node:
            if node.op in ("VariableV2", "Variable", "VarHandleOp"):
                types.add(node.op)
    return sorted(types)


def _info_json(info_dict):
    out = {}
    for k in sorted(info_dict):
        info = info_dict[k]
        shape = info.get_shape()
        out[k] = {"dtype": info.dtype.name,
                  "shape": None if shape.rank is None else shape.as_list(),
                  "is_sparse": bool(info.is_sparse)}
    return out


def _versions():
    import platform
    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "tensorflow_hub": hub.__version__, "tf_slim": _dist_version("tf-slim"),
            "numpy": np.__version__, "protobuf": _dist_version("protobuf"),
            "tf_keras": _dist_version("tf-keras"),
            "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS")}


def _dist_version(name):
    import importlib.metadata as md
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _images(case):
    out = {}
    for i, (b, h, w) in enumerate(case.batches()):
        rng = np.random.RandomState(_seed_for(case.name, "images/%d" % i))
        # Like decoded 8-bit images scaled to [0, 1] (k/255): realistic and compresses well.
        pixels = rng.randint(0, 256, (b, h, w, 3))
        out[batch_tag(b, h, w)] = (pixels / 255.0).astype(np.float32)
    return out


def _ancestors(tensors):
    seen, stack = set(), [t if isinstance(t, tf.Operation) else t.op for t in tensors]
    while stack:
        op = stack.pop()
        if op in seen:
            continue
        seen.add(op)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return seen


def _unseeded(op):
    return op.get_attr("seed") == 0 and op.get_attr("seed2") == 0


def _seeded_draw(op, like, seed):
    """Seeded values with the shape, dtype and distribution of random op `op`."""
    rng = np.random.RandomState(seed)
    if op.type in ("RandomUniform", "StatelessRandomUniformV2"):
        value = rng.uniform(0.0, 1.0, like.shape)
    elif op.type in ("RandomStandardNormal", "StatelessRandomNormalV2"):
        value = rng.standard_normal(like.shape)
    else:
        raise ValueError("no seeded stand-in for unseeded %s %s" % (op.type, op.name))
    return value.astype(like.dtype)


def _hub_cannot_differentiate(loss, variables):
    """Proves that tf.gradients fails on the hub.Module application; says so for the json."""
    try:
        tf.gradients(loss, variables)
    except LookupError as e:
        first = str(e).strip().splitlines()[0].split(". ")[0]
        return ("analytic: hub.Module cannot differentiate this module (%s); grad_norm/ are the "
                "gradients of the forward computation, computed by hub.Module from the same "
                "weights in the same network built with x * tf.sigmoid(x) in place of swish, "
                "with the same images, probe and random values" % first)
    raise AssertionError("expected hub.Module to fail to differentiate this module")


def _plain_spec(case):
    """The module spec of case.analytic_grad_build (the network without the lost gradient)."""
    module_fn = functools.partial(_module_fn, functools.partial(case.analytic_grad_build, case))
    return hub.create_module_spec(module_fn, tags_and_args=case.tags_and_args,
                                  drop_collections=_collections_to_drop(module_fn,
                                                                        case.tags_and_args))


def _module_grad_norms(source, tags, signature, output_key, images, probe, random_values,
                       checkpoint=None):
    """hub.Module(source, tags, trainable=True) applied to `signature`: the output and
    {variable: norm of d(sum(output * probe))/d(variable)}, in one run with the random ops fed
    `random_values` (which must be exactly the random ops the output depends on) and, from
    `checkpoint` if given, the variables' values."""
    with tf.Graph().as_default() as g:
        module = hub.Module(source, tags=tags, trainable=True)
        var_map = _var_map(module)
        trainable = {v.op.name for v in tf1.trainable_variables()}
        names = sorted(n for n, v in var_map.items() if v.op.name in trainable)
        ins = _make_inputs(module.get_input_info_dict(signature))
        out = module(ins, signature=signature, as_dict=True)[output_key]
        loss = tf.reduce_sum(out * probe)
        grads = tf.gradients(loss, [var_map[n] for n in names])
        scope = "module_apply_%s/" % signature
        here = sorted(op.name[len(scope):] for op in _ancestors([out])
                      if op.type in RANDOM_OP_TYPES)
        assert here == sorted(random_values), (here, sorted(random_values))
        feed = {ins["images"]: images}
        for name, value in random_values.items():
            feed[g.get_tensor_by_name(scope + name + ":0")] = value
        with tf1.Session(config=_session_config()) as sess:
            sess.run(tf1.global_variables_initializer())
            if checkpoint is not None:
                for name, var in var_map.items():
                    var.load(checkpoint.get_tensor(name), sess)
            return sess.run((out, {n: tf.norm(gr) for n, gr in zip(names, grads)}), feed)


def _analytic_grad_norms(case, path, signature, output_key, images, probe, recorded):
    """grad_norm/ from the same weights in the network built by case.analytic_grad_build.

    Returns ({variable: norm}, max |output - recorded output|) after checking that the forward
    computation there reproduces the recorded training output."""
    reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    value, norms = _module_grad_norms(_plain_spec(case), {"train"}, signature, output_key,
                                      images, probe, recorded["rand"], reader)
    diff = float(np.max(np.abs(value - recorded["out"][output_key])))
    assert diff <= 1e-5, "the forward computation differs from the module's by %g" % diff
    return norms, diff


def _inference_grad_norms(case, path, arrays, meta):
    """grad_norm_infer/: the same loss in the set() graph (batch norm with moving statistics, no
    random ops), where any side can reproduce it without feeding random values."""
    sig, key = meta["grad_signature"], meta["grad_output_key"]
    images = arrays["images/" + meta["train_batch"]]
    if case.analytic_grad_build is None:
        value, norms = _module_grad_norms(path, set(), sig, key, images, arrays["grad_probe"], {})
    else:
        reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
        value, norms = _module_grad_norms(_plain_spec(case), set(), sig, key, images,
                                          arrays["grad_probe"], {}, reader)
    diff = float(np.max(np.abs(value - arrays["infer/%s/%s/%s" % (sig, key,
                                                                  meta["train_batch"])])))
    assert diff <= 1e-5, "the inference output differs from the recorded one by %g" % diff
    for n, v in norms.items():
        arrays["grad_norm_infer/" + n] = np.float32(v)


def _extra_feeds(sig_inputs, momentum):
    return {k: np.float32(momentum) for k in sig_inputs if k == "batch_norm_momentum"}


def _make_inputs(info_dict):
    inputs = {}
    for k, info in sorted(info_dict.items()):
        inputs[k] = tf1.placeholder(info.dtype, info.get_shape(), name="in_" + k)
    return inputs


def record_goldens(case, path):
    """Record goldens of module `path` with hub.Module. Returns (arrays, meta)."""
    arrays = {}
    images = _images(case)
    for tag, img in images.items():
        arrays["images/" + tag] = img
    meta = {"name": case.name, "description": case.description, "case": case.case,
            "tags": [sorted(t) for t, _ in case.tags_and_args]}

    # ---------------- inference graph: every output of every signature, every batch -------------
    with tf.Graph().as_default():
        module = hub.Module(path)
        sigs = sorted(module.get_signature_names())
        meta["signatures"] = {s: {"inputs": _info_json(module.get_input_info_dict(s)),
                                  "outputs": _info_json(module.get_output_info_dict(s))}
                              for s in sigs}
        try:
            meta["expected_image_size"] = list(hub.get_expected_image_size(module))
        except (ValueError, KeyError):
            meta["expected_image_size"] = None
        meta["variables"] = sorted(_var_map(module))
    if case.is_text:
        with tf.Graph().as_default():
            module = hub.Module(path, trainable=True)
            trainable = {v.op.name for v in tf1.trainable_variables()}
            vm = _var_map(module)
            meta["trainable_variables"] = sorted(n for n, v in vm.items() if v.op.name in trainable)
            meta["non_trainable_variables"] = sorted(
                n for n, v in vm.items() if v.op.name not in trainable)
        return None, meta
    with tf.Graph().as_default():
        module = hub.Module(path)
        placeholders, fetches = {}, {}
        for s in sigs:
            placeholders[s] = _make_inputs(module.get_input_info_dict(s))
            fetches[s] = module(placeholders[s], signature=s, as_dict=True)
        with tf1.Session(config=_session_config()) as sess:
            sess.run([tf1.global_variables_initializer(), tf1.tables_initializer()])
            for tag, img in images.items():
                feed = {}
                for s in sigs:
                    for k, ph in placeholders[s].items():
                        feed[ph] = img if k == "images" else _extra_feeds([k], BN_MOMENTUM_DEFAULT)[k]
                res = sess.run(fetches, feed)
                for s in sigs:
                    for k, v in res[s].items():
                        arrays["infer/%s/%s/%s" % (s, k, tag)] = np.asarray(v, np.float32)
    meta["infer_feeds"] = ({"batch_norm_momentum": BN_MOMENTUM_DEFAULT}
                           if case.hparams else {})

    # ---------------- train graph -----------------------------------------------------------
    train_tag = batch_tag(*case.train_batch())
    train_img = images[train_tag]
    meta["train_batch"] = train_tag
    meta["batches"] = list(images)
    meta["random_ops"] = {}
    meta["nodropout"] = {}
    grad_sig, grad_key, grad_nodrop = case.grad if case.grad else (None, None, False)
    meta["grad_signature"], meta["grad_output_key"] = grad_sig, grad_key
    meta["grad_uses_nodropout"] = grad_nodrop
    train_tags = {"train"} if case.has_train else set()
    meta["grad_tags"] = sorted(train_tags)
    meta["train_signatures"] = []
    trainable_names = None
    if case.has_train:
        with tf.Graph().as_default():
            meta["train_signatures"] = sorted(
                hub.Module(path, tags={"train"}, trainable=True).get_signature_names())
    train_sigs = list(meta["train_signatures"])
    if not case.has_train and grad_sig:
        train_sigs = []  # only gradients, taken in the inference graph
    for s in (train_sigs or ([grad_sig] if grad_sig else [])):
        in_train_graph = case.has_train
        with tf.Graph().as_default() as g:
            module = hub.Module(path, tags=train_tags, trainable=True)
            var_map = _var_map(module)
            trainable = {v.op.name for v in tf1.trainable_variables()}
            names_tr = sorted(n for n, v in var_map.items() if v.op.name in trainable)
            names_nt = sorted(n for n, v in var_map.items() if v.op.name not in trainable)
            if trainable_names is None:
                trainable_names = (names_tr, names_nt)
            ins = _make_inputs(module.get_input_info_dict(s))
            ops_before = set(g.get_operations())
            out = module(ins, signature=s, as_dict=True)
            new_ops = [op for op in g.get_operations() if op not in ops_before]
            scope = "module_apply_%s/" % s
            assert all(op.name.startswith(scope) or op.name.startswith("in_") for op in new_ops
                       ), [op.name for op in new_ops if not op.name.startswith(scope)][:5]
            updates = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS) if in_train_graph else []
            # Random ops the outputs depend on, and (default signature) the updates: with drop
            # path they feed batch norms further on.
            anc = _ancestors(list(out.values()) + (updates if s == "default" else []))
            rand_ops = sorted((op for op in new_ops if op.type in RANDOM_OP_TYPES and op in anc),
                              key=lambda op: op.name)
            fetch = {"out": out, "rand": {op.name[len(scope):]: op.outputs[0] for op in rand_ops},
                     "reg": tf1.losses.get_regularization_loss()}
            # A batch norm that updates in place (updates_collections=None) does so when the
            # output runs: then the update ops run in that same session.run, as in one training
            # step (run apart, a later batch norm's update would run the in-place one again).
            in_place = any(op.type in ASSIGN_OP_TYPES for op in _ancestors(list(out.values())))
            if s == "default" and in_train_graph and in_place:
                fetch["updates"] = updates
            unseeded = [op for op in rand_ops if _unseeded(op)]
            nodrop = case.nodropout.get(s, {})
            if nodrop:
                fetch["nodrop"] = {k: g.get_tensor_by_name(scope + t) for k, t in nodrop.items()}
                meta["nodropout"][s] = dict(nodrop)
            probe = None
            if s == grad_sig:
                target = fetch["nodrop"][grad_key] if grad_nodrop else out[grad_key]
                shape = [case.train_batch()[0]] + target.get_shape().as_list()[1:]
                probe = np.random.RandomState(_seed_for(case.name, "grad_probe")).normal(
                    0.0, 1.0, shape).astype(np.float32)
                loss = tf.reduce_sum(tf.reshape(target, shape) * probe)
                vars_tr = [var_map[n] for n in names_tr]
                if case.analytic_grad_build is None:
                    grads = tf.gradients(loss, vars_tr)
                    missing = [n for n, gr in zip(names_tr, grads) if gr is None]
                    assert not missing, "no gradient for %s" % missing
                    fetch["gnorm"] = {n: tf.norm(tf.convert_to_tensor(gr))
                                      for n, gr in zip(names_tr, grads)}
                else:
                    meta["grad_source"] = _hub_cannot_differentiate(loss, vars_tr)
            feed = {}
            for k, ph in ins.items():
                feed[ph] = train_img if k == "images" else np.float32(BN_MOMENTUM_DEFAULT)
            with tf1.Session(config=_session_config()) as sess:
                sess.run([tf1.global_variables_initializer(), tf1.tables_initializer()])
                moving_before = sess.run({n: var_map[n] for n in names_nt})
                if unseeded:
                    # Their draws come from OS entropy: feed seeded values instead, as both
                    # sides of a parity check can (train_random/ holds them).
                    # Seeded by the op's name in the module, not the signature's: every
                    # signature's application draws the same values, so the moving averages
                    # (recorded for `default`) go with any signature's train_random/.
                    drawn = sess.run([op.outputs[0] for op in unseeded], feed)
                    for op, value in zip(unseeded, drawn):
                        feed[op.outputs[0]] = _seeded_draw(
                            op, value, _seed_for(case.name, "random/" + op.name[len(scope):]))
                    meta.setdefault("unseeded_random_ops", {})[s] = sorted(
                        op.name[len(scope):] for op in unseeded)
                res = sess.run(fetch, feed)
                if in_train_graph:
                    for k, v in res["out"].items():
                        arrays["train/%s/%s" % (s, k)] = np.asarray(v, np.float32)
                    for k, v in res.get("nodrop", {}).items():
                        v = np.asarray(v, np.float32)
                        if v.ndim == 4 and v.shape[1:3] == (1, 1):
                            v = v.reshape(v.shape[0], v.shape[3])  # the squeezed feature vector
                        arrays["train_nodropout/%s/%s" % (s, k)] = v
                    for k, v in res["rand"].items():
                        arrays["train_random/%s/%s" % (s, k)] = np.asarray(v)
                    meta["random_ops"][s] = sorted(res["rand"])
                if s == grad_sig:
                    arrays["grad_probe"] = probe
                    if case.analytic_grad_build is not None:
                        res["gnorm"], meta["grad_forward_max_abs_diff"] = _analytic_grad_norms(
                            case, path, s, grad_key, train_img, probe, res)
                    for n, v in res["gnorm"].items():
                        arrays["grad_norm/" + n] = np.float32(v)
                if s == "default" or (s == grad_sig and not in_train_graph):
                    arrays["regularization_loss"] = np.float32(res["reg"])
                if s == "default" and in_train_graph:
                    meta["num_update_ops"] = len(updates)
                    # The same random values as the run above (drop path feeds batch norms).
                    for k, v in res["rand"].items():
                        feed[g.get_tensor_by_name(scope + k + ":0")] = v
                    if not in_place:
                        sess.run(updates, feed)
                    after = sess.run({n: var_map[n] for n in names_nt})
                    for n in names_nt:
                        arrays["moving_before/" + n] = np.asarray(moving_before[n], np.float32)
                        arrays["moving_after/" + n] = np.asarray(after[n], np.float32)

    if case.infer_grads:
        _inference_grad_norms(case, path, arrays, meta)
        meta["grad_norm_infer"] = True

    # ---------------- bn hparams: moving averages after one step with the hparam fed -------------
    if case.hparams_signature:
        with tf.Graph().as_default():
            module = hub.Module(path, tags={"train"}, trainable=True)
            var_map = _var_map(module)
            ins = _make_inputs(module.get_input_info_dict(case.hparams_signature))
            module(ins, signature=case.hparams_signature, as_dict=True)
            feed = {ins["images"]: train_img,
                    ins["batch_norm_momentum"]: np.float32(case.hparams["batch_norm_momentum"])}
            with tf1.Session(config=_session_config()) as sess:
                sess.run(tf1.global_variables_initializer())
                sess.run(tf1.get_collection(tf1.GraphKeys.UPDATE_OPS), feed)
                after = sess.run({n: var_map[n] for n in trainable_names[1]})
            for n in trainable_names[1]:
                arrays["moving_after_hparams/" + n] = np.asarray(after[n], np.float32)
    meta["hparams_signature"] = case.hparams_signature

    names_tr, names_nt = trainable_names if trainable_names else ([], meta["variables"])
    meta["trainable_variables"] = names_tr
    meta["non_trainable_variables"] = names_nt
    return arrays, meta


def golden_meta(case, path, meta, drop_collections):
    meta = dict(meta)
    meta.update({
        "variable_input_size": case.variable_input_size,
        "default_signature_aliases": _default_alias(path),
        "reference_variables": "VariableV2" in _variable_op_types(path),
        "variable_op_types": _variable_op_types(path),
        "hparams": dict(case.hparams),
        "expect_refusal": case.expect_refusal,
        "dropped_collections": drop_collections,
        "assets": sorted(case.asset_files),
        "versions": _versions(),
    })
    if case.is_text:
        for k in ("train_signatures", "batches", "trainable_variables", "non_trainable_variables"):
            meta.setdefault(k, [])
        for k in ("train_batch", "grad_signature", "grad_output_key", "hparams_signature"):
            meta.setdefault(k, None)
        meta.setdefault("random_ops", {})
        meta.setdefault("infer_feeds", {})
        meta.setdefault("nodropout", {})
    return {k: meta[k] for k in sorted(meta)}


def save_npz(path, arrays):
    """np.savez_compressed, but byte-for-byte reproducible (fixed zip timestamps, sorted keys)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            data = io.BytesIO()
            np.lib.format.write_array(data, np.asarray(arrays[key]), allow_pickle=False)
            zf.writestr(info, data.getvalue())
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_under(root):
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            out.append(os.path.join(dirpath, f))
    return sorted(out)


def _git_commit():
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (subprocess.CalledProcessError, OSError):
        return None


def _generator_dirty():
    """True if the generator sources differ from generator_commit (uncommitted edits)."""
    try:
        out = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--",
                              "legacy_fixtures/generate.py", "legacy_fixtures/fixture_nets.py",
                              "legacy_fixtures/_legacy_shims.py"],
                             capture_output=True, text=True, check=True).stdout
        return bool(out.strip())
    except (subprocess.CalledProcessError, OSError):
        return None


def write_manifest(case, out_root):
    files = {}
    for p in _files_under(os.path.join(out_root, "modules", case.name)):
        files[os.path.relpath(p, out_root)] = _sha256(p)
    for ext in ("npz", "json"):
        p = os.path.join(out_root, "goldens", "%s.%s" % (case.name, ext))
        if os.path.exists(p):
            files[os.path.relpath(p, out_root)] = _sha256(p)
    manifest = {
        "name": case.name,
        "versions": _versions(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "generator_commit": _git_commit(),
        "generator_dirty": _generator_dirty(),
        "files": files,
        "regenerate": "bash legacy_fixtures/setup_legacy_env.sh && "
                      ".legacy-venv/bin/python legacy_fixtures/generate.py --only %s" % case.name,
        "check": ".legacy-venv/bin/python legacy_fixtures/generate.py --check --only %s"
                 % case.name,
    }
    os.makedirs(os.path.join(out_root, "manifests"), exist_ok=True)
    with open(os.path.join(out_root, "manifests", case.name + ".json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")


def export_in_subprocess(case, path):
    """export_module in a fresh interpreter (see Case.export_in_subprocess)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--export-module",
                           case.name, "--to", path], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError("exporting %s in a subprocess failed:\n%s" % (
            case.name, proc.stderr[-3000:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def generate(case, out_root, manifest=True):
    mpath = os.path.join(out_root, "modules", case.name)
    if case.export_in_subprocess:
        drop = export_in_subprocess(case, mpath)
    else:
        drop = export_module(case, mpath)
    arrays, meta = record_goldens(case, mpath)
    meta = golden_meta(case, mpath, meta, drop)
    gdir = os.path.join(out_root, "goldens")
    os.makedirs(gdir, exist_ok=True)
    npz = os.path.join(gdir, case.name + ".npz")
    if arrays is not None:
        save_npz(npz, arrays)
    elif os.path.exists(npz):
        os.remove(npz)
    with open(os.path.join(gdir, case.name + ".json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")
    if manifest:
        write_manifest(case, out_root)
    size = sum(os.path.getsize(p) for p in _files_under(mpath))
    print("%-26s module %7.1f KB, golden %7.1f KB" % (
        case.name, size / 1024, (os.path.getsize(npz) / 1024) if arrays is not None else 0))


# =============================================================================================
# Check: regenerate into a temp dir and compare with the committed corpus
# =============================================================================================
def check(names, out_root, atol=1e-6, rtol=1e-6):
    ok = True
    with tempfile.TemporaryDirectory(prefix="legacy_check_") as tmp:
        for name in names:
            case_ok = True
            case = CASES[name]
            generate(case, tmp, manifest=False)
            # 1. files: bitwise comparison (informational for saved_model.pb, see README)
            for sub in ("modules/" + name,):
                new = {os.path.relpath(p, tmp): _sha256(p) for p in _files_under(
                    os.path.join(tmp, sub))}
                old = {os.path.relpath(p, out_root): _sha256(p) for p in _files_under(
                    os.path.join(out_root, sub))}
                if set(new) != set(old):
                    case_ok = False
                    print("FAIL %s: file sets differ: %s" % (name, sorted(set(new) ^ set(old))))
                for rel in sorted(set(new) & set(old)):
                    print("  %-9s %s" % ("same" if new[rel] == old[rel] else "DIFFERENT", rel))
            # 2. golden json: identical except versions
            with open(os.path.join(tmp, "goldens", name + ".json")) as f:
                jn = json.load(f)
            with open(os.path.join(out_root, "goldens", name + ".json")) as f:
                jo = json.load(f)
            jn.pop("versions"), jo.pop("versions")
            if jn != jo:
                case_ok = False
                print("FAIL %s: golden json differs: %s" % (
                    name, sorted(k for k in set(jn) | set(jo) if jn.get(k) != jo.get(k))))
            # 3. golden values to atol/rtol
            npz_new = os.path.join(tmp, "goldens", name + ".npz")
            npz_old = os.path.join(out_root, "goldens", name + ".npz")
            if os.path.exists(npz_new) != os.path.exists(npz_old):
                case_ok = False
                print("FAIL %s: npz presence differs" % name)
                ok = False
                continue
            if not os.path.exists(npz_new):
                print("%s %s (json only)" % ("OK  " if case_ok else "FAIL", name))
                ok = ok and case_ok
                continue
            same_bytes = _sha256(npz_new) == _sha256(npz_old)
            with np.load(npz_new) as a, np.load(npz_old) as b:
                if set(a.files) != set(b.files):
                    case_ok = False
                    print("FAIL %s: golden keys differ: %s" % (name, sorted(set(a.files) ^ set(b.files))))
                worst = 0.0
                for k in sorted(set(a.files) & set(b.files)):
                    x, y = a[k].astype(np.float64), b[k].astype(np.float64)
                    if x.shape != y.shape or not np.allclose(x, y, atol=atol, rtol=rtol):
                        case_ok = False
                        print("FAIL %s: %s differs (max abs %s)" % (
                            name, k, np.max(np.abs(x - y)) if x.shape == y.shape else "shape"))
                    elif x.size:
                        worst = max(worst, float(np.max(np.abs(x - y))))
            print("%s %s: goldens %s (max abs diff of matching arrays %.3g)" % (
                "OK  " if case_ok else "FAIL", name,
                "bitwise identical" if same_bytes else ("match" if case_ok else "DIFFER"), worst))
            ok = ok and case_ok
    return ok


# =============================================================================================
# Full-size modules
# =============================================================================================
def generate_full(name, out_root):
    spec = FULL[name]
    case = Case(name, "full-size " + name, "full", None, image_size=spec["image_size"],
                variable_input_size=spec["variable"])
    build = functools.partial(_build_full, name, case)
    path = os.path.join(out_root, "full", name)
    export_module(case, path, build=build)
    size = sum(os.path.getsize(p) for p in _files_under(path))
    reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    shapes = reader.get_variable_to_shape_map()
    with tf.Graph().as_default():
        m = hub.Module(path, trainable=True)
        trainable = {v.op.name for v in tf1.trainable_variables()}
        params = sum(int(np.prod(shapes[n])) for n, v in _var_map(m).items()
                     if v.op.name in trainable)
        total = sum(int(np.prod(s)) for s in shapes.values())
        print("%s: %.1f MB on disk, %.2fM trainable parameters, %.1f MB of variables, "
              "signatures %s, expected size %s" % (
                  name, size / 2**20, params / 1e6, total * 4 / 2**20,
                  sorted(m.get_signature_names()), hub.get_expected_image_size(m)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=HERE, help="corpus root (default: legacy_fixtures/)")
    p.add_argument("--only", default="", help="comma-separated fixture names")
    p.add_argument("--full", default="", help="comma-separated full-size module names: %s"
                   % ", ".join(FULL))
    p.add_argument("--check", action="store_true",
                   help="regenerate into a temp dir and compare with the corpus in --out")
    p.add_argument("--list", action="store_true")
    p.add_argument("--export-module", default="", help=argparse.SUPPRESS)
    p.add_argument("--to", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.export_module:  # The child of export_in_subprocess.
        print(json.dumps(export_module(CASES[args.export_module], args.to)))
        return 0
    if args.list:
        for c in CASES.values():
            print("%-26s %s" % (c.name, c.description))
        print("full:", ", ".join(FULL))
        return 0
    if args.full:
        for name in args.full.split(","):
            if name not in FULL:
                p.error("unknown full module %r (choose from %s)" % (name, ", ".join(FULL)))
            generate_full(name, args.out)
        return 0
    names = [n for n in args.only.split(",") if n] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error("unknown fixture(s) %s (choose from %s)" % (unknown, ", ".join(CASES)))
    if args.check:
        return 0 if check(names, args.out) else 1
    for n in names:
        generate(CASES[n], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
