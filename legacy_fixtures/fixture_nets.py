"""Small networks written with tf-slim layers for the legacy fixture corpus (legacy venv only).

tf_slim.nets has ResNet and Inception but no MobileNets, so MobileNet-V1/V2-style nets live here,
plus the tiny nets used by the special-case fixtures (fake-quant, reference variables, ...).
Variable scopes follow the names of the slim research nets (MobilenetV1/Conv2d_1_depthwise, ...),
as the tfhub.dev modules exported from them did.

Import ``_legacy_shims`` before this module.
"""
import contextlib

import tensorflow as tf
import tf_slim as slim
from tensorflow.python.training import moving_averages

tf1 = tf.compat.v1


def _squeeze_hw(net, name):
    return tf.squeeze(net, [1, 2], name=name)


@contextlib.contextmanager
def _mobilenet_arg_scope(is_training, batch_norm_decay, weight_decay):
    """The slim arg_scope both MobileNets build under (BN + relu6 + L2 on convs)."""
    bn_params = {"is_training": is_training, "decay": batch_norm_decay, "epsilon": 0.001,
                 "center": True, "scale": True}
    with slim.arg_scope([slim.conv2d, slim.separable_conv2d],
                        normalizer_fn=slim.batch_norm, activation_fn=tf.nn.relu6,
                        weights_initializer=tf1.truncated_normal_initializer(stddev=0.09),
                        padding="SAME"), \
            slim.arg_scope([slim.batch_norm], **bn_params), \
            slim.arg_scope([slim.conv2d],
                           weights_regularizer=slim.l2_regularizer(weight_decay)):
        yield


# ---------------------------------------------------------------------------------------------
# MobileNet V1 (depthwise-separable convs, batch norm, relu6)
# ---------------------------------------------------------------------------------------------
MOBILENET_V1_TINY_DEFS = [  # (stride, depth) of each depthwise-separable block
    (1, 16), (2, 24), (1, 24), (2, 32),
]


def mobilenet_v1(images, num_classes, is_training, batch_norm_decay=0.9997, conv_defs=None,
                 first_depth=8, dropout_keep_prob=0.8, weight_decay=4e-5, scope="MobilenetV1",
                 global_pool=False):
    """MobileNet-V1-style classifier. Returns (logits, features, end_points).

    ``batch_norm_decay`` may be a scalar tensor (the ``batch_norm_momentum`` hparam input).
    ``features`` is the pooled feature vector BEFORE the logits' dropout. ``global_pool`` pools
    with a mean over height and width (as slim's mobilenet_v1 does for inputs of any size)
    instead of an average pool over the static feature-map size.
    """
    conv_defs = conv_defs or MOBILENET_V1_TINY_DEFS
    end_points = {}
    with tf1.variable_scope(scope, "MobilenetV1", [images]):
        with _mobilenet_arg_scope(is_training, batch_norm_decay, weight_decay):
            net = slim.conv2d(images, first_depth, [3, 3], stride=2, scope="Conv2d_0")
            end_points["Conv2d_0"] = net
            for i, (stride, depth) in enumerate(conv_defs, start=1):
                net = slim.separable_conv2d(net, None, [3, 3], depth_multiplier=1, stride=stride,
                                            scope="Conv2d_%d_depthwise" % i)
                end_points["Conv2d_%d_depthwise" % i] = net
                net = slim.conv2d(net, depth, [1, 1], stride=1, scope="Conv2d_%d_pointwise" % i)
                end_points["Conv2d_%d_pointwise" % i] = net
        with tf1.variable_scope("Logits"):
            if global_pool:
                net = tf.reduce_mean(net, [1, 2], keepdims=True, name="global_pool")
            else:
                kernel = net.get_shape().as_list()[1:3]
                net = slim.avg_pool2d(net, kernel, padding="VALID", scope="AvgPool_1a")
            end_points["AvgPool_1a"] = net
            features = _squeeze_hw(net, "features")
            net = slim.dropout(net, keep_prob=dropout_keep_prob, is_training=is_training,
                               scope="Dropout_1b")
            logits = slim.conv2d(net, num_classes, [1, 1], activation_fn=None, normalizer_fn=None,
                                 weights_regularizer=slim.l2_regularizer(weight_decay),
                                 scope="Conv2d_1c_1x1")
            logits = _squeeze_hw(logits, "SpatialSqueeze")
            end_points["Logits"] = logits
    return logits, features, end_points


# ---------------------------------------------------------------------------------------------
# MobileNet V2 (inverted residuals, linear bottlenecks)
# ---------------------------------------------------------------------------------------------
MOBILENET_V2_DEFS = [  # (expansion t, channels c, repeats n, first stride s)
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _make_divisible(v, divisor=8, min_value=None):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def mobilenet_v2(images, num_classes, is_training, depth_multiplier=1.0, block_defs=None,
                 batch_norm_decay=0.997, weight_decay=4e-5, dropout_keep_prob=0.8,
                 scope="MobilenetV2"):
    """MobileNet-V2 (as slim's mobilenet_v2). Returns (logits, features, end_points)."""
    block_defs = block_defs or MOBILENET_V2_DEFS
    end_points = {}
    d = lambda c: _make_divisible(c * depth_multiplier)  # noqa: E731
    with tf1.variable_scope(scope, "MobilenetV2", [images]):
        with _mobilenet_arg_scope(is_training, batch_norm_decay, weight_decay):
            net = slim.conv2d(images, d(32), [3, 3], stride=2, scope="Conv")
            in_depth = d(32)
            idx = 0
            for t, c, n, s in block_defs:
                out_depth = d(c)
                for r in range(n):
                    stride = s if r == 0 else 1
                    name = "expanded_conv" if idx == 0 else "expanded_conv_%d" % idx
                    with tf1.variable_scope(name):
                        inp = net
                        if t != 1:
                            net = slim.conv2d(net, _make_divisible(in_depth * t), [1, 1],
                                              scope="expand")
                        net = slim.separable_conv2d(net, None, [3, 3], depth_multiplier=1,
                                                    stride=stride, scope="depthwise")
                        net = slim.conv2d(net, out_depth, [1, 1], activation_fn=None,
                                          scope="project")
                        if stride == 1 and in_depth == out_depth:
                            net = tf.add(inp, net, name="add")
                    end_points[name] = net
                    in_depth = out_depth
                    idx += 1
            last = d(1280)
            net = slim.conv2d(net, last, [1, 1], scope="Conv_1")
            end_points["Conv_1"] = net
        with tf1.variable_scope("Logits"):
            net = tf.reduce_mean(net, [1, 2], keepdims=True, name="AvgPool")
            end_points["global_pool"] = net
            features = _squeeze_hw(net, "features")
            net = slim.dropout(net, keep_prob=dropout_keep_prob, is_training=is_training,
                               scope="Dropout")
            logits = slim.conv2d(net, num_classes, [1, 1], activation_fn=None, normalizer_fn=None,
                                 biases_initializer=tf1.zeros_initializer(),
                                 weights_regularizer=slim.l2_regularizer(weight_decay),
                                 scope="Conv2d_1c_1x1")
            logits = _squeeze_hw(logits, "output")
            end_points["Logits"] = logits
    return logits, features, end_points


# ---------------------------------------------------------------------------------------------
# Fake-quantized ("quantops") MobileNet-style net
# ---------------------------------------------------------------------------------------------
def _quant_range_vars(scope, init_min, init_max):
    with tf1.variable_scope(scope):
        vmin = slim.model_variable("min", shape=[], initializer=tf1.constant_initializer(init_min),
                                   trainable=False)
        vmax = slim.model_variable("max", shape=[], initializer=tf1.constant_initializer(init_max),
                                   trainable=False)
    return vmin, vmax


def _quant_weights(w, is_training, narrow_range=True):
    """Like contrib.quantize's LastValueQuantize: min/max variables, assigned in training."""
    vmin, vmax = _quant_range_vars("weights_quant", -1.0, 1.0)
    with tf1.name_scope("weights_quant"):
        if is_training:
            upd_min = tf1.assign(vmin, tf.minimum(tf.reduce_min(w), 0.0), name="AssignMinLast")
            upd_max = tf1.assign(vmax, tf.maximum(tf.reduce_max(w), 0.0), name="AssignMaxLast")
            tf1.add_to_collection(tf1.GraphKeys.UPDATE_OPS, upd_min.op)
            tf1.add_to_collection(tf1.GraphKeys.UPDATE_OPS, upd_max.op)
        return tf.quantization.fake_quant_with_min_max_vars(
            w, vmin, vmax, num_bits=8, narrow_range=narrow_range, name="FakeQuantWithMinMaxVars")


def _quant_act(x, is_training, ema_decay=0.999, init_max=6.0):
    """Like contrib.quantize's MovingAvgQuantize: EMA min/max variables updated via UPDATE_OPS."""
    vmin, vmax = _quant_range_vars("act_quant", 0.0, init_max)
    with tf1.name_scope("act_quant"):
        if is_training:
            bmin = tf.minimum(tf.reduce_min(x, name="BatchMin"), 0.0)
            bmax = tf.maximum(tf.reduce_max(x, name="BatchMax"), 0.0)
            upd_min = moving_averages.assign_moving_average(vmin, bmin, ema_decay,
                                                            zero_debias=False, name="AssignMinEma")
            upd_max = moving_averages.assign_moving_average(vmax, bmax, ema_decay,
                                                            zero_debias=False, name="AssignMaxEma")
            tf1.add_to_collection(tf1.GraphKeys.UPDATE_OPS, upd_min.op)
            tf1.add_to_collection(tf1.GraphKeys.UPDATE_OPS, upd_max.op)
        return tf.quantization.fake_quant_with_min_max_vars(
            x, vmin, vmax, num_bits=8, name="FakeQuantWithMinMaxVars")


def _quant_conv(net, depth, kernel, stride, is_training, scope, depthwise=False, activation=True,
                weight_decay=4e-5):
    in_ch = net.get_shape().as_list()[-1]
    with tf1.variable_scope(scope):
        init = tf1.truncated_normal_initializer(stddev=0.2)
        if depthwise:
            w = slim.model_variable("depthwise_weights", shape=kernel + [in_ch, 1], initializer=init)
        else:
            w = slim.model_variable("weights", shape=kernel + [in_ch, depth], initializer=init,
                                    regularizer=slim.l2_regularizer(weight_decay))
        b = slim.model_variable("biases", shape=[in_ch if depthwise else depth],
                                initializer=tf1.constant_initializer(0.05))
        wq = _quant_weights(w, is_training)
        strides = [1, stride, stride, 1]
        if depthwise:
            net = tf.nn.depthwise_conv2d(net, wq, strides, "SAME", name="depthwise")
        else:
            net = tf.nn.conv2d(net, wq, strides, "SAME", name="Conv2D")
        net = tf.nn.bias_add(net, b, name="BiasAdd")
        if activation:
            net = tf.nn.relu6(net, name="Relu6")
        return _quant_act(net, is_training, init_max=6.0 if activation else 8.0)


def mobilenet_quant(images, num_classes, is_training, scope="MobilenetV1"):
    """Tiny MobileNet-V1 with batch norm folded into biases and fake-quant ops everywhere."""
    end_points = {}
    with tf1.variable_scope(scope):
        net = _quant_conv(images, 8, [3, 3], 2, is_training, "Conv2d_0")
        for i, (stride, depth) in enumerate([(1, 16), (2, 24)], start=1):
            net = _quant_conv(net, None, [3, 3], stride, is_training, "Conv2d_%d_depthwise" % i,
                              depthwise=True)
            net = _quant_conv(net, depth, [1, 1], 1, is_training, "Conv2d_%d_pointwise" % i)
            end_points["Conv2d_%d_pointwise" % i] = net
        with tf1.variable_scope("Logits"):
            net = tf.reduce_mean(net, [1, 2], keepdims=True, name="AvgPool_1a")
            net = _quant_act(net, is_training)
            features = _squeeze_hw(net, "features")
            logits = _quant_conv(net, num_classes, [1, 1], 1, is_training, "Conv2d_1c_1x1",
                                 activation=False)
            logits = _squeeze_hw(logits, "SpatialSqueeze")
    return logits, features, end_points


# ---------------------------------------------------------------------------------------------
# Small plain conv nets (special-case fixtures)
# ---------------------------------------------------------------------------------------------
def small_convnet(images, num_classes, is_training, depths=(8, 16, 16), weight_decay=1e-4,
                  batch_norm_decay=0.99, scope="SmallNet"):
    """conv-BN-relu stack + global average pool + fully connected logits."""
    bn_params = {"is_training": is_training, "decay": batch_norm_decay, "epsilon": 1e-3,
                 "scale": True}
    with tf1.variable_scope(scope, "SmallNet", [images]):
        with slim.arg_scope([slim.conv2d], normalizer_fn=slim.batch_norm,
                            normalizer_params=bn_params, activation_fn=tf.nn.relu,
                            weights_regularizer=slim.l2_regularizer(weight_decay)):
            net = images
            for i, depth in enumerate(depths):
                net = slim.conv2d(net, depth, [3, 3], stride=1 if i == 0 else 2,
                                  scope="conv%d" % (i + 1))
        net = tf.reduce_mean(net, [1, 2], name="global_pool")
        logits = slim.fully_connected(net, num_classes, activation_fn=None,
                                      weights_regularizer=slim.l2_regularizer(weight_decay),
                                      scope="logits")
    return logits, net


# ---------------------------------------------------------------------------------------------
# Truncated slim Inception nets (keep the committed corpus small)
# ---------------------------------------------------------------------------------------------
def _inception_top(net, num_classes, is_training, dropout_keep_prob, default_kernel,
                   reduced_kernel_fn, end_points):
    """The 'Logits' block exactly as slim's inception_v2/v3 build it (AvgPool_1a, Dropout_1b,
    PreLogits = dropout output, Conv2d_1c_1x1, SpatialSqueeze)."""
    with tf1.variable_scope("Logits"):
        kernel_size = reduced_kernel_fn(net, default_kernel)
        net = slim.avg_pool2d(net, kernel_size, padding="VALID",
                              scope="AvgPool_1a_{}x{}".format(*kernel_size))
        end_points["AvgPool_1a"] = net
        net = slim.dropout(net, keep_prob=dropout_keep_prob, is_training=is_training,
                           scope="Dropout_1b")
        end_points["PreLogits"] = net
        logits = slim.conv2d(net, num_classes, [1, 1], activation_fn=None, normalizer_fn=None,
                             scope="Conv2d_1c_1x1")
        logits = tf.squeeze(logits, [1, 2], name="SpatialSqueeze")
    end_points["Logits"] = logits
    return logits


def inception_v2_truncated(images, num_classes, is_training, final_endpoint="Mixed_4a",
                           depth_multiplier=0.1, min_depth=4, dropout_keep_prob=0.8,
                           scope="InceptionV2"):
    """slim inception_v2 with the base cut at `final_endpoint` (slim's own final_endpoint arg)
    and slim's Logits block on top."""
    from tf_slim.nets import inception_v2 as slim_v2
    with tf1.variable_scope(scope, "InceptionV2", [images]) as sc:
        with slim.arg_scope([slim.batch_norm, slim.dropout], is_training=is_training):
            net, end_points = slim_v2.inception_v2_base(
                images, final_endpoint=final_endpoint, min_depth=min_depth,
                depth_multiplier=depth_multiplier, scope=sc)
            logits = _inception_top(net, num_classes, is_training, dropout_keep_prob, [7, 7],
                                    slim_v2._reduced_kernel_size_for_small_input, end_points)
    return logits, end_points


def inception_v3_truncated(images, num_classes, is_training, final_endpoint="Mixed_6b",
                           depth_multiplier=0.1, min_depth=4, dropout_keep_prob=0.8,
                           scope="InceptionV3"):
    """slim inception_v3 (no aux logits) with the base cut at `final_endpoint` and slim's Logits
    block on top: PreLogits comes AFTER Dropout_1b, as in slim."""
    from tf_slim.nets import inception_v3 as slim_v3
    with tf1.variable_scope(scope, "InceptionV3", [images]) as sc:
        with slim.arg_scope([slim.batch_norm, slim.dropout], is_training=is_training):
            net, end_points = slim_v3.inception_v3_base(
                images, final_endpoint=final_endpoint, min_depth=min_depth,
                depth_multiplier=depth_multiplier, scope=sc)
            logits = _inception_top(net, num_classes, is_training, dropout_keep_prob, [8, 8],
                                    slim_v3._reduced_kernel_size_for_small_input, end_points)
    return logits, end_points
