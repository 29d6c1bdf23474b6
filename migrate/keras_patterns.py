"""The translation table of the `.keras` output: TF ops -> Keras 3 built-in layers.

`PATTERNS` lists what translates, in the order it is tried: one entry per op
or group of ops (a `Pattern`: a name, the op types it starts at, a function
returning a `Match` or None, and the Keras layer it becomes). The walk in
`keras_translate` asks it about every node on the way from the output to the
images. Adding a pattern (for another network family) is one entry here.

A pattern reads the graph through `Graph`: variables behind reads, constants
(through identities and the defaults of hyperparameter placeholders), the
update ops of batch-norm moving averages. Where an op is recognized but its
configuration has no faithful built-in equivalent, the pattern raises
`Refusal` naming the node and the op.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from migrate import errors
from migrate import graph_rewrite

_FUSED_BATCH_NORM = frozenset({"FusedBatchNorm", "FusedBatchNormV2",
                               "FusedBatchNormV3"})
_VARIABLE_OPS = graph_rewrite.RESOURCE_VARIABLE_OPS | graph_rewrite.REF_VARIABLE_OPS
_READ_OPS = frozenset({"ReadVariableOp", "Identity"})


class Refusal(Exception):
  """A node with no faithful built-in Keras equivalent (one line)."""

  def __init__(self, node: str, op: str, why: str = ""):
    super().__init__(f"node '{node}' (op {op}): "
                     f"{why or 'no Keras 3 built-in layer computes it'}")
    self.node = node
    self.op = op


@dataclasses.dataclass
class Match:
  """What a `PATTERNS` entry found at a node: one layer and its graph inputs."""

  cls: str
  config: dict
  inputs: list[str]  # Graph tensors, translated in turn.
  weights: dict[str, str] = dataclasses.field(default_factory=dict)
  random_op: str = ""
  rank: Optional[int] = None  # None: the rank of the first input.
  passthrough: bool = False  # The node only renames inputs[0] (Identity).
  # Batch norm: the update ops (names) it accounts for.
  updates: tuple[str, ...] = ()
  mask: str = ""  # Dropout: how the module makes its mask (see `keras_side.dropout_multiplier`).
  pattern: str = ""  # Set by the walk: the `PATTERNS` entry.
  # A node that becomes several layers: each part's (name suffix, class,
  # config, inputs), where an input is "" for `inputs[0]` or an earlier
  # part's suffix; the last part is the node's output. `cls` and `config`
  # are then unused.
  parts: tuple[tuple[str, str, dict, tuple[str, ...]], ...] = ()


# -- the graph ------------------------------------------------------------------

def node_name(ref: str) -> str:
  return ref.lstrip("^").split(":")[0]


def port(ref: str) -> int:
  parts = ref.split(":")
  return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def tensor_key(ref: str) -> str:
  return f"{node_name(ref)}:{port(ref)}"


class Graph:
  """One GraphDef indexed for the patterns."""

  def __init__(self, graph_def, *, update_ops: Sequence[str] = (),
               hparam_defaults: Optional[Mapping[str, np.ndarray]] = None):
    self.graph_def = graph_def
    self.nodes = {n.name: n for n in graph_def.node}
    self.functions = {f.signature.name: f for f in graph_def.library.function}
    self.consumers: dict[str, list[tuple[str, int]]] = {}
    for n in graph_def.node:
      for i, ref in enumerate(n.input):
        if not ref.startswith("^"):
          self.consumers.setdefault(tensor_key(ref), []).append((n.name, i))
    self.update_ops = list(update_ops)
    # Moving-average updates: UPDATE_OPS first, then those a batch norm runs
    # in place (slim's updates_collections=None), which no collection lists.
    listed = {node_name(u) for u in self.update_ops}
    self.moving_average_updates = [node_name(u) for u in self.update_ops] + [
        n.name for n in graph_def.node
        if n.op in ("AssignSubVariableOp", "AssignSub") and n.name not in listed]
    self.hparam_defaults = dict(hparam_defaults or {})
    self.hparams_used: set[str] = set()

  def node(self, ref: str):
    node = self.nodes.get(node_name(ref))
    if node is None:
      raise errors.CorruptModuleError(
          f"expected a node '{node_name(ref)}' in the graph, found none")
    return node

  def data_inputs(self, node) -> list[str]:
    return [i for i in node.input if not i.startswith("^")]

  def n_consumers(self, ref: str) -> int:
    return len(self.consumers.get(tensor_key(ref), []))

  def variable(self, ref: str) -> Optional[str]:
    """The module variable a tensor reads (through reads and identities)."""
    seen = 0
    while seen < 8:
      node = self.node(ref)
      if node.op in _VARIABLE_OPS:
        return node.name
      if node.op not in _READ_OPS or not node.input:
        return None
      ref = node.input[0]
      seen += 1
    return None

  def variable_shape(self, name: str) -> tuple[int, ...]:
    return tuple(d.size for d in self.nodes[name].attr["shape"].shape.dim)

  def const(self, ref: str) -> Optional[np.ndarray]:
    """The value of a constant tensor (through identities, casts and the
    defaults of hyperparameter placeholders, which are remembered)."""
    node = self.node(ref)
    if node.op == "Const":
      try:
        return tf.make_ndarray(node.attr["value"].tensor)
      except (TypeError, ValueError):
        return None
    if node.op in ("Identity", "Cast") and node.input:
      value = self.const(node.input[0])
      if value is not None and node.op == "Cast":
        value = value.astype(tf.as_dtype(node.attr["DstT"].type).as_numpy_dtype)
      return value
    if node.op == "PlaceholderWithDefault":
      value = self.hparam_defaults.get(f"{node.name}:0")
      if value is not None:
        self.hparams_used.add(node.name)
      return value
    if node.op in ("Sub", "Add", "AddV2", "Mul", "RealDiv") and len(node.input) == 2:
      a, b = self.const(node.input[0]), self.const(node.input[1])
      if a is None or b is None:
        return None
      return {"Sub": np.subtract, "Add": np.add, "AddV2": np.add,
              "Mul": np.multiply, "RealDiv": np.divide}[node.op](a, b)
    return None

  def static_shape(self, ref: str) -> Optional[tuple[Optional[int], ...]]:
    """The shape the graph records for a tensor (its producer's
    `_output_shapes`), None for an unknown dimension; None if not recorded."""
    node = self.node(ref)
    shapes = node.attr["_output_shapes"].list.shape if "_output_shapes" in node.attr else []
    if port(ref) >= len(shapes) or shapes[port(ref)].unknown_rank:
      return None
    return tuple(d.size if d.size >= 0 else None for d in shapes[port(ref)].dim)

  def scalar(self, ref: str) -> Optional[float]:
    value = self.const(ref)
    if value is None or value.size != 1:
      return None
    return float(value.reshape(()))


# Attributes equal to their op's default are stripped from exported graphs.
_ATTR_DEFAULTS = {"is_training": True, "epsilon": 1e-4,
                  "exponential_avg_factor": 1.0, "keep_dims": False,
                  "transpose_a": False, "transpose_b": False, "alpha": 0.2,
                  "data_format": b"NHWC"}


def _attr(node, key: str):
  """A scalar attribute of `node`, or its op's default when stripped."""
  if key not in node.attr:
    return _ATTR_DEFAULTS[key]
  value = node.attr[key]
  return getattr(value, value.WhichOneof("value"))


def _attr_list(node, key: str) -> list[int]:
  return list(node.attr[key].list.i)


def _nhwc(node) -> None:
  fmt = _attr(node, "data_format").decode()
  if fmt != "NHWC":
    raise Refusal(node.name, node.op, f"data format {fmt}; Keras layers here "
                  f"are channels_last (NHWC)")


def _padding(node) -> str:
  padding = node.attr["padding"].s.decode()
  if padding not in ("SAME", "VALID"):
    raise Refusal(node.name, node.op, f"padding {padding}")
  return padding.lower()


def _spatial(node, key: str) -> list[int]:
  values = _attr_list(node, key) or [1, 1, 1, 1]
  if len(values) != 4 or values[0] != 1 or values[3] != 1:
    raise Refusal(node.name, node.op, f"{key} {values} (expected [1, h, w, 1])")
  return values[1:3]


def _weight(g: Graph, node, index: int, what: str) -> str:
  var = g.variable(node.input[index])
  if var is None:
    raise Refusal(node.name, node.op, f"its {what} is not a variable of the "
                  f"module (found {g.node(node.input[index]).op})")
  return var


# -- the patterns -----------------------------------------------------------------

def _conv2d(g: Graph, node) -> Match:
  _nhwc(node)
  kernel = _weight(g, node, 1, "kernel")
  shape = g.variable_shape(kernel)
  return Match("Conv2D", dict(
      filters=shape[3], kernel_size=list(shape[:2]),
      strides=_spatial(node, "strides"), padding=_padding(node),
      dilation_rate=_spatial(node, "dilations"), use_bias=False),
               [node.input[0]], {"kernel": kernel})


def _depthwise(g: Graph, node) -> Match:
  _nhwc(node)
  kernel = _weight(g, node, 1, "kernel")
  shape = g.variable_shape(kernel)
  return Match("DepthwiseConv2D", dict(
      kernel_size=list(shape[:2]), depth_multiplier=shape[3],
      strides=_spatial(node, "strides"), padding=_padding(node),
      dilation_rate=_spatial(node, "dilations"), use_bias=False),
               [node.input[0]], {"kernel": kernel})


def _dense(g: Graph, node) -> Match:
  if _attr(node, "transpose_a") or _attr(node, "transpose_b"):
    raise Refusal(node.name, node.op, "a transposed MatMul")
  kernel = _weight(g, node, 1, "kernel")
  return Match("Dense", dict(units=g.variable_shape(kernel)[1], use_bias=False),
               [node.input[0]], {"kernel": kernel}, rank=2)


_BIASED = {"Conv2D": _conv2d, "DepthwiseConv2dNative": _depthwise,
           "MatMul": _dense}


def _bias_add(g: Graph, node) -> Optional[Match]:
  producer = g.node(node.input[0])
  if producer.op not in _BIASED:
    return None
  if g.n_consumers(node.input[0]) != 1:
    raise Refusal(node.name, node.op, f"a bias added to '{producer.name}', "
                  f"whose output is also used without it")
  _nhwc(node)
  match = _BIASED[producer.op](g, producer)
  match.config["use_bias"] = True
  match.weights["bias"] = _weight(g, node, 1, "bias")
  return match


def _in_place_variable(g: Graph, batch_stat: str) -> Optional[str]:
  """The variable an in-place update `v -= (v - stat) * f` moves towards
  `batch_stat` (slim's updates_collections=None: the batch norm's own mean
  and variance inputs are then empty constants)."""
  for name in g.moving_average_updates:
    update = g.nodes.get(name)
    if update is None or update.op not in ("AssignSubVariableOp", "AssignSub"):
      continue
    mul = g.node(update.input[1])
    for ref in mul.input if mul.op == "Mul" else ():
      diff = g.node(ref)
      if (diff.op == "Sub" and len(diff.input) > 1 and
          tensor_key(diff.input[1]) == tensor_key(batch_stat)):
        return g.variable(update.input[0])
  return None


def _moving_average_decay(g: Graph, variable: str, batch_stat: str
                          ) -> tuple[Optional[float], Optional[str]]:
  """(decay, update op) of the update `v -= (v - stat) * (1 - decay)`, in
  UPDATE_OPS or run in place."""
  for name in g.moving_average_updates:
    update = g.nodes.get(name)
    if update is None or update.op not in ("AssignSubVariableOp", "AssignSub"):
      continue
    if g.variable(update.input[0]) != variable:
      continue
    mul = g.node(update.input[1])
    if mul.op != "Mul":
      return None, update.name
    for diff_ref, factor_ref in ((mul.input[0], mul.input[1]),
                                 (mul.input[1], mul.input[0])):
      diff = g.node(diff_ref)
      if (diff.op == "Sub" and g.variable(diff.input[0]) == variable and
          tensor_key(diff.input[1]) == tensor_key(batch_stat)):
        factor = g.node(factor_ref)
        one = g.scalar(factor.input[0]) if factor.op == "Sub" else None
        if one == 1.0:
          decay = g.scalar(factor.input[1])
          if decay is not None:
            return decay, update.name
        factor_value = g.scalar(factor_ref)
        if factor_value is not None:
          return 1.0 - factor_value, update.name
    return None, update.name
  return None, None


def _fused_batch_norm(g: Graph, node) -> Match:
  _nhwc(node)
  if _attr(node, "exponential_avg_factor") != 1.0:
    raise Refusal(node.name, node.op, "an exponential_avg_factor other than 1")
  config: dict = dict(axis=-1, epsilon=float(_attr(node, "epsilon")))
  weights: dict[str, str] = {}
  for index, key, neutral in ((1, "gamma", 1.0), (2, "beta", 0.0)):
    var = g.variable(node.input[index])
    if var is not None:
      weights[key] = var
      continue
    value = g.const(node.input[index])
    if value is None or not np.all(value == neutral):
      raise Refusal(node.name, node.op, f"its {key} is neither a variable nor "
                    f"the constant {neutral:g}")
    config["scale" if key == "gamma" else "center"] = False
  for index, key in ((3, "moving_mean"), (4, "moving_variance")):
    var = g.variable(node.input[index])
    if var is None and _attr(node, "is_training"):
      var = _in_place_variable(g, f"{node.name}:{index - 2}")
    if var is None:
      raise Refusal(node.name, node.op, f"its {key} is not a variable")
    weights[key] = var
  updates: tuple[str, ...] = ()
  if _attr(node, "is_training"):
    decays = []
    for key, port in (("moving_mean", 1), ("moving_variance", 2)):
      decay, update = _moving_average_decay(g, weights[key], f"{node.name}:{port}")
      if update is None:
        raise Refusal(node.name, node.op, f"batch norm in training mode without "
                      f"an update of its {key} (in UPDATE_OPS or in place)")
      if decay is None:
        raise Refusal(update, g.node(update).op, "an update of a moving "
                      "average whose decay is not a constant")
      decays.append(decay)
      updates += (update,)
    if abs(decays[0] - decays[1]) > 1e-7:
      raise Refusal(node.name, node.op, f"different decays for the moving mean "
                    f"({decays[0]}) and variance ({decays[1]})")
    config["momentum"] = decays[0]
  return Match("BatchNormalization", config, [node.input[0]], weights,
               updates=updates)


_ACTIVATIONS = {"Relu": "relu", "Relu6": "relu6", "Sigmoid": "sigmoid",
                "Tanh": "tanh", "Elu": "elu", "Selu": "selu",
                "Softplus": "softplus", "Softsign": "softsign"}


def _activation(g: Graph, node) -> Match:
  return Match("Activation", dict(activation=_ACTIVATIONS[node.op]),
               [node.input[0]])


def _leaky_relu(g: Graph, node) -> Match:
  return Match("LeakyReLU", dict(negative_slope=float(_attr(node, "alpha"))),
               [node.input[0]])


def _softmax(g: Graph, node) -> Match:
  return Match("Softmax", dict(axis=-1), [node.input[0]])


def _is_sigmoid_of(g: Graph, ref: str, x: str) -> bool:
  """`ref` is sigmoid(x), or sigmoid(beta * x) with beta 1 (TF 2's swish)."""
  node = g.node(ref)
  if node.op != "Sigmoid":
    return False
  if tensor_key(node.input[0]) == tensor_key(x):
    return True
  scaled = _scaled(g, node.input[0], ("Mul",))
  return scaled is not None and scaled[1] == 1.0 and tensor_key(scaled[0]) == tensor_key(x)


def _swish_mul(g: Graph, node) -> Optional[Match]:
  """x * sigmoid(x), either order: swish as written out."""
  a, b = g.data_inputs(node)
  for x, s in ((a, b), (b, a)):
    if _is_sigmoid_of(g, s, x):
      return Match("Activation", dict(activation="silu"), [x])
  return None


def _swish_identity_n(g: Graph, node) -> Optional[Match]:
  """TF 2.x `tf.nn.swish`: IdentityN([x * sigmoid(x), x]) or, with its
  `beta` argument, IdentityN([x * sigmoid(beta * x), x, beta]) with beta 1
  (the custom gradient's inputs)."""
  inputs = g.data_inputs(node)
  if len(inputs) == 3 and g.scalar(inputs[2]) == 1.0:
    inputs = inputs[:2]
  if len(inputs) != 2:
    return None
  mul = g.node(inputs[0])
  if mul.op == "Mul" and _swish_mul(g, mul) is not None and any(
      tensor_key(i) == tensor_key(inputs[1]) for i in mul.input):
    return Match("Activation", dict(activation="silu"), [inputs[1]])
  return None


def _swish_defun(g: Graph, node) -> Optional[Match]:
  """TF 1.x `tf.nn.swish`: a call of the Defun `swish` (body x * sigmoid(x))."""
  fdef = g.functions.get(node.op)
  if fdef is None or len(fdef.signature.input_arg) != 1 or len(
      fdef.signature.output_arg) != 1:
    return None
  ops = sorted(n.op for n in fdef.node_def)
  if ops != ["Mul", "Sigmoid"]:
    return None
  return Match("Activation", dict(activation="silu"), [g.data_inputs(node)[0]])


def _pool(g: Graph, node) -> Match:
  _nhwc(node)
  cls = "MaxPooling2D" if node.op == "MaxPool" else "AveragePooling2D"
  return Match(cls, dict(pool_size=_spatial(node, "ksize"),
                         strides=_spatial(node, "strides"),
                         padding=_padding(node)), [node.input[0]])


def _same_padding(n: int, k: int, s: int) -> tuple[int, int]:
  """TF's SAME padding (before, after) of a dimension of size n."""
  total = max((-(-n // s) - 1) * s + k - n, 0)
  return total // 2, total - total // 2


def _windows(n: int, k: int, s: int) -> list[tuple[int, int, int, int]]:
  """The SAME windows of one dimension, clipped to the input, as segments of
  outputs with the same window size: (first input, last input + 1, window
  size, number of outputs), in order."""
  before, _ = _same_padding(n, k, s)
  segments: list[list[int]] = []
  for i in range(-(-n // s)):
    lo, hi = max(i * s - before, 0), min(i * s - before + k, n)
    last = segments[-1] if segments else None
    if last and last[2] == hi - lo and lo == last[0] + last[3] * s:
      last[1], last[3] = hi, last[3] + 1
    else:
      segments.append([lo, hi, hi - lo, 1])
  return [tuple(seg) for seg in segments]


def _avg_pool_uneven(g: Graph, node) -> Optional[Match]:
  """AvgPool with SAME padding that is uneven (one more row or column after
  than before: e.g. 3x3, stride 2, even size). TF averages over the input
  values in each window, not the padding. Keras's AveragePooling2D('same')
  does so on TensorFlow and JAX, but on PyTorch (Keras 3.15) pads unevenly
  by replicating the edge and counts the copies. Built of VALID pools: for
  each block of outputs whose clipped windows have one size, Cropping2D to
  the inputs they read and AveragePooling2D(window, strides, 'valid'); the
  blocks joined by Concatenate along the width, then the height. Exact on
  every backend; needs the input's size (fixed-size modules)."""
  if node.op != "AvgPool" or _padding(node) != "same":
    return None
  _nhwc(node)
  ksize, strides = _spatial(node, "ksize"), _spatial(node, "strides")
  shape = g.static_shape(node.input[0])
  sizes = shape[1:3] if shape is not None and len(shape) == 4 else (None, None)
  uneven = False
  for n, k, s in zip(sizes, ksize, strides):
    cases = [n] if n is not None else range(1, 2 * k * s + 1)
    uneven |= any(a != b for a, b in (_same_padding(m, k, s) for m in cases))
  if not uneven:
    return None  # Even padding: AveragePooling2D('same') is exact everywhere.
  if None in sizes:
    raise Refusal(node.name, node.op, f"average pooling {ksize} with stride "
                  f"{strides} and SAME padding on an input of unknown size: "
                  f"the padding is uneven at some sizes, which Keras's "
                  f"AveragePooling2D('same') counts on the PyTorch backend")
  rows, cols = (_windows(n, k, s) for n, k, s in zip(sizes, ksize, strides))
  parts: list[tuple[str, str, dict, tuple[str, ...]]] = []
  row_parts = []
  for r, (top, bottom, kh, _) in enumerate(rows):
    col_parts = []
    for c, (left, right, kw, _) in enumerate(cols):
      x = ""
      crop = [[top, sizes[0] - bottom], [left, sizes[1] - right]]
      if any(any(v) for v in crop):
        x = f"crop_{r}_{c}"
        parts.append((x, "Cropping2D", dict(cropping=crop), ("",)))
      parts.append((f"pool_{r}_{c}", "AveragePooling2D", dict(
          pool_size=[kh, kw], strides=strides, padding="valid"), (x,)))
      col_parts.append(f"pool_{r}_{c}")
    if len(col_parts) > 1:
      parts.append((f"row_{r}", "Concatenate", dict(axis=2), tuple(col_parts)))
      col_parts = [f"row_{r}"]
    row_parts.extend(col_parts)
  if len(row_parts) > 1:
    parts.append(("rows", "Concatenate", dict(axis=1), tuple(row_parts)))
  return Match("", {}, [node.input[0]], parts=tuple(parts))


def _global_pool(g: Graph, node) -> Optional[Match]:
  axes = g.const(node.input[1])
  if axes is None or sorted(int(a) % 4 for a in axes.reshape(-1)) != [1, 2]:
    return None
  keep = bool(_attr(node, "keep_dims"))
  cls = "GlobalAveragePooling2D" if node.op == "Mean" else "GlobalMaxPooling2D"
  return Match(cls, dict(keepdims=keep), [node.input[0]], rank=4 if keep else 2)


def _pad(g: Graph, node) -> Match:
  paddings = g.const(node.input[1])
  fill = g.scalar(node.input[2]) if node.op == "PadV2" else 0.0
  if (paddings is None or paddings.shape != (4, 2) or fill != 0.0 or
      paddings[0].any() or paddings[3].any()):
    raise Refusal(node.name, node.op, "padding other than zeros around the "
                  "height and width")
  return Match("ZeroPadding2D", dict(padding=[[int(v) for v in paddings[1]],
                                              [int(v) for v in paddings[2]]]),
               [node.input[0]])


_MERGE = {"AddV2": "Add", "Add": "Add", "Mul": "Multiply", "Sub": "Subtract",
          "Maximum": "Maximum", "Minimum": "Minimum"}


def _merge(g: Graph, node) -> Optional[Match]:
  inputs = g.data_inputs(node)
  if any(g.const(i) is not None for i in inputs):
    return None
  return Match(_MERGE[node.op], {}, inputs)


def _concat(g: Graph, node) -> Match:
  inputs = g.data_inputs(node)
  axis = g.scalar(inputs[-1])
  if axis is None or int(axis) not in (3, -1):
    raise Refusal(node.name, node.op, f"concatenation along axis {axis} "
                  f"(expected the channels, 3)")
  return Match("Concatenate", dict(axis=-1), inputs[:-1])


def _affine(g: Graph, node) -> Optional[Match]:
  """A tensor scaled or shifted by a constant (e.g. [0, 1] -> [-1, 1] input
  scaling): `Rescaling(scale, offset)`, one per op, so the rounding is TF's."""
  a, b = g.data_inputs(node)
  ca, cb = g.const(a), g.const(b)
  if (ca is None) == (cb is None):
    return None
  const, x = (ca, b) if ca is not None else (cb, a)
  if const.ndim > 1 and any(d != 1 for d in const.shape[:-1]):
    return None  # Not a scalar or a per-channel vector.
  const = const.reshape(-1) if const.size > 1 else const.reshape(())
  value = const.astype(np.float64)
  as_data = (lambda v: v.tolist() if np.ndim(v) else float(v))
  if node.op == "Mul":
    scale, offset = value, 0.0
  elif node.op == "RealDiv" and cb is not None:
    scale, offset = 1.0 / value, 0.0
  elif node.op in ("Add", "AddV2"):
    scale, offset = 1.0, value
  elif node.op == "Sub":
    scale, offset = (1.0, -value) if cb is not None else (-1.0, value)
  else:
    return None
  return Match("Rescaling", dict(scale=as_data(scale), offset=as_data(offset)),
               [x])


def _squeeze(g: Graph, node) -> Match:
  dims = sorted(int(d) % 4 for d in _attr_list(node, "squeeze_dims"))
  if dims != [1, 2]:
    raise Refusal(node.name, node.op, f"squeeze of dimensions {dims or 'all'} "
                  f"(expected the height and width, [1, 2])")
  return Match("Flatten", {}, [node.input[0]], rank=2)


def _reshape(g: Graph, node) -> Match:
  shape = g.const(node.input[1])
  if shape is None or shape.ndim != 1 or shape[0] != -1 or (shape[1:] < 0).any():
    raise Refusal(node.name, node.op, "a reshape to a shape that is not "
                  "[-1, fixed sizes...]")
  return Match("Reshape", dict(target_shape=[int(s) for s in shape[1:]]),
               [node.input[0]], rank=len(shape))


def _crop(g: Graph, node) -> Optional[Match]:
  """`x[:, a:-b, c:-d, :]` (slim NASNet's factorized reduction: `[:, 1:, 1:,
  :]`): `Cropping2D(((a, b), (c, d)))`."""
  begin, end, strides = (g.const(node.input[i]) for i in (1, 2, 3))
  masks = {k: int(node.attr[k].i) if k in node.attr else 0
           for k in ("begin_mask", "end_mask", "ellipsis_mask",
                     "new_axis_mask", "shrink_axis_mask")}
  if (begin is None or end is None or strides is None or begin.shape != (4,)
      or end.shape != (4,) or np.any(strides != 1) or masks["ellipsis_mask"]
      or masks["new_axis_mask"] or masks["shrink_axis_mask"]):
    return None
  crops = []
  for axis in range(4):
    start = 0 if masks["begin_mask"] >> axis & 1 else int(begin[axis])
    stop_masked = masks["end_mask"] >> axis & 1
    stop = 0 if stop_masked else int(end[axis])
    if start < 0 or stop > 0 or (stop == 0 and not stop_masked):
      return None  # Counted from the other end, or empty: depends on the size.
    crops.append((start, -stop))
  if crops[0] != (0, 0) or crops[3] != (0, 0):
    return None
  return Match("Cropping2D", dict(cropping=[list(crops[1]), list(crops[2])]),
               [node.input[0]])


def _identity(g: Graph, node) -> Match:
  return Match("", {}, [node.input[0]], passthrough=True)


def _split_one(g: Graph, node) -> Optional[Match]:
  """`tf.split(x, 1, axis)`: x itself (slim's NASNet cells do this)."""
  if int(node.attr["num_split"].i) != 1:
    return None
  return Match("", {}, [node.input[1]], passthrough=True)


def _noise_shape(g: Graph, ref: str, x: str) -> Optional[list]:
  """The dropout mask's shape: None for the input's own, else per dimension
  None (the input's) or a fixed size (1 for drop path / drop connect)."""
  node = g.node(ref)
  if node.op == "Shape" and tensor_key(node.input[0]) == tensor_key(x):
    return None
  if node.op == "Pack":
    dims = []
    for i, part in enumerate(g.data_inputs(node)):
      value = g.scalar(part)
      if value is not None:
        dims.append(int(value))
        continue
      p = g.node(part)
      if p.op == "StridedSlice":
        begin = g.const(p.input[1])
        shape_node = g.node(p.input[0])
        if (shape_node.op == "Shape" and tensor_key(shape_node.input[0]) == tensor_key(x)
            and begin is not None and int(begin.reshape(-1)[0]) == i):
          dims.append(None)
          continue
      raise Refusal(node.name, node.op, "a dropout noise shape that is neither "
                    "the input's nor made of its dimensions and constants")
    return dims
  raise Refusal(node.name, node.op, "a dropout noise shape that is neither "
                "the input's nor made of its dimensions and constants")


def _random_uniform(g: Graph, ref: str) -> Optional[object]:
  """The RandomUniform node a mask is drawn from (through add/mul by consts)."""
  node = g.node(ref)
  while node.op in ("Add", "AddV2", "Mul") and node.name:
    inputs = g.data_inputs(node)
    nxt = [i for i in inputs if g.const(i) is None]
    if len(nxt) != 1:
      return None
    node = g.node(nxt[0])
  return node if node.op == "RandomUniform" else None


def _scaled(g: Graph, ref: str, ops: tuple[str, ...]) -> Optional[tuple[str, float]]:
  """(x, c) if `ref` is `x * c` ("Mul") or `x / c` ("RealDiv") by a scalar constant."""
  node = g.node(ref)
  if node.op not in ops or len(node.input) != 2:
    return None
  pairs = [(node.input[0], node.input[1])]
  if node.op == "Mul":
    pairs.append((node.input[1], node.input[0]))
  for x, c in pairs:
    value = g.scalar(c)
    if value is not None and g.const(x) is None:
      return x, value
  return None


def _dropout_parts(g: Graph, node) -> Optional[tuple[str, str, str, Optional[float]]]:
  """(pattern, x, the mask's random expression, rate) of `nn.dropout` as
  each TensorFlow version emitted it, or None:
  - "u_ge_rate", TF >= 2.4: SelectV2(u >= rate, x * (1 / keep), 0), and
    TF 2.0-2.3: (x * (1 / keep)) * Cast(u >= rate), either order;
  - "floor_keep_plus_u", TF 1.x (and drop path / drop connect):
    (x / keep) * Floor(keep + u), either order.
  The data side may itself depend on random ops (stacked drop connects)."""
  inputs = g.data_inputs(node)
  if node.op == "SelectV2" and len(inputs) == 3:
    test, kept, zero = (g.node(i) for i in inputs)
    scaled = _scaled(g, inputs[1], ("Mul",))
    if test.op == "GreaterEqual" and scaled and g.scalar(inputs[2]) == 0.0:
      return "u_ge_rate", scaled[0], test.input[0], g.scalar(test.input[1])
    return None
  if node.op != "Mul" or len(inputs) != 2:
    return None
  for data, mask in ((inputs[0], inputs[1]), (inputs[1], inputs[0])):
    m = g.node(mask)
    if m.op == "Cast":
      test = g.node(m.input[0])
      scaled = _scaled(g, data, ("Mul",))
      if test.op == "GreaterEqual" and scaled:
        return "u_ge_rate", scaled[0], test.input[0], g.scalar(test.input[1])
    if m.op == "Floor":
      added = g.node(m.input[0])
      scaled = _scaled(g, data, ("RealDiv", "Div"))
      if added.op in ("Add", "AddV2") and scaled:
        keep = next((g.scalar(i) for i in g.data_inputs(added)
                     if g.scalar(i) is not None), None)
        return ("floor_keep_plus_u", scaled[0], m.input[0],
                None if keep is None else 1.0 - keep)
  return None


def _dropout(g: Graph, node) -> Optional[Match]:
  """Dropout, drop path and drop connect: Keras `Dropout(rate, noise_shape)`."""
  parts = _dropout_parts(g, node)
  if parts is None:
    return None
  mask, x, random_expr, rate = parts
  uniform = _random_uniform(g, random_expr)
  if uniform is None:
    return None  # Not random: not a dropout.
  if rate is None:
    raise Refusal(node.name, node.op, "a dropout (or drop path) rate that is "
                  "not a constant (e.g. scheduled by the global step)")
  noise = _noise_shape(g, uniform.input[0], x)
  config: dict = dict(rate=float(rate))
  if noise is not None:
    config["noise_shape"] = noise
  return Match("Dropout", config, [x], random_op=uniform.name, mask=mask)


@dataclasses.dataclass(frozen=True)
class Pattern:
  """An entry of the translation table."""

  name: str
  ops: frozenset[str]  # Op types of the node the pattern starts at.
  match: Callable[[Graph, object], Optional[Match]]
  layer: str  # The Keras layer it becomes (for the README's table).


def _p(name: str, ops, match, layer: str) -> Pattern:
  return Pattern(name, frozenset(ops), match, layer)


# Tried in this order; the first that returns a Match wins.
PATTERNS: tuple[Pattern, ...] = (
    _p("dropout", {"SelectV2", "Mul"}, _dropout,
       "Dropout(rate, noise_shape); drop path / drop connect: noise_shape (None, 1, 1, 1)"),
    _p("swish", {"Mul"}, _swish_mul, "Activation('silu')"),
    _p("swish_tf2", {"IdentityN"}, _swish_identity_n, "Activation('silu')"),
    _p("affine", {"Mul", "RealDiv", "Add", "AddV2", "Sub"}, _affine,
       "Rescaling(scale, offset)"),
    _p("merge", set(_MERGE), _merge, "Add / Multiply / Subtract / Maximum / Minimum"),
    _p("concat", {"ConcatV2"}, _concat, "Concatenate(axis=-1)"),
    _p("conv_bias", {"BiasAdd"}, _bias_add, "Conv2D / DepthwiseConv2D / Dense with use_bias"),
    _p("conv2d", {"Conv2D"}, _conv2d, "Conv2D(use_bias=False)"),
    _p("depthwise_conv2d", {"DepthwiseConv2dNative"}, _depthwise,
       "DepthwiseConv2D(depth_multiplier)"),
    _p("dense", {"MatMul"}, _dense, "Dense(use_bias=False)"),
    _p("batch_norm", _FUSED_BATCH_NORM, _fused_batch_norm,
       "BatchNormalization(epsilon, momentum)"),
    _p("activation", set(_ACTIVATIONS), _activation, "Activation(relu/relu6/sigmoid/...)"),
    _p("leaky_relu", {"LeakyRelu"}, _leaky_relu, "LeakyReLU(negative_slope)"),
    _p("softmax", {"Softmax"}, _softmax, "Softmax()"),
    _p("avg_pool_uneven", {"AvgPool"}, _avg_pool_uneven,
       "Cropping2D + AveragePooling2D('valid') per block of equal windows, "
       "Concatenate"),
    _p("pool", {"MaxPool", "AvgPool"}, _pool, "MaxPooling2D / AveragePooling2D"),
    _p("global_pool", {"Mean", "Max"}, _global_pool,
       "GlobalAveragePooling2D / GlobalMaxPooling2D(keepdims)"),
    _p("pad", {"Pad", "PadV2"}, _pad, "ZeroPadding2D"),
    _p("squeeze", {"Squeeze"}, _squeeze, "Flatten (of a 1x1 map)"),
    _p("reshape", {"Reshape"}, _reshape, "Reshape(target_shape)"),
    _p("crop", {"StridedSlice"}, _crop, "Cropping2D (slices of the height and width)"),
    _p("identity", {"Identity", "Snapshot"}, _identity, "(no layer)"),
    _p("split_one", {"Split"}, _split_one, "(no layer: a split into one part)"),
)
# Matched by the node's op being a function of the graph's library.
DEFUN_PATTERNS: tuple[Pattern, ...] = (
    _p("swish_defun", set(), _swish_defun, "Activation('silu')"),
)
