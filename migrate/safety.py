"""SCAN stage: refuse graphs whose ops reach outside the model.

A migration tool runs on old files of unknown origin. Before any op of a
module runs (in the converter or in the verifier's reference Session), every
graph variant and every function of its library is scanned for ops that
reach the file system, the network or the Python process. Only the
checkpoint Save/Restore ops named by the MetaGraph's own SaverDef are exempt.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

from migrate import errors
from migrate import legacy_format

# Ops, by exact name, that touch files, processes or the network.
UNSAFE_OPS: dict[str, str] = {
    **{op: "file system" for op in (
        "ReadFile", "WriteFile", "MatchingFiles", "DeleteFile", "Save",
        "SaveV2", "SaveSlices", "Restore", "RestoreV2", "RestoreSlice",
        "MergeV2Checkpoints", "ImmutableConst", "WholeFileReader",
        "WholeFileReaderV2", "TextLineReader", "TextLineReaderV2",
        "TFRecordReader", "TFRecordReaderV2", "FixedLengthRecordReader",
        "FixedLengthRecordReaderV2", "LMDBReader", "IdentityReader",
        "IdentityReaderV2", "ReaderReadV2", "ReaderRead", "ReaderReadUpTo",
        "ReaderReadUpToV2", "InitializeTableFromTextFile",
        "InitializeTableFromTextFileV2", "DecodeProtoV2", "EncodeProto",
        "CreateSummaryFileWriter", "CreateSummaryDbWriter", "SummaryWriter",
        "WriteSummary", "WriteScalarSummary", "WriteHistogramSummary",
        "WriteImageSummary", "WriteAudioSummary", "WriteGraphSummary",
        "WriteRawProtoSummary", "FlushSummaryWriter", "ImportEvent",
        "RecordInput", "LoadAndRemapMatrix", "GenerateVocabRemapping",
        "DebugIdentity", "DebugIdentityV2", "DebugIdentityV3",
        "DebugNanCount", "DebugNumericSummary", "DebugNumericSummaryV2",
        "DumpTensor", "CalibrationStatisticsSaver", "DistributedSave",
        "DTensorRestoreV2", "FileSystemSetConfiguration",
        "CloseSummaryWriter", "StatsAggregatorSetSummaryWriter")},
    **{op: "Python process" for op in ("PyFunc", "PyFuncStateless",
                                       "EagerPyFunc")},
    **{op: "network" for op in (
        "RemoteCall", "Rpc", "TryRpc", "RpcCall", "RpcClient", "RpcServer",
        "RpcServerStart", "RpcServerRegister", "RpcCheckStatus",
        "RpcGetValue", "DeleteRpcFutureResource", "_Send", "_Recv",
        "_HostSend", "_HostRecv", "Send", "Recv", "CollectiveReduce",
        "CollectiveGather", "CollectiveBcastSend", "CollectiveBcastRecv",
        "CollectiveReduceV2", "CollectiveGatherV2", "CollectiveBcastSendV2",
        "CollectiveBcastRecvV2", "CollectiveAllToAllV2",
        "CollectiveAllToAllV3", "NcclAllReduce", "BigQueryReader",
        "GenerateBigQueryReaderPartitions", "RemoteFusedGraphExecute",
        "CollectivePermute", "CollectiveReduceV3", "CollectiveReduceScatterV2",
        "CollectiveAssignGroupV2", "CollectiveInitializeCommunicator",
        "NcclReduce", "NcclBroadcast", "TPUExecute",
        "TPUExecuteAndUpdateVariables", "ShutdownTPUSystem",
        "_DisconnectHostFromDistributedTPUSystem", "GcsConfigureCredentials",
        "GcsConfigureBlockCache")},
}
# The SavedModel's own checkpoint ops: exempt only inside the scope of the
# MetaGraph's SaverDef (never run by this tool; TF1 loaders run them).
_CHECKPOINT_OPS = frozenset({
    "Save", "SaveV2", "SaveSlices", "Restore", "RestoreV2", "RestoreSlice",
    "MergeV2Checkpoints"})
# What PrintV2 may print to; anything else ("file://...") writes a file.
_PRINT_STREAMS = frozenset({"", "stderr", "stdout", "log(info)", "log(warning)",
                            "log(error)"})
# Op name fragments: input pipelines read files or sockets.
_UNSAFE_FRAGMENTS = (("Dataset", "input pipeline"), ("Iterator", "input pipeline"),
                     ("Reader", "file system"), ("Summary", "file system"),
                     ("Send", "network"), ("Recv", "network"),
                     ("Collective", "network"), ("Nccl", "network"),
                     ("Rpc", "network"), ("Infeed", "network"),
                     ("Outfeed", "network"), ("PyFunc", "Python process"))
# Summary ops that only build a Summary protocol buffer in memory.
_IN_MEMORY_SUMMARIES = frozenset({
    "AudioSummary", "AudioSummaryV2", "HistogramSummary", "ImageSummary",
    "MergeSummary", "ScalarSummary", "TensorSummary", "TensorSummaryV2",
    "BoostedTreesMakeStatsSummary"})
_ALLOWED_WITH_FRAGMENT = frozenset({"ReaderNumRecordsProduced"}) | _IN_MEMORY_SUMMARIES


@dataclasses.dataclass(frozen=True)
class UnsafeOp:
  node: str  # Node name, prefixed with `<function>/` inside a function.
  op: str
  reaches: str
  tags: tuple[str, ...]


def _classify(node) -> str | None:
  if node.op in UNSAFE_OPS:
    return UNSAFE_OPS[node.op]
  if node.op == "PrintV2":
    stream = node.attr["output_stream"].s.decode(errors="replace")
    return None if stream in _PRINT_STREAMS else "file system"
  for fragment, reaches in _UNSAFE_FRAGMENTS:
    if fragment in node.op and node.op not in _ALLOWED_WITH_FRAGMENT:
      return reaches
  return None


def _saver_scope(meta_graph) -> str | None:
  saver = meta_graph.saver_def
  if not saver.restore_op_name:
    return None
  return saver.restore_op_name.rsplit("/", 1)[0] + "/"


def find_unsafe_ops(module: legacy_format.LegacyModule) -> list[UnsafeOp]:
  """Every unsafe op in every graph variant and library function."""
  found: list[UnsafeOp] = []
  for tags, variant in sorted(module.variants.items(), key=lambda kv: sorted(kv[0])):
    tag_tuple = tuple(sorted(tags))
    scope = _saver_scope(variant.meta_graph)
    graph_def = variant.graph_def
    for node in graph_def.node:
      reaches = _classify(node)
      if reaches is None:
        continue
      if (scope and node.name.startswith(scope) and
          node.op in _CHECKPOINT_OPS):
        continue  # The SavedModel's own checkpoint Save/Restore.
      found.append(UnsafeOp(node.name, node.op, reaches, tag_tuple))
    for function in graph_def.library.function:
      fname = function.signature.name
      for node in function.node_def:
        reaches = _classify(node)
        if reaches is not None:
          found.append(UnsafeOp(f"{fname}/{node.name}", node.op, reaches,
                                tag_tuple))
  return found


def describe(ops: Sequence[UnsafeOp], limit: int = 6) -> str:
  unique: dict[tuple[str, str], UnsafeOp] = {}
  for op in ops:
    unique.setdefault((op.node, op.op), op)
  items = [f"{op.op} at '{op.node}' ({op.reaches})" for op in unique.values()]
  more = f", and {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def check_module(module: legacy_format.LegacyModule, *,
                 allow_unsafe_ops: bool) -> list[UnsafeOp]:
  """Raises UnsafeOpsError listing unsafe ops, unless they are allowed."""
  found = find_unsafe_ops(module)
  if found and not allow_unsafe_ops:
    raise errors.UnsafeOpsError(
        f"{module.path}: expected a graph of pure computations, found "
        f"{len(found)} op(s) that reach outside the model: {describe(found)}; "
        f"refusing before anything runs (--allow_unsafe_ops converts anyway)")
  return found
