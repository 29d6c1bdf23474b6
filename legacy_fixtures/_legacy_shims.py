"""Compatibility shims for running tf-slim 1.1.0 on TF 2.15 (legacy venv only).

Import this module BEFORE tf_slim. It fixes two incompatibilities:

1. TF 2.15's ``tensorflow/python/layers/normalization.py`` lazily imports
   ``tf_keras.legacy_tf_layers.normalization``, but the tf_keras 2.15 wheel only ships
   ``tf_keras.src.legacy_tf_layers`` and TF's bundled ``tensorflow.python.keras.legacy_tf_layers``
   has no ``normalization`` module. tf-slim's ``batch_norm`` (non-fused-op path, used with
   ``updates_collections=UPDATE_OPS``) needs ``BatchNormalization`` from there, so we alias the
   missing ``tf_keras.legacy_tf_layers*`` names to ``keras.src.legacy_tf_layers*`` (keras 2.15, the
   Keras that TF 2.15's ``tf.compat.v1.layers`` itself uses).
2. tf-slim's ``smart_cond`` checks ``isinstance(x, ops.Tensor)``; in TF 2.15 ``ops.Tensor`` is not
   the public ``tf.Tensor`` class any more, so we point it back at ``tf.Tensor``.
"""
import importlib
import os
import sys

# Reproducible kernels: plain Eigen CPU kernels (no oneDNN) give bitwise-stable goldens.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_ALIASED = {}


def _alias_legacy_tf_layers():
    src_pkg = importlib.import_module("keras.src.legacy_tf_layers")
    names = ["tf_keras.legacy_tf_layers"]
    sys.modules.setdefault("tf_keras.legacy_tf_layers", src_pkg)
    _ALIASED["tf_keras.legacy_tf_layers"] = src_pkg.__name__
    for sub in ("base", "convolutional", "core", "normalization", "pooling",
                "variable_scope_shim", "migration_utils"):
        target = f"keras.src.legacy_tf_layers.{sub}"
        try:
            mod = importlib.import_module(target)
        except ImportError:
            continue
        alias = f"tf_keras.legacy_tf_layers.{sub}"
        if alias not in sys.modules:
            sys.modules[alias] = mod
            _ALIASED[alias] = target
        names.append(alias)
    return names


def _fix_ops_tensor():
    import tensorflow.python.framework.ops as ops
    ops.Tensor = tf.Tensor


try:
    importlib.import_module("tf_keras.legacy_tf_layers.normalization")
except ImportError:
    _alias_legacy_tf_layers()
_fix_ops_tensor()
