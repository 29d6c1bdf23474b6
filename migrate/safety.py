"""SCAN stage: only ops known to compute in memory may run.

A migration tool runs on old files of unknown origin. Before any op of a
module runs (in the converter or in the verifier's reference Session), every
graph variant, every function of its library (gradient functions included)
and every initializer is scanned against an ALLOWLIST: the op vocabulary of
image models (`ALLOWED_OPS`, each family with its reason). Anything else is
listed with its node names and refused unless `--allow_unsafe_ops`. A
denylist would always miss one of TensorFlow's ~1,900 ops; a new op is
refused until someone reviews it (`tests/test_safety.py` classifies every op
the installed TensorFlow registers).

Checkpoint ops are allowed only in the exact structure of a saver: the
TF1 `tf.compat.v1.train.Saver` subgraph (RestoreV2 fed by the SaverDef's
filename tensor, its tensor names and slices constants, into assignments of
the graph's own variables; SaveV2/MergeV2Checkpoints writing only under that
fed prefix) or the TF2 `_traced_save`/`_traced_restore` functions called
from the graph with that tensor. Such a subgraph is closed: nothing but the
SaverDef's own names may depend on it, so no signature, collection or
initializer can run it. Only a loader that feeds the model's own
`variables/` path runs it (the TF1 loader, TensorFlow Serving); this tool
never does (it reads checkpoints with the checkpoint reader). The structure
is checked, whatever names the SaverDef gives.

Ops with function-valued attributes (`f`, `then_branch`, `body`, ...) must
name functions of the library (which are scanned too): TensorFlow would
otherwise run a primitive op of that name. What the tool writes (the staged
TF2 SavedModel) and the NEW model of `verify OLD NEW` are scanned the same
way before they are loaded (`check_saved_model`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Iterator, Mapping, Optional, Sequence

from google.protobuf import message as pb_message
from tensorflow.core.framework import attr_value_pb2
from tensorflow.core.framework import types_pb2
from tensorflow.core.framework import variable_pb2
from tensorflow.core.protobuf import config_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from migrate import errors
from migrate import legacy_format

# -- the allowlist ------------------------------------------------------------------

_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("constants and inputs: values held in the graph or fed by the caller",
     ("Const", "HostConst", "Placeholder", "PlaceholderV2",
      "PlaceholderWithDefault")),
    ("pass-through and ordering: forward a tensor, check it, or order execution",
     ("Identity", "IdentityN", "NoOp", "StopGradient", "PreventGradient",
      "Snapshot", "ControlTrigger", "RefIdentity", "EnsureShape",
      "CheckNumerics", "CheckNumericsV2",
      # Fails the run with a message made from its inputs; writes nothing.
      "Assert")),
    ("TF1 control flow (tf.cond, tf.while_loop): routes tensors in memory",
     ("Switch", "Merge", "Enter", "Exit", "NextIteration", "LoopCond",
      "RefSwitch", "RefMerge", "RefEnter", "RefExit", "RefNextIteration")),
    ("function calls and functional control flow: run functions of the "
     "library, which are scanned too",
     ("PartitionedCall", "StatefulPartitionedCall", "If", "StatelessIf",
      "While", "StatelessWhile", "Case", "StatelessCase", "SymbolicGradient")),
    ("variables: the model's own state, created, read and updated in memory",
     ("VarHandleOp", "ReadVariableOp", "AssignVariableOp",
      "AssignAddVariableOp", "AssignSubVariableOp", "VarIsInitializedOp",
      "VariableShape", "ResourceGather", "VariableV2", "Variable", "Assign",
      "AssignAdd", "AssignSub", "IsVariableInitialized",
      # The TF2 saver's reads: marks a variable as not copied on read.
      "DisableCopyOnRead")),
    ("shapes, casts and array layout",
     ("Shape", "ShapeN", "Size", "Rank", "Reshape", "Squeeze", "ExpandDims",
      "Transpose", "ConcatV2", "Concat", "ConcatOffset", "Split", "SplitV",
      "Slice", "StridedSlice", "Pack", "Unpack", "Tile", "Pad", "PadV2",
      "MirrorPad", "Gather", "GatherV2", "GatherNd", "Fill", "ZerosLike",
      "OnesLike", "Range", "OneHot", "Where", "ReverseV2", "BroadcastTo",
      "BroadcastArgs", "BroadcastGradientArgs", "InvertPermutation",
      "DynamicStitch", "Cast", "DataFormatDimMap", "DataFormatVecPermute",
      "DepthToSpace", "SpaceToDepth", "SpaceToBatchND", "BatchToSpaceND",
      "SpaceToBatch", "BatchToSpace")),
    ("elementwise math, comparisons and reductions",
     ("Add", "AddV2", "AddN", "Sub", "Mul", "MulNoNan", "Div", "DivNoNan",
      "RealDiv", "FloorDiv", "FloorMod", "TruncateDiv", "Neg", "Abs", "Sign",
      "Square", "Sqrt", "Rsqrt", "Reciprocal", "Inv", "Exp", "Expm1", "Log",
      "Log1p", "Pow", "Maximum", "Minimum", "SquaredDifference", "Tanh",
      "Sigmoid", "Erf", "Erfc", "Floor", "Ceil", "Round", "Rint", "Sin", "Cos",
      "IsNan", "IsInf", "IsFinite", "Equal", "NotEqual", "Less", "LessEqual",
      "Greater", "GreaterEqual", "LogicalAnd", "LogicalOr", "LogicalNot",
      "Select", "SelectV2", "ClipByValue", "Xdivy", "Xlogy", "Sum", "Mean",
      "Max", "Min", "Prod", "All", "Any", "ArgMax", "ArgMin", "EuclideanNorm",
      "Cumsum", "MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3",
      "Einsum", "L2Loss", "TopKV2", "Softmax", "LogSoftmax")),
    ("neural-network layers of image models",
     ("BiasAdd", "BiasAddV1", "Conv2D", "DepthwiseConv2dNative",
      "Conv2DBackpropInput", "MaxPool", "MaxPoolV2", "AvgPool",
      "FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3",
      "BatchNormWithGlobalNormalization", "LRN", "Relu", "Relu6", "Elu",
      "Selu", "LeakyRelu", "Softplus", "Softsign", "ResizeBilinear",
      "ResizeNearestNeighbor", "ResizeBicubic", "ResizeArea")),
    ("gradients of those layers (train graphs, saved gradient functions)",
     ("ReluGrad", "Relu6Grad", "EluGrad", "SeluGrad", "LeakyReluGrad",
      "SoftplusGrad", "SoftsignGrad", "SigmoidGrad", "TanhGrad", "SqrtGrad",
      "RsqrtGrad", "ReciprocalGrad", "InvGrad", "BiasAddGrad",
      "Conv2DBackpropFilter", "DepthwiseConv2dNativeBackpropInput",
      "DepthwiseConv2dNativeBackpropFilter", "MaxPoolGrad", "MaxPoolGradV2",
      "MaxPoolGradGrad", "MaxPoolGradGradV2", "AvgPoolGrad",
      "FusedBatchNormGrad", "FusedBatchNormGradV2", "FusedBatchNormGradV3",
      "LRNGrad", "StridedSliceGrad", "MirrorPadGrad", "ResizeBilinearGrad",
      "ResizeNearestNeighborGrad", "ResizeBicubicGrad", "UnsortedSegmentSum",
      "FakeQuantWithMinMaxVarsGradient",
      "FakeQuantWithMinMaxVarsPerChannelGradient",
      "FakeQuantWithMinMaxArgsGradient")),
    ("simulated quantization (quantization-aware training)",
     ("FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxVarsPerChannel",
      "FakeQuantWithMinMaxArgs")),
    ("random numbers drawn in memory (dropout, drop path, initializers)",
     ("RandomUniform", "RandomStandardNormal", "TruncatedNormal",
      "RandomUniformInt", "StatelessRandomUniform", "StatelessRandomNormal",
      "StatelessTruncatedNormal", "StatelessRandomUniformV2",
      "StatelessRandomNormalV2", "StatelessTruncatedNormalV2",
      "StatelessRandomUniformInt", "StatelessRandomUniformIntV2",
      "StatelessRandomGetKeyCounter", "StatelessRandomGetAlg",
      "StatelessRandomGetKeyCounterAlg")),
    ("summaries built in memory (writing one needs a writer op, refused)",
     ("ScalarSummary", "HistogramSummary", "ImageSummary", "MergeSummary",
      "TensorSummary", "TensorSummaryV2")),
    ("string computation in memory (the TF2 saver's file name arithmetic)",
     ("StringJoin", "ShardedFilename", "StaticRegexFullMatch")),
)
ALLOWED_OPS: dict[str, str] = {op: reason for reason, ops in _FAMILIES
                               for op in ops}

# Allowed only as part of a saver (see the module docstring). TF1's V1
# checkpoint ops (Save, Restore, RestoreSlice, SaveSlices) are refused: the
# V2 format replaced them in 2016, before TF1 Hub modules existed.
CHECKPOINT_OPS: dict[str, str] = {
    "RestoreV2": "reads a checkpoint (allowed only as a saver's restore)",
    "SaveV2": "writes a checkpoint (allowed only as a saver's save)",
    "MergeV2Checkpoints": "writes a checkpoint (allowed only as a saver's save)",
}

# -- what the rest does: the reason given for a refused op ------------------------

# Checked in order; the first match names what the op reaches. An op that
# matches none is refused all the same ("not in the allowlist").
_REFUSED_FAMILIES: tuple[tuple[str, str], ...] = (
    ("Python process", r"PyFunc"),
    ("file system", r"File|Reader|^Save|Restore|Checkpoint|Summary(Writer|Db)|"
     r"^Write|^Load|Dump|Record|Snapshot|ImmutableConst|Debug|^Print|"
     r"CalibrationStatistics|ImportEvent|Lmdb|LMDB|Sql|Vocab|Skipgram|"
     r"^(Decode|Encode)Proto|CustomAggregator"),
    ("file system: a vocabulary file attribute, or sampler state",
     r"CandidateSampler|ComputeAccidentalHits"),
    ("network or other processes", r"Send|Recv|Collective|Nccl|Rpc|Remote|"
     r"Infeed|Outfeed|TPU|Tpu|^Xla|^_Xla|DTensor|Distributed|AllToAll|"
     r"CrossReplica|WorkerHeartbeat|DataService|RegisterDataset|CopyToMesh|"
     r"Relayout|Mlir|AllReduce|AllGather|ReduceScatter|Coordination|"
     r"GlobalTPUArray|UpdateTaskId|ScopedAllocator|ReadVariableXla|"
     r"AssignVariableXla|Dedup|Minibatch|Prelinearize|GlobalIterId|"
     r"ComputeBatchSize|ConvertToCooTensor|Fdo"),
    ("input pipeline", r"Dataset|Iterator|Queue|Stage|Barrier|^Batch$|"
     r"^BatchFunction$|^Unbatch|Optional|ThreadPool|StatsAggregator|"
     r"CompressElement|UncompressElement|GetElementAtIndex|^GetOptions$|"
     r"DummyIterationCounter|^Unstage$|^WindowOp$|^MapDefun$"),
    ("state outside the model's variables (tables, stacks, arrays, "
     "accumulators, sessions)", r"Table|TensorArray|^Stack|Accumulator|Mutex|"
     r"^Map(Stage|Unstage|Peek|Size|Clear|IncompleteSize)|^OrderedMap|"
     r"TensorList|TensorMap|SeedGenerator|MemoryCache|ResourceCreate|"
     r"ResourceUsing|BoostedTrees|SessionHandle|SessionTensor|^DestroyResource|"
     r"TemporaryVariable|^Anonymous|SparseToTensorsMap|ManySparseFromTensors|"
     r"WeakResourceHandle|^StubResource|CountUpTo|^RngSkip|^RngReadAndSkip|"
     r"^Stateful(Uniform|StandardNormal|TruncatedNormal|RandomBinomial)|"
     r"ResourceInitialized|IsResourceHandleRefCounting"),
    ("variable updates of optimizers and scatter ops (not part of a module)",
     r"Apply|Scatter|StridedSliceAssign|Inplace|TensorStridedSliceUpdate"),
    ("process control (aborts, sleeps, clocks, devices)",
     r"^Abort$|Sleep|^Timestamp$|GetDeadline|DeviceIndex|DevicePlacement|"
     r"^Copy|SyncDevice|CheckPinned|^KernelLabel|IsTensorFloat32Enabled|"
     r"^GraphDefVersion$"),
    ("an internal op (never part of a saved graph)", r"^_"),
    ("sparse, ragged, string, signal, linear-algebra or other math outside "
     "the image-model vocabulary",
     r"Sparse|Ragged|CSR|String|Unicode|Regex|Substr|AsString|Base64|FFT|"
     r"Matrix|Cholesky|Svd|Eig|^Lu$|Qr|Solve|Determinant|Bessel|Igamma|"
     r"Betainc|Zeta|Polygamma|Digamma|Lgamma|Dawsn|Expint|Fresnel|Spence|"
     r"Ndtri|Erfinv|Quantiz|Requantiz|Dequantize|Segment|Bincount|Conv3D|"
     r"Pool3D|Dilation2D|Fractional|Cudnn|LSTM|GRU|CTC|NonMaxSuppression|"
     r"CropAndResize|BoundingBox|Glimpse|Jpeg|Png|Gif|Bmp|WebP|Jxl|"
     r"^Decode|Wav|Audio|Mfcc|Spectrogram|HSV|^Adjust|ImageProjective|"
     r"ScaleAndTranslate|^Extract|Random|Multinomial|Stateless|Sobol|KMC2|"
     r"KmeansPlusPlus|NearestNeighbors|Sdca|Complex|^Conj|^Real$|^Imag$|"
     r"^Angle$|Bitwise|Shift$|^Invert$|^Bitcast$|PopulationCount|Bucketize|"
     r"Histogram|SetOperation|^SetSize$|Unique|Cumprod|Logsumexp|TopK|InTopK|"
     r"NthElement|KthOrderStatistic|Isotonic|LowerBound|UpperBound|"
     r"EditDistance|^Fingerprint$|Serialize|Example|^Parse|Variant|"
     r"Tridiagonal|Banded|^Cross$|^Diag|^Roll$|Reverse|ListDiff|"
     r"UnravelIndex|^Empty$|DeepCopy|GuaranteeConst|^LinSpace$|^Acos|^Asin|"
     r"^Atan|^Cosh$|^Sinh$|^Tan$|^Mod$|^TruncateMod$|NextAfter|"
     r"ApproximateEqual|Grad$|Gradient|SoftmaxCrossEntropy|Partition|"
     r"MaxPoolWithArgmax|^Fused.*Conv2D$|^Conv$|^For$|^Fact$|^FakeParam$|"
     r"^MakeUnique$|^NegTrain$|StochasticCast|^RefSelect$|^TileGrad$|"
     r"^Xlog1py$|Summary|ParameterizedTruncatedNormal|NonDeterministicInts|"
     r"^AccumulateNV2$|^ParallelConcat$|^ParallelDynamicStitch$|"
     r"^ResourceGatherNd$|Argmax|BackpropFilterV2|BackpropInputV2|"
     r"^ReduceJoin$|^ToBool$"),
    ("an experimental op set without kernels", r"^Risc"),
)
_REFUSED_PATTERNS = tuple((reason, re.compile(pattern))
                          for reason, pattern in _REFUSED_FAMILIES)


def refusal_reason(op: str) -> Optional[str]:
  """What a refused op reaches, by family, or None if no family says."""
  for reason, pattern in _REFUSED_PATTERNS:
    if pattern.search(op):
      return reason
  return None


def classify_op(op: str) -> tuple[str, str]:
  """("allowed" | "checkpoint" | "refused" | "unknown", reason) for an op type."""
  if op in ALLOWED_OPS:
    return "allowed", ALLOWED_OPS[op]
  if op in CHECKPOINT_OPS:
    return "checkpoint", CHECKPOINT_OPS[op]
  reason = refusal_reason(op)
  if reason is not None:
    return "refused", reason
  return "unknown", "not in the allowlist"


# ConfigProto fields of a function call that would reach other processes.
_CONFIG_FORBIDDEN = ("cluster_def", "rpc_options")
_FUNCTION_CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})
_READ_OPS = frozenset({"RestoreV2"})
_WRITE_OPS = frozenset({"SaveV2", "MergeV2Checkpoints"})
# Suffixes the savers join to the fed prefix (TF1 once used a random
# "_temp_<uuid hex>" directory; newer versions "_temp").
_SHARD_SUFFIX = re.compile(r"^(\.part|_temp(_[0-9a-f]{32})?/part)$")
_PLAIN_FILENAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclasses.dataclass(frozen=True)
class UnsafeOp:
  node: str  # Node name, prefixed with `<function>/` inside a function.
  op: str
  reaches: str
  tags: tuple[str, ...]


# -- references in a graph body (the top-level graph or one function) --------------

_NO_ATTR = attr_value_pb2.AttrValue()


def _attr(node, key: str) -> attr_value_pb2.AttrValue:
  """`node.attr[key]` without adding it (indexing a protobuf map inserts)."""
  return node.attr[key] if key in node.attr else _NO_ATTR


def _node_of(ref: str) -> str:
  """Node name of an input reference: 'a', 'a:1', '^a', 'a:output:0'."""
  return ref.lstrip("^").split(":")[0]


@dataclasses.dataclass
class _Body:
  """One graph body: its nodes, their consumers, and its function arguments."""

  nodes: dict[str, object]
  args: dict[str, int]  # Function arguments: name -> DataType (none at top level).
  scope: str  # "" at top level, else "<function>/".

  @classmethod
  def of_graph(cls, graph_def) -> "_Body":
    return cls({n.name: n for n in graph_def.node}, {}, "")

  @classmethod
  def of_function(cls, fdef) -> "_Body":
    return cls({n.name: n for n in fdef.node_def},
               {a.name: a.type for a in fdef.signature.input_arg},
               f"{fdef.signature.name}/")

  def data_input(self, node, i: int):
    """The node (or argument name) behind input `i`, or None."""
    data = [r for r in node.input if not r.startswith("^")]
    if i >= len(data):
      return None
    name = _node_of(data[i])
    return self.nodes.get(name, name if name in self.args else None)

  def through_identity(self, node_or_arg):
    seen = 0
    while (not isinstance(node_or_arg, str) and node_or_arg is not None and
           node_or_arg.op == "Identity" and seen < 64):
      node_or_arg = self.data_input(node_or_arg, 0)
      seen += 1
    return node_or_arg

  def ancestors(self, name: str) -> set[str]:
    """`name` and every node it depends on, through data and control inputs."""
    seen: set[str] = set()
    todo = [name]
    while todo:
      node = self.nodes.get(todo.pop())
      if node is None or node.name in seen:
        continue
      seen.add(node.name)
      todo.extend(_node_of(ref) for ref in node.input)
    return seen

  def consumers(self) -> dict[str, list]:
    result: dict[str, list] = {}
    for node in self.nodes.values():
      for ref in node.input:
        result.setdefault(_node_of(ref), []).append(node)
    return result


def _const_strings(node) -> Optional[list[bytes]]:
  if isinstance(node, str) or node is None or node.op != "Const":
    return None
  tensor = _attr(node, "value").tensor
  if tensor.dtype != types_pb2.DT_STRING:
    return None
  return list(tensor.string_val)


def _const_int(node) -> bool:
  return (not isinstance(node, str) and node is not None and node.op == "Const"
          and _attr(node, "value").tensor.dtype in (types_pb2.DT_INT32,
                                                  types_pb2.DT_INT64))


class _SaverShape:
  """Checks checkpoint ops against the structure of a saver.

  `prefix` is what the checkpoint path must come from: the SaverDef's
  filename tensor at top level, the first argument in a saver function.
  """

  def __init__(self, body: _Body, prefix, variables: frozenset[str]):
    self.body = body
    self.prefix = prefix
    self.variables = variables  # Node names (top level) or resource args.
    self.problems: list[tuple[str, str]] = []  # (node, what is wrong)

  def is_prefix(self, node) -> bool:
    found = self.body.through_identity(node)
    if isinstance(found, str) or isinstance(self.prefix, str):
      return found == self.prefix
    return found is not None and found is self.prefix

  def is_shard_name(self, node) -> bool:
    """ShardedFilename(StringJoin(prefix, suffix), Const, Const)."""
    node = self.body.through_identity(node)
    if isinstance(node, str) or node is None or node.op != "ShardedFilename":
      return False
    join = self.body.data_input(node, 0)
    if (isinstance(join, str) or join is None or join.op != "StringJoin" or
        _attr(join, "separator").s or
        not _const_int(self.body.data_input(node, 1))
        or not _const_int(self.body.data_input(node, 2))):
      return False
    if not self.is_prefix(self.body.data_input(join, 0)):
      return False
    suffix = self.body.data_input(join, 1)
    if self.body.data_input(join, 2) is not None:
      return False
    if _const_strings(suffix) is not None:
      return self._suffix_ok(suffix)
    # TF >= 2.x: Select(StaticRegexFullMatch(prefix), ".part", "_temp/part").
    if isinstance(suffix, str) or suffix is None or suffix.op != "Select":
      return False
    test = self.body.data_input(suffix, 0)
    return (not isinstance(test, str) and test is not None and
            test.op == "StaticRegexFullMatch" and
            self.is_prefix(self.body.data_input(test, 0)) and
            self._suffix_ok(self.body.data_input(suffix, 1)) and
            self._suffix_ok(self.body.data_input(suffix, 2)))

  @staticmethod
  def _suffix_ok(node) -> bool:
    values = _const_strings(node)
    return (values is not None and len(values) == 1 and
            bool(_SHARD_SUFFIX.match(values[0].decode("utf-8", "replace"))))

  def names_and_slices(self, node) -> bool:
    names = _const_strings(self.body.data_input(node, 1))
    slices = _const_strings(self.body.data_input(node, 2))
    return names is not None and slices is not None and len(names) == len(slices)

  def is_variable(self, ref_node) -> bool:
    node = self.body.through_identity(ref_node)
    if isinstance(node, str):
      return node in self.variables
    return node is not None and node.name in self.variables

  def check(self, node) -> None:
    op, ok = node.op, True
    if op == "RestoreV2":
      ok = self.is_prefix(self.body.data_input(node, 0)) and self.names_and_slices(node)
    elif op == "SaveV2":
      prefix = self.body.data_input(node, 0)
      ok = ((self.is_prefix(prefix) or self.is_shard_name(prefix)) and
            self.names_and_slices(node))
    elif op == "MergeV2Checkpoints":
      pack = self.body.data_input(node, 0)
      ok = (not isinstance(pack, str) and pack is not None and
            pack.op == "Pack" and self.is_prefix(self.body.data_input(node, 1)))
      if ok:
        data = [r for r in pack.input if not r.startswith("^")]
        ok = bool(data) and all(
            self.is_shard_name(self.body.data_input(pack, i))
            for i in range(len(data)))
    if not ok:
      self.problems.append((node.name, "its inputs are not a saver's"))

  # What may depend on a checkpoint op: the saver's own plumbing.
  _DEPENDENTS = frozenset({"Identity", "NoOp", "Pack", "MergeV2Checkpoints",
                           "AssignVariableOp", "Assign"})

  def closure(self, roots: Sequence) -> set[str]:
    """Every node depending on `roots`; records a problem for each that may
    not (anything but the saver's assignments and plumbing)."""
    consumers = self.body.consumers()
    seen: set[str] = set()
    todo = [r.name for r in roots]
    while todo:
      name = todo.pop()
      for user in consumers.get(name, ()):
        if user.name in seen:
          continue
        seen.add(user.name)
        todo.append(user.name)
        if user.op in CHECKPOINT_OPS or user.op in _FUNCTION_CALL_OPS:
          continue  # Checked on their own.
        if user.op not in self._DEPENDENTS:
          self.problems.append((user.name, "it depends on a checkpoint op"))
        elif user.op in ("AssignVariableOp", "Assign"):
          value = self.body.through_identity(self.body.data_input(user, 1))
          if (not self.is_variable(self.body.data_input(user, 0)) or
              isinstance(value, str) or value is None or value.op != "RestoreV2"):
            self.problems.append(
                (user.name, "it assigns something other than a restored "
                 "value to a variable"))
    return seen


def _saver_function_problems(fdef) -> list[tuple[str, str]]:
  """(node, what is wrong) in a library function holding checkpoint ops
  (none: the function has the shape of a TF2 saver's save or restore)."""
  body = _Body.of_function(fdef)
  args = list(fdef.signature.input_arg)
  if not args or args[0].type != types_pb2.DT_STRING:
    return [(n.name, "its function's first argument is not a checkpoint prefix")
            for n in fdef.node_def if n.op in CHECKPOINT_OPS]
  shape = _SaverShape(body, args[0].name,
                      frozenset(a.name for a in args[1:]
                                if a.type == types_pb2.DT_RESOURCE))
  roots = [n for n in fdef.node_def if n.op in CHECKPOINT_OPS]
  for node in roots:
    shape.check(node)
  shape.closure(roots)
  if any(n.op in _READ_OPS for n in roots):
    # A saver's functions either save or restore: a loader that runs the
    # restore must never write a checkpoint with it.
    shape.problems += [(n.name, "its function also restores a checkpoint")
                       for n in roots if n.op in _WRITE_OPS]
  return shape.problems


# -- names a MetaGraph refers to from outside its nodes ---------------------------

def _tensor_info_names(info) -> Iterator[str]:
  encoding = info.WhichOneof("encoding")
  if encoding == "name":
    yield info.name
  elif encoding == "coo_sparse":
    yield info.coo_sparse.values_tensor_name
    yield info.coo_sparse.indices_tensor_name
    yield info.coo_sparse.dense_shape_tensor_name
  elif encoding == "composite_tensor":
    for component in info.composite_tensor.components:
      yield from _tensor_info_names(component)


def _external_references(mg: meta_graph_pb2.MetaGraphDef) -> Iterator[tuple[str, str]]:
  """(node name, where) for every name a loader, hub.Module or this tool may
  run: signatures, collections (update ops, losses, initializers, main ops),
  variable definitions, assets."""
  for key, sig in mg.signature_def.items():
    for kind, infos in (("input", sig.inputs), ("output", sig.outputs)):
      for name, info in infos.items():
        for tensor in _tensor_info_names(info):
          yield _node_of(tensor), f"signature '{key}' {kind} '{name}'"
  for key, coll in mg.collection_def.items():
    kind = coll.WhichOneof("kind")
    if kind == "node_list":
      for name in coll.node_list.value:
        yield _node_of(name), f"collection '{key}'"
    elif kind == "bytes_list":
      for raw in coll.bytes_list.value:
        var = variable_pb2.VariableDef()
        try:
          var.ParseFromString(raw)
        except pb_message.DecodeError:
          continue
        for name in (var.variable_name, var.initializer_name,
                     var.snapshot_name, var.initial_value_name):
          if name:
            yield _node_of(name), f"collection '{key}'"
    elif kind == "any_list":
      for raw in coll.any_list.value:
        asset = legacy_format.unpack_asset_file_def(raw)
        if asset is not None:
          yield _node_of(asset.tensor_info.name), f"collection '{key}'"
  for asset in mg.asset_file_def:
    yield _node_of(asset.tensor_info.name), "asset_file_def"


def _object_graph_functions(mg: meta_graph_pb2.MetaGraphDef) -> set[str]:
  """Functions a TF2 loader may call: the object graph's."""
  names = set(mg.object_graph_def.concrete_functions)
  for obj in mg.object_graph_def.nodes:
    kind = obj.WhichOneof("kind")
    if kind == "function":
      names.update(obj.function.concrete_functions)
    elif kind == "bare_concrete_function":
      names.add(obj.bare_concrete_function.concrete_function_name)
    elif kind == "resource":
      pass  # Its _create_resource/_initialize are object-graph functions above.
    for saveable in obj.saveable_objects.values():
      names.update((saveable.save_function, saveable.restore_function))
  names.discard("")
  return names


# -- the scan ---------------------------------------------------------------------

def _func_names(attr_value) -> Iterator[tuple[str, "object"]]:
  """Function names in an AttrValue (func, list of func), recursively."""
  kind = attr_value.WhichOneof("value")
  if kind == "func":
    yield attr_value.func.name, attr_value.func
    for inner in attr_value.func.attr.values():
      yield from _func_names(inner)
  elif kind == "list":
    for func in attr_value.list.func:
      yield func.name, func
      for inner in func.attr.values():
        yield from _func_names(inner)


def _config_problem(node) -> Optional[str]:
  if node.op not in _FUNCTION_CALL_OPS or not _attr(node, "config_proto").s:
    return None
  config = config_pb2.ConfigProto()
  try:
    config.ParseFromString(_attr(node, "config_proto").s)
  except pb_message.DecodeError:
    return "an unparsable config_proto attribute"
  for field in _CONFIG_FORBIDDEN:
    if config.HasField(field):
      return f"a config_proto naming other processes ({field})"
  return None


class _Scanner:
  """Scans one MetaGraph: its graph, its library, and what refers to them."""

  def __init__(self, mg: meta_graph_pb2.MetaGraphDef, tags: tuple[str, ...]):
    self.mg = mg
    self.tags = tags
    self.library = {f.signature.name: f for f in mg.graph_def.library.function}
    self.found: list[UnsafeOp] = []

  def refuse(self, node: str, op: str, reaches: str) -> None:
    self.found.append(UnsafeOp(node, op, reaches, self.tags))

  def scan(self) -> list[UnsafeOp]:
    saver_functions = {name for name, f in self.library.items()
                       if any(n.op in CHECKPOINT_OPS for n in f.node_def)}
    for name in sorted(saver_functions):
      fdef = self.library[name]
      ops = {n.name: n.op for n in fdef.node_def}
      for node, why in _saver_function_problems(fdef):
        self.refuse(f"{name}/{node}", ops.get(node, "?"),
                    f"file system: a checkpoint op not in a saver's shape, {why}")
    saver_calls = self._top_level_checkpoints(saver_functions)
    for node in self.mg.graph_def.node:
      self.node(node, "", saver_calls, saver_functions)
    for name, fdef in self.library.items():
      for node in fdef.node_def:
        self.node(node, f"{name}/", frozenset(), saver_functions)
    for gradient in self.mg.graph_def.library.gradient:
      for name in (gradient.function_name, gradient.gradient_func):
        if name not in self.library:
          self.refuse(f"gradient of {gradient.function_name}", name,
                      "not a function of the library")
        elif name in saver_functions:
          self.refuse(f"gradient of {gradient.function_name}", name,
                      "a checkpoint function used as a gradient")
    for name in sorted(_object_graph_functions(self.mg)):
      if name in saver_functions:
        self.refuse(name, "checkpoint function", "file system: callable from "
                    "the object graph, not only by the saver")
    return self.found

  def node(self, node, scope: str, saver_calls: frozenset[str],
           saver_functions: set[str]) -> None:
    where = scope + node.name
    if node.op in self.library:
      pass  # A call of a library function by name (TF1 Defun); scanned itself.
    elif node.op in CHECKPOINT_OPS:
      if scope and scope[:-1] in saver_functions:
        pass  # Checked with its function.
      elif node.name not in saver_calls:
        self.refuse(where, node.op, "file system: not a saver's checkpoint op")
    elif node.op not in ALLOWED_OPS:
      self.refuse(where, node.op, refusal_reason(node.op) or "not in the allowlist")
    else:
      problem = _config_problem(node)
      if problem:
        self.refuse(where, node.op, problem)
    for key, value in node.attr.items():
      for name, _ in _func_names(value):
        if name not in self.library:
          self.refuse(where, node.op, f"attribute '{key}' names '{name}', "
                      f"not a function of the library")
        elif name in saver_functions and node.name not in saver_calls:
          self.refuse(where, node.op, f"attribute '{key}' calls the "
                      f"checkpoint function '{name}' outside the saver")
    if node.op in saver_functions and node.name not in saver_calls:
      self.refuse(where, node.op, "calls a checkpoint function outside the saver")

  def _top_level_checkpoints(self, saver_functions: set[str]) -> frozenset[str]:
    """Names of the top-level checkpoint ops and saver calls that have the
    structure of a saver (the others are refused by `node`)."""
    graph = self.mg.graph_def
    body = _Body.of_graph(graph)

    def calls_saver(node) -> bool:
      return (node.op in _FUNCTION_CALL_OPS and
              _attr(node, "f").func.name in saver_functions) or (
                  node.op in saver_functions)
    roots = [n for n in graph.node if n.op in CHECKPOINT_OPS or calls_saver(n)]
    if not roots:
      return frozenset()
    saver = self.mg.saver_def
    prefix = body.nodes.get(_node_of(saver.filename_tensor_name))
    if prefix is None or not self._is_filename_source(body, prefix):
      for node in roots:
        self.refuse(node.name, node.op, "file system: no SaverDef filename "
                    "tensor of a saver feeds it")
      return frozenset()
    variables = frozenset(n.name for n in graph.node
                          if n.op in ("VarHandleOp", "VariableV2", "Variable"))
    shape = _SaverShape(body, prefix, variables)
    for node in roots:
      if node.op in CHECKPOINT_OPS:
        shape.check(node)
      elif not shape.is_prefix(body.data_input(node, 0)):
        shape.problems.append((node.name, "its first input is not the "
                               "SaverDef's filename tensor"))
    # Only the SaverDef may name the saver's nodes: a signature, a collection
    # (update ops, initializers, main ops) or a variable definition that does
    # would make hub.Module, a loader or this tool run it.
    # The TF1 loader and TensorFlow Serving run the SaverDef's restore op,
    # feeding the model's own variables/ path: it may read that checkpoint,
    # never write one (which would replace the weights or add files). The
    # save tensor likewise writes, and never assigns restored values.
    def does(node, ops: frozenset[str]) -> bool:
      if node.op in ops:
        return True
      called = (_attr(node, "f").func.name if node.op in _FUNCTION_CALL_OPS
                else node.op)
      return (called in saver_functions and
              any(n.op in ops for n in self.library[called].node_def))
    for what, ref, ops in (("restore op", saver.restore_op_name, _WRITE_OPS),
                           ("save tensor", saver.save_tensor_name, _READ_OPS)):
      for name in sorted(body.ancestors(_node_of(ref)) if ref else ()):
        if does(body.nodes[name], ops):
          shape.problems.append((name, f"the SaverDef's {what} runs it"))
    closed = shape.closure(roots) | {n.name for n in roots}
    for name, where in _external_references(self.mg):
      if name in closed:
        shape.problems.append((name, f"{where} refers to it"))
    for name, why in shape.problems:
      node = body.nodes.get(name)
      self.refuse(name, node.op if node is not None else "?",
                  f"file system: a checkpoint op not in a saver's shape, {why}")
    bad = {name for name, _ in shape.problems}
    return frozenset(n.name for n in roots if n.name not in bad)

  @staticmethod
  def _is_filename_source(body: _Body, node) -> bool:
    """A string Placeholder, or a default that is a plain file name ('model')."""
    for _ in range(8):
      if node.op == "Placeholder":
        return _attr(node, "dtype").type == types_pb2.DT_STRING
      if node.op == "PlaceholderWithDefault":
        node = body.data_input(node, 0)
        if isinstance(node, str) or node is None:
          return False
        continue
      values = _const_strings(node)
      return (values is not None and len(values) == 1 and
              bool(_PLAIN_FILENAME.match(values[0].decode("utf-8", "replace"))))
    return False


def scan_meta_graphs(meta_graphs: Iterable[meta_graph_pb2.MetaGraphDef]
                     ) -> list[UnsafeOp]:
  """Every op outside the allowlist, in every MetaGraph and library function."""
  found: list[UnsafeOp] = []
  for mg in meta_graphs:
    found += _Scanner(mg, tuple(sorted(mg.meta_info_def.tags))).scan()
  return found


def find_unsafe_ops(module) -> list[UnsafeOp]:
  """Every unsafe op in every graph variant of a `legacy_format.LegacyModule`."""
  return scan_meta_graphs(v.meta_graph for _, v in
                          sorted(module.variants.items(), key=lambda kv: sorted(kv[0])))


def _shorten(text: str, limit: int = 160) -> str:
  text = errors.printable(text)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def describe(ops: Sequence[UnsafeOp], limit: int = 6) -> str:
  unique: dict[tuple[str, str], UnsafeOp] = {}
  for op in ops:
    unique.setdefault((op.node, op.op), op)
  items = [f"{_shorten(op.op)} at '{_shorten(op.node)}' ({op.reaches})"
           for op in unique.values()]
  more = f", and {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def check_module(module, *, allow_unsafe_ops: bool) -> list[UnsafeOp]:
  """Raises UnsafeOpsError listing unsafe ops, unless they are allowed."""
  found = find_unsafe_ops(module)
  if found and not allow_unsafe_ops:
    raise errors.UnsafeOpsError(
        f"{module.path}: expected a graph of pure computations, found "
        f"{len(found)} op(s) that reach outside the model: {describe(found)}; "
        f"refusing before anything runs (--allow_unsafe_ops converts anyway)")
  return found


def check_saved_model(path: str, *, allow_unsafe_ops: bool,
                      shown: Optional[str] = None) -> list[UnsafeOp]:
  """Scans the SavedModel at `path` (a TF2 model: the tool's output, or the
  NEW of `verify`) before anything loads it; raises UnsafeOpsError.

  `shown` names the model in the message (default: `path`).
  """
  shown = shown or path
  found = scan_meta_graphs(legacy_format.parse_saved_model(path).meta_graphs)
  if found and not allow_unsafe_ops:
    raise errors.UnsafeOpsError(
        f"{shown}: expected a model of pure computations, found {len(found)} "
        f"op(s) that reach outside the model: {describe(found)}; refusing "
        f"before anything loads it (--allow_unsafe_ops accepts it)")
  return found
