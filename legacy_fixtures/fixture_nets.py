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
# MobileNet-V1 1.0 (Howard et al. 2017, table 1), after the first 3x3 conv of depth 32.
MOBILENET_V1_DEFS = [(1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512)] + \
    [(1, 512)] * 5 + [(2, 1024), (1, 1024)]


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
                  batch_norm_decay=0.99, scope="SmallNet", in_place_updates=()):
    """conv-BN-relu stack + global average pool + fully connected logits.

    The batch norms of the layers numbered in `in_place_updates` (1-based) update their
    moving averages in place (`updates_collections=None`), the others through UPDATE_OPS.
    """
    bn_params = {"is_training": is_training, "decay": batch_norm_decay, "epsilon": 1e-3,
                 "scale": True}
    with tf1.variable_scope(scope, "SmallNet", [images]):
        with slim.arg_scope([slim.conv2d], normalizer_fn=slim.batch_norm,
                            normalizer_params=bn_params, activation_fn=tf.nn.relu,
                            weights_regularizer=slim.l2_regularizer(weight_decay)):
            net = images
            for i, depth in enumerate(depths):
                params = dict(bn_params)
                if i + 1 in in_place_updates:
                    params["updates_collections"] = None
                net = slim.conv2d(net, depth, [3, 3], stride=1 if i == 0 else 2,
                                  normalizer_params=params, scope="conv%d" % (i + 1))
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


# ---------------------------------------------------------------------------------------------
# Unseeded random ops (as the real NASNet / EfficientNet code made them)
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def unseeded():
    """Random ops created inside get seed = seed2 = 0, as in modules exported without a graph
    seed (the generator sets one for the initializers): their values come from OS entropy."""
    graph = tf1.get_default_graph()
    saved = graph.seed
    graph.seed = None
    try:
        yield
    finally:
        graph.seed = saved


def drop_path(net, keep_prob, is_training):
    """NASNet's drop path: drop whole examples of a hidden state, noise shape [batch, 1, 1, 1]."""
    if not is_training or keep_prob >= 1.0:
        return net
    with tf1.name_scope("drop_path"), unseeded():
        noise_shape = [tf.shape(net)[0], 1, 1, 1]
        random_tensor = keep_prob + tf1.random_uniform(noise_shape, dtype=tf.float32)
        binary_tensor = tf.floor(random_tensor)
        return tf1.div(net, keep_prob) * binary_tensor


def drop_connect(inputs, is_training, survival_prob):
    """EfficientNet's drop connect (the same computation as drop path, on a residual branch)."""
    if not is_training:
        return inputs
    with tf1.name_scope("drop_connect"), unseeded():
        batch_size = tf.shape(inputs)[0]
        random_tensor = survival_prob + tf1.random_uniform([batch_size, 1, 1, 1],
                                                           dtype=inputs.dtype)
        binary_tensor = tf.floor(random_tensor)
        return tf1.div(inputs, survival_prob) * binary_tensor


def unseeded_dropout(net, keep_prob, is_training, scope):
    """slim.dropout as the real modules had it: no op seed and no graph seed."""
    with unseeded():
        return slim.dropout(net, keep_prob=keep_prob, is_training=is_training, scope=scope)


# ---------------------------------------------------------------------------------------------
# Swish, the three ways a module's graph can hold it
# ---------------------------------------------------------------------------------------------
def _swish_shape(op):
    return [op.inputs[0].shape]


def _defun_swish():
    """tf.nn.swish as TF 1.5-1.15 defined it (nn_impl.py): a Defun `swish` whose gradient is the
    Defun `swish_grad`, registered in the graph's function library (library.gradient). Defined
    without input types, the functions are instantiated per dtype: `swish_f32` and
    `swish_grad_f32f32` in the graph."""
    from tensorflow.python.framework import function

    @function.Defun(shape_func=_swish_shape, func_name="swish_grad", noinline=True)
    def swish_grad(features, grad):
        sigmoid_features = tf.sigmoid(features)
        activation_grad = sigmoid_features * (1.0 + features * (1.0 - sigmoid_features))
        return grad * activation_grad

    @function.Defun(grad_func=swish_grad, shape_func=_swish_shape, func_name="swish",
                    noinline=True)
    def swish(features):
        features = tf.convert_to_tensor(features, name="features")
        return features * tf.sigmoid(features)

    return swish


_DEFUN_SWISH = []


def swish_defun(x):
    if not _DEFUN_SWISH:
        _DEFUN_SWISH.append(_defun_swish())
    return _DEFUN_SWISH[0](x)


def swish_plain(x):
    """The forward computation alone: what an analytic gradient differentiates."""
    return x * tf.sigmoid(x)


SWISH = {
    "defun": swish_defun,  # TF 1.x: Defun + library gradient
    "tf2": lambda x: tf.nn.swish(x),  # TF 2.x: IdentityN + a Python gradient not saved
    "plain": swish_plain,
}


# ---------------------------------------------------------------------------------------------
# EfficientNet (MBConv blocks with squeeze-excite and drop connect), as efficientnet_model.py
# ---------------------------------------------------------------------------------------------
# (kernel, repeats, stride, expand ratio, input filters, output filters, se ratio): the B0 table
# of the paper (Tan & Le 2019, table 1) as efficientnet_builder's block strings write it.
EFFICIENTNET_B0_BLOCKS = [
    (3, 1, 1, 1, 32, 16, 0.25), (3, 2, 2, 6, 16, 24, 0.25), (5, 2, 2, 6, 24, 40, 0.25),
    (3, 3, 2, 6, 40, 80, 0.25), (5, 3, 1, 6, 80, 112, 0.25), (5, 4, 2, 6, 112, 192, 0.25),
    (3, 1, 1, 6, 192, 320, 0.25),
]


def _conv_init(shape, dtype=None, partition_info=None):
    """EfficientNet's conv_kernel_initializer: normal with stddev sqrt(2 / fan_out)."""
    del partition_info
    kh, kw, _, out = shape
    return tf1.random_normal(shape, 0.0, (2.0 / float(kh * kw * out)) ** 0.5, dtype=dtype)


def _eff_conv(x, filters, kernel, stride, name, use_bias=False):
    with tf1.variable_scope(name):
        in_ch = x.get_shape().as_list()[-1]
        w = tf1.get_variable("kernel", [kernel, kernel, in_ch, filters],
                             initializer=_conv_init)
        x = tf.nn.conv2d(x, w, [1, stride, stride, 1], "SAME")
        if use_bias:
            b = tf1.get_variable("bias", [filters], initializer=tf1.zeros_initializer())
            x = tf.nn.bias_add(x, b)
        return x


def _eff_depthwise(x, kernel, stride, name):
    with tf1.variable_scope(name):
        in_ch = x.get_shape().as_list()[-1]
        w = tf1.get_variable("depthwise_kernel", [kernel, kernel, in_ch, 1],
                             initializer=_conv_init)
        return tf.nn.depthwise_conv2d(x, w, [1, stride, stride, 1], "SAME")


def _eff_bn(x, is_training, momentum, epsilon, name):
    # tf.layers.BatchNormalization, as EfficientNet's TpuBatchNormalization subclass (fused; its
    # moving averages are updated through UPDATE_OPS).
    return tf1.layers.batch_normalization(x, momentum=momentum, epsilon=epsilon,
                                          training=is_training, fused=True, name=name)


def _mbconv(x, args, is_training, survival_prob, swish, momentum, epsilon):
    kernel, stride, expand, in_f, out_f, se_ratio = args
    inputs = x
    filters = in_f * expand
    if expand != 1:
        x = _eff_conv(x, filters, 1, 1, "conv2d")
        x = swish(_eff_bn(x, is_training, momentum, epsilon, "tpu_batch_normalization"))
    x = _eff_depthwise(x, kernel, stride, "depthwise_conv2d")
    x = swish(_eff_bn(x, is_training, momentum, epsilon, "tpu_batch_normalization_1"))
    if se_ratio:
        with tf1.variable_scope("se"):
            reduced = max(1, int(in_f * se_ratio))
            se = tf.reduce_mean(x, [1, 2], keepdims=True)
            se = _eff_conv(se, reduced, 1, 1, "conv2d", use_bias=True)
            se = _eff_conv(swish(se), filters, 1, 1, "conv2d_1", use_bias=True)
            x = tf.sigmoid(se) * x
    x = _eff_conv(x, out_f, 1, 1, "conv2d_1" if expand != 1 else "conv2d")
    x = _eff_bn(x, is_training, momentum, epsilon, "tpu_batch_normalization_2")
    x = tf.identity(x)
    if stride == 1 and in_f == out_f:
        if survival_prob:
            x = drop_connect(x, is_training, survival_prob)
        x = tf.add(x, inputs)
    return x


def efficientnet(images, num_classes, is_training, blocks=None, stem_filters=32,
                 head_filters=1280, dropout_rate=0.2, survival_prob=0.8, swish="defun",
                 batch_norm_momentum=0.99, batch_norm_epsilon=1e-3, scope="efficientnet-b0"):
    """EfficientNet as efficientnet_model.Model builds it. Returns (logits, features).

    `blocks`: rows of EFFICIENTNET_B0_BLOCKS (already scaled). Drop connect on every residual
    block with survival probability 1 - (1 - survival_prob) * block_index / num_blocks, from an
    unseeded RandomUniform; dropout before the logits likewise unseeded. No weight decay in the
    graph (the original adds it in the training loss, not to REGULARIZATION_LOSSES)."""
    blocks = blocks or EFFICIENTNET_B0_BLOCKS
    swish = SWISH[swish]
    bn = dict(momentum=batch_norm_momentum, epsilon=batch_norm_epsilon)
    flat = []
    for kernel, repeats, stride, expand, in_f, out_f, se in blocks:
        for r in range(repeats):
            flat.append((kernel, stride if r == 0 else 1, expand, in_f if r == 0 else out_f,
                         out_f, se))
    with tf1.variable_scope(scope):
        with tf1.variable_scope("stem"):
            net = _eff_conv(images, stem_filters, 3, 2, "conv2d")
            net = swish(_eff_bn(net, is_training, name="tpu_batch_normalization", **bn))
        for idx, args in enumerate(flat):
            prob = 1.0 - (1.0 - survival_prob) * float(idx) / len(flat) if survival_prob else None
            with tf1.variable_scope("blocks_%d" % idx):
                net = _mbconv(net, args, is_training, prob, swish, **bn)
        with tf1.variable_scope("head"):
            net = _eff_conv(net, head_filters, 1, 1, "conv2d")
            net = swish(_eff_bn(net, is_training, name="tpu_batch_normalization", **bn))
            features = tf.reduce_mean(net, [1, 2], name="global_average_pooling2d")
            net = features
            if is_training and dropout_rate > 0:
                with unseeded():
                    net = tf.nn.dropout(net, rate=dropout_rate)
            with tf1.variable_scope("dense"):
                in_ch = net.get_shape().as_list()[-1]
                limit = 1.0 / (num_classes ** 0.5)
                w = tf1.get_variable("kernel", [in_ch, num_classes],
                                     initializer=tf1.random_uniform_initializer(-limit, limit))
                b = tf1.get_variable("bias", [num_classes], initializer=tf1.zeros_initializer())
                logits = tf.nn.bias_add(tf.matmul(net, w), b)
    return logits, features


# ---------------------------------------------------------------------------------------------
# NASNet-A (normal and reduction cells), as slim's nets/nasnet
# ---------------------------------------------------------------------------------------------
# The cells found by the search (Zoph et al. 2018, figure 4), as (operations, used hidden states,
# hidden state indices) in the order nasnet_utils lists them.
NASNET_A_NORMAL = (
    ["separable_5x5_2", "separable_3x3_2", "separable_5x5_2", "separable_3x3_2", "avg_pool_3x3",
     "none", "avg_pool_3x3", "avg_pool_3x3", "separable_3x3_2", "none"],
    [1, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 1, 1, 1, 0, 0])
NASNET_A_REDUCTION = (
    ["separable_5x5_2", "separable_7x7_2", "max_pool_3x3", "separable_7x7_2", "avg_pool_3x3",
     "separable_5x5_2", "none", "avg_pool_3x3", "separable_3x3_2", "max_pool_3x3"],
    [1, 1, 1, 0, 0, 0, 0], [0, 1, 0, 1, 0, 1, 3, 2, 2, 0])


def _factorized_reduction(net, filters, stride):
    if stride == 1:
        net = slim.conv2d(net, filters, 1, scope="path_conv")
        return slim.batch_norm(net, scope="path_bn")
    path1 = tf.nn.avg_pool2d(net, [1, 1, 1, 1], [1, stride, stride, 1], "VALID")
    path1 = slim.conv2d(path1, filters // 2, 1, scope="path1_conv")
    path2 = tf.pad(net, [[0, 0], [0, 1], [0, 1], [0, 0]])[:, 1:, 1:, :]
    path2 = tf.nn.avg_pool2d(path2, [1, 1, 1, 1], [1, stride, stride, 1], "VALID")
    path2 = slim.conv2d(path2, filters // 2, 1, scope="path2_conv")
    final = tf.concat(values=[path1, path2], axis=3)
    return slim.batch_norm(final, scope="final_path_bn")


def _stacked_separable(net, stride, operation, filters):
    kernel = int(operation.split("_")[1][0])
    layers = int(operation.split("_")[-1])
    for n in range(1, layers + 1):
        net = tf.nn.relu(net)
        net = slim.separable_conv2d(net, filters, kernel, depth_multiplier=1, stride=stride,
                                    scope="separable_{0}x{0}_{1}".format(kernel, n))
        net = slim.batch_norm(net, scope="bn_sep_{0}x{0}_{1}".format(kernel, n))
        stride = 1
    return net


class NasNetACell:
    """One NASNet-A cell: five pairwise combinations of hidden states, then the concatenation
    of the unused ones. Drop path follows every operation other than 'none'."""

    def __init__(self, cell_def, num_conv_filters, drop_path_keep_prob, total_num_cells,
                 is_training):
        self.operations, self.used, self.indices = cell_def
        self.num_conv_filters = num_conv_filters
        self.drop_path_keep_prob = drop_path_keep_prob
        self.total_num_cells = total_num_cells
        self.is_training = is_training

    def _reduce_prev(self, prev, curr):
        if prev is None:
            return curr
        prev_filters = prev.get_shape().as_list()[3]
        if curr.get_shape().as_list()[2] != prev.get_shape().as_list()[2]:
            prev = _factorized_reduction(tf.nn.relu(prev), self.filters, stride=2)
        elif self.filters != prev_filters:
            prev = slim.conv2d(tf.nn.relu(prev), self.filters, 1, scope="prev_1x1")
            prev = slim.batch_norm(prev, scope="prev_bn")
        return prev

    def _drop_path(self, net):
        keep = self.drop_path_keep_prob
        if keep >= 1.0:
            return net
        # Scaled by depth ("v2"; the "v3" schedule also scales by global_step / total steps,
        # which would put a global_step variable into the module).
        ratio = (self.cell_num + 1) / float(self.total_num_cells)
        return drop_path(net, 1 - ratio * (1 - keep), self.is_training)

    def _operation(self, net, operation, stride, from_input):
        if stride > 1 and not from_input:
            stride = 1
        in_filters = net.get_shape().as_list()[3]
        if "separable" in operation:
            net = _stacked_separable(net, stride, operation, self.filters)
        elif operation == "none":
            if stride > 1 or in_filters != self.filters:
                net = slim.conv2d(tf.nn.relu(net), self.filters, 1, stride=stride, scope="1x1")
                net = slim.batch_norm(net, scope="bn_1")
        else:
            size = int(operation.split("_")[-1].split("x")[0])
            pool = slim.avg_pool2d if operation.startswith("avg") else slim.max_pool2d
            net = pool(net, size, stride=stride, padding="SAME")
            if in_filters != self.filters:
                net = slim.conv2d(net, self.filters, 1, scope="1x1")
                net = slim.batch_norm(net, scope="bn_1")
        if operation != "none":
            net = self._drop_path(net)
        return net

    def __call__(self, net, scope, filter_scaling=1.0, stride=1, prev_layer=None, cell_num=-1):
        self.cell_num = cell_num
        self.filters = int(self.num_conv_filters * filter_scaling)
        with tf1.variable_scope(scope):
            prev_layer = self._reduce_prev(prev_layer, net)
            net = slim.conv2d(tf.nn.relu(net), self.filters, 1, scope="1x1")
            net = slim.batch_norm(net, scope="beginning_bn")
            states = tf.split(axis=3, num_or_size_splits=1, value=net) + [prev_layer]
            for i in range(5):
                with tf1.variable_scope("comb_iter_%d" % i):
                    left, right = self.indices[2 * i], self.indices[2 * i + 1]
                    with tf1.variable_scope("left"):
                        h1 = self._operation(states[left], self.operations[2 * i], stride,
                                             left < 2)
                    with tf1.variable_scope("right"):
                        h2 = self._operation(states[right], self.operations[2 * i + 1], stride,
                                             right < 2)
                    with tf1.variable_scope("combine"):
                        states.append(h1 + h2)
            with tf1.variable_scope("cell_output"):
                final_h = states[-1].get_shape().as_list()[2]
                final_f = states[-1].get_shape().as_list()[3]
                for idx, used in enumerate(self.used):
                    h, f = (states[idx].get_shape().as_list()[k] for k in (2, 3))
                    if not used and (h != final_h or f != final_f):
                        with tf1.variable_scope("reduction_%d" % idx):
                            states[idx] = _factorized_reduction(
                                states[idx], final_f, 2 if h != final_h else 1)
                return tf.concat([s for s, used in zip(states, self.used) if not used], axis=3)


@contextlib.contextmanager
def nasnet_arg_scope(is_training, weight_decay=4e-5, batch_norm_decay=0.9997,
                     batch_norm_epsilon=1e-3):
    """nasnet_mobile_arg_scope: L2 on conv/separable/FC weights, no biases on convs, BN."""
    with slim.arg_scope([slim.fully_connected, slim.conv2d, slim.separable_conv2d],
                        weights_regularizer=slim.l2_regularizer(weight_decay),
                        weights_initializer=slim.variance_scaling_initializer(mode="FAN_OUT")), \
            slim.arg_scope([slim.fully_connected], activation_fn=None, scope="FC"), \
            slim.arg_scope([slim.conv2d, slim.separable_conv2d], activation_fn=None,
                           biases_initializer=None), \
            slim.arg_scope([slim.batch_norm], decay=batch_norm_decay,
                           epsilon=batch_norm_epsilon, scale=True, fused=True,
                           is_training=is_training):
        yield


def nasnet_a(images, num_classes, is_training, num_cells=12, num_conv_filters=44,
             stem_multiplier=1.0, num_reduction_layers=2, filter_scaling_rate=2.0,
             drop_path_keep_prob=0.7, dense_dropout_keep_prob=0.5, stem="imagenet"):
    """NASNet-A as slim's _build_nasnet_base (NHWC, no aux head). Returns (logits, features).

    stem="imagenet": conv0 (3x3, stride 2, VALID) + two reduction cells (cell_stem_0/1), as
    NASNet-A Mobile/Large; stem="cifar": one 3x3 conv (l1_stem_3x3), as the CIFAR model.
    NASNet-A Mobile trains with drop_path_keep_prob 1.0 (no drop path), Large with 0.7."""
    total_num_cells = num_cells + num_reduction_layers + (2 if stem == "imagenet" else 0)
    reduction_layers = [int(float(p) / (num_reduction_layers + 1) * num_cells)
                        for p in range(1, num_reduction_layers + 1)]
    normal = NasNetACell(NASNET_A_NORMAL, num_conv_filters, drop_path_keep_prob,
                         total_num_cells, is_training)
    reduction = NasNetACell(NASNET_A_REDUCTION, num_conv_filters, drop_path_keep_prob,
                            total_num_cells, is_training)
    if stem == "imagenet":
        net = slim.conv2d(images, int(32 * stem_multiplier), [3, 3], stride=2, padding="VALID",
                          scope="conv0")
        net = slim.batch_norm(net, scope="conv0_bn")
        cell_outputs = [None, net]
        scaling = 1.0 / (filter_scaling_rate ** 2)
        for n in range(2):
            net = reduction(net, "cell_stem_%d" % n, filter_scaling=scaling, stride=2,
                            prev_layer=cell_outputs[-2], cell_num=n)
            cell_outputs.append(net)
            scaling *= filter_scaling_rate
        true_cell_num = 2
    else:
        net = slim.conv2d(images, int(num_conv_filters * stem_multiplier), 3,
                          scope="l1_stem_3x3")
        net = slim.batch_norm(net, scope="l1_stem_bn")
        cell_outputs = [None, net]
        true_cell_num = 0
    scaling = 1.0
    for cell_num in range(num_cells):
        if cell_num in reduction_layers:
            scaling *= filter_scaling_rate
            net = reduction(net, "reduction_cell_%d" % reduction_layers.index(cell_num),
                            filter_scaling=scaling, stride=2, prev_layer=cell_outputs[-2],
                            cell_num=true_cell_num)
            true_cell_num += 1
            cell_outputs.append(net)
        net = normal(net, "cell_%d" % cell_num, filter_scaling=scaling, stride=1,
                     prev_layer=cell_outputs[-2], cell_num=true_cell_num)
        true_cell_num += 1
        cell_outputs.append(net)
    with tf1.variable_scope("final_layer"):
        net = tf.nn.relu(net)
        features = tf.reduce_mean(net, [1, 2], name="global_pool")
        net = unseeded_dropout(features, dense_dropout_keep_prob, is_training, "dropout")
        logits = slim.fully_connected(net, num_classes)
    return logits, features


# ---------------------------------------------------------------------------------------------
# Inception-ResNet-v2, as slim's nets/inception_resnet_v2 (Szegedy et al. 2016, figures 9-18)
# ---------------------------------------------------------------------------------------------
def _ir_block(net, scale, branches, scope, activation_fn=tf.nn.relu):
    """A residual Inception block: branches of slim.conv2d (depth, kernel, scope), concatenated,
    projected back with a linear 1x1 conv, scaled and added."""
    with tf1.variable_scope(scope):
        towers = []
        for b, convs in enumerate(branches):
            with tf1.variable_scope("Branch_%d" % b):
                t = net
                for depth, kernel, name in convs:
                    t = slim.conv2d(t, depth, kernel, scope=name)
                towers.append(t)
        mixed = tf.concat(axis=3, values=towers)
        up = slim.conv2d(mixed, net.get_shape()[3], 1, normalizer_fn=None, activation_fn=None,
                         scope="Conv2d_1x1")
        net += scale * up
        if activation_fn:
            net = activation_fn(net)
    return net


_BLOCK35 = [[(32, 1, "Conv2d_1x1")], [(32, 1, "Conv2d_0a_1x1"), (32, 3, "Conv2d_0b_3x3")],
            [(32, 1, "Conv2d_0a_1x1"), (48, 3, "Conv2d_0b_3x3"), (64, 3, "Conv2d_0c_3x3")]]
_BLOCK17 = [[(192, 1, "Conv2d_1x1")],
            [(128, 1, "Conv2d_0a_1x1"), (160, [1, 7], "Conv2d_0b_1x7"),
             (192, [7, 1], "Conv2d_0c_7x1")]]
_BLOCK8 = [[(192, 1, "Conv2d_1x1")],
           [(192, 1, "Conv2d_0a_1x1"), (224, [1, 3], "Conv2d_0b_1x3"),
            (256, [3, 1], "Conv2d_0c_3x1")]]


def _repeat(net, n, scale, branches, name, block):
    """slim.repeat's naming: <name>/<block>_1 ... <block>_n."""
    with tf1.variable_scope(name):
        for i in range(1, n + 1):
            net = _ir_block(net, scale, branches, "%s_%d" % (block, i))
    return net


def inception_resnet_v2(images, num_classes, is_training, dropout_keep_prob=0.8,
                        batch_norm_decay=0.9997, weight_decay=4e-5, create_aux_logits=True,
                        scope="InceptionResnetV2"):
    """Returns (logits, end_points); end_points["PreLogitsFlatten"] is AFTER the dropout, as
    slim's. Fixed input size (the aux logits and the final pool use static shapes)."""
    bn = {"decay": batch_norm_decay, "epsilon": 0.001, "fused": None,
          "is_training": is_training}
    end_points = {}
    with tf1.variable_scope(scope), \
            slim.arg_scope([slim.conv2d, slim.fully_connected],
                           weights_regularizer=slim.l2_regularizer(weight_decay),
                           biases_regularizer=slim.l2_regularizer(weight_decay)), \
            slim.arg_scope([slim.conv2d], activation_fn=tf.nn.relu,
                           normalizer_fn=slim.batch_norm, normalizer_params=bn), \
            slim.arg_scope([slim.batch_norm], **bn), \
            slim.arg_scope([slim.conv2d, slim.max_pool2d, slim.avg_pool2d], stride=1,
                           padding="SAME"):
        net = slim.conv2d(images, 32, 3, stride=2, padding="VALID", scope="Conv2d_1a_3x3")
        net = slim.conv2d(net, 32, 3, padding="VALID", scope="Conv2d_2a_3x3")
        net = slim.conv2d(net, 64, 3, scope="Conv2d_2b_3x3")
        net = slim.max_pool2d(net, 3, stride=2, padding="VALID", scope="MaxPool_3a_3x3")
        net = slim.conv2d(net, 80, 1, padding="VALID", scope="Conv2d_3b_1x1")
        net = slim.conv2d(net, 192, 3, padding="VALID", scope="Conv2d_4a_3x3")
        net = slim.max_pool2d(net, 3, stride=2, padding="VALID", scope="MaxPool_5a_3x3")
        with tf1.variable_scope("Mixed_5b"):
            with tf1.variable_scope("Branch_0"):
                b0 = slim.conv2d(net, 96, 1, scope="Conv2d_1x1")
            with tf1.variable_scope("Branch_1"):
                b1 = slim.conv2d(net, 48, 1, scope="Conv2d_0a_1x1")
                b1 = slim.conv2d(b1, 64, 5, scope="Conv2d_0b_5x5")
            with tf1.variable_scope("Branch_2"):
                b2 = slim.conv2d(net, 64, 1, scope="Conv2d_0a_1x1")
                b2 = slim.conv2d(b2, 96, 3, scope="Conv2d_0b_3x3")
                b2 = slim.conv2d(b2, 96, 3, scope="Conv2d_0c_3x3")
            with tf1.variable_scope("Branch_3"):
                b3 = slim.avg_pool2d(net, 3, stride=1, padding="SAME", scope="AvgPool_0a_3x3")
                b3 = slim.conv2d(b3, 64, 1, scope="Conv2d_0b_1x1")
            net = tf.concat([b0, b1, b2, b3], 3)
        net = _repeat(net, 10, 0.17, _BLOCK35, "Repeat", "block35")
        with tf1.variable_scope("Mixed_6a"):
            with tf1.variable_scope("Branch_0"):
                b0 = slim.conv2d(net, 384, 3, stride=2, padding="VALID", scope="Conv2d_1a_3x3")
            with tf1.variable_scope("Branch_1"):
                b1 = slim.conv2d(net, 256, 1, scope="Conv2d_0a_1x1")
                b1 = slim.conv2d(b1, 256, 3, scope="Conv2d_0b_3x3")
                b1 = slim.conv2d(b1, 384, 3, stride=2, padding="VALID", scope="Conv2d_1a_3x3")
            with tf1.variable_scope("Branch_2"):
                b2 = slim.max_pool2d(net, 3, stride=2, padding="VALID", scope="MaxPool_1a_3x3")
            net = tf.concat([b0, b1, b2], 3)
        net = _repeat(net, 20, 0.10, _BLOCK17, "Repeat_1", "block17")
        end_points["PreAuxLogits"] = net
        with tf1.variable_scope("Mixed_7a"):
            with tf1.variable_scope("Branch_0"):
                b0 = slim.conv2d(net, 256, 1, scope="Conv2d_0a_1x1")
                b0 = slim.conv2d(b0, 384, 3, stride=2, padding="VALID", scope="Conv2d_1a_3x3")
            with tf1.variable_scope("Branch_1"):
                b1 = slim.conv2d(net, 256, 1, scope="Conv2d_0a_1x1")
                b1 = slim.conv2d(b1, 288, 3, stride=2, padding="VALID", scope="Conv2d_1a_3x3")
            with tf1.variable_scope("Branch_2"):
                b2 = slim.conv2d(net, 256, 1, scope="Conv2d_0a_1x1")
                b2 = slim.conv2d(b2, 288, 3, scope="Conv2d_0b_3x3")
                b2 = slim.conv2d(b2, 320, 3, stride=2, padding="VALID", scope="Conv2d_1a_3x3")
            with tf1.variable_scope("Branch_3"):
                b3 = slim.max_pool2d(net, 3, stride=2, padding="VALID", scope="MaxPool_1a_3x3")
            net = tf.concat([b0, b1, b2, b3], 3)
        net = _repeat(net, 9, 0.20, _BLOCK8, "Repeat_2", "block8")
        net = _ir_block(net, 1.0, _BLOCK8, "Block8", activation_fn=None)
        net = slim.conv2d(net, 1536, 1, scope="Conv2d_7b_1x1")
        if create_aux_logits:
            with tf1.variable_scope("AuxLogits"):
                aux = slim.avg_pool2d(end_points["PreAuxLogits"], 5, stride=3, padding="VALID",
                                      scope="Conv2d_1a_3x3")
                aux = slim.conv2d(aux, 128, 1, scope="Conv2d_1b_1x1")
                aux = slim.conv2d(aux, 768, aux.get_shape()[1:3], padding="VALID",
                                  scope="Conv2d_2a_5x5")
                aux = slim.flatten(aux)
                end_points["AuxLogits"] = slim.fully_connected(aux, num_classes,
                                                               activation_fn=None, scope="Logits")
        with tf1.variable_scope("Logits"):
            net = slim.avg_pool2d(net, net.get_shape()[1:3], padding="VALID",
                                  scope="AvgPool_1a_8x8")
            net = slim.flatten(net)
            end_points["AvgPool_1a_8x8"] = net
            net = slim.dropout(net, dropout_keep_prob, is_training=is_training, scope="Dropout")
            end_points["PreLogitsFlatten"] = net
            logits = slim.fully_connected(net, num_classes, activation_fn=None, scope="Logits")
    return logits, end_points
