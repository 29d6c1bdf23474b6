"""TensorFlow's C API (the C++ SavedModel loader) through ctypes, without
importing TensorFlow's Python package.

`TF_LoadSessionFromSavedModel` is the loader TensorFlow Serving uses: it
restores the variables through the MetaGraph's `saver_def` and runs the main
op, as a C++ server would. `run_saved_model` loads a SavedModel that way and
runs one `TF_SessionRun`. The pip package ships the C API in
`libtensorflow_cc.so.2` (beside `libtensorflow_framework.so.2`); the struct
and enum layouts below are those of `tensorflow/c/c_api.h`,
`tf_datatype.h`, `tf_tensor.h` and `tf_buffer.h` under
`tf.sysconfig.get_include()`.

A crash in C++ takes the process with it: callers run this in a child
process (`migrate.consumers.c_api_loader` does).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from typing import Mapping, Optional, Sequence

import numpy as np

LIBRARY = "libtensorflow_cc.so.2"

# TF_DataType (tensorflow/c/tf_datatype.h) <-> numpy, for the dtypes an
# image model's signature can have.
_TF_TO_NUMPY = {
    1: np.float32,   # TF_FLOAT
    2: np.float64,   # TF_DOUBLE
    3: np.int32,     # TF_INT32
    4: np.uint8,     # TF_UINT8
    5: np.int16,     # TF_INT16
    6: np.int8,      # TF_INT8
    9: np.int64,     # TF_INT64
    10: np.bool_,    # TF_BOOL
    19: np.float16,  # TF_HALF
}
_NUMPY_TO_TF = {np.dtype(v): k for k, v in _TF_TO_NUMPY.items()}


class _Output(ctypes.Structure):  # TF_Output
  _fields_ = [("oper", ctypes.c_void_p), ("index", ctypes.c_int)]


class _Buffer(ctypes.Structure):  # TF_Buffer
  _fields_ = [("data", ctypes.c_void_p), ("length", ctypes.c_size_t),
              ("data_deallocator", ctypes.c_void_p)]


class CApiError(Exception):
  """The C API returned a non-OK status (its message is the text)."""


def library_path() -> str:
  """Where the installed TensorFlow keeps its C API library (no import)."""
  spec = importlib.util.find_spec("tensorflow")
  if spec is None or not spec.submodule_search_locations:
    raise CApiError("TensorFlow is not installed")
  return os.path.join(list(spec.submodule_search_locations)[0], LIBRARY)


def _load() -> ctypes.CDLL:
  lib = ctypes.CDLL(library_path())
  p, i, c = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
  signatures = {
      "TF_NewStatus": (p, []),
      "TF_DeleteStatus": (None, [p]),
      "TF_GetCode": (i, [p]),
      "TF_Message": (c, [p]),
      "TF_NewGraph": (p, []),
      "TF_DeleteGraph": (None, [p]),
      "TF_NewSessionOptions": (p, []),
      "TF_DeleteSessionOptions": (None, [p]),
      "TF_NewBuffer": (ctypes.POINTER(_Buffer), []),
      "TF_DeleteBuffer": (None, [ctypes.POINTER(_Buffer)]),
      "TF_LoadSessionFromSavedModel": (
          p, [p, p, c, ctypes.POINTER(c), i, p, ctypes.POINTER(_Buffer), p]),
      "TF_CloseSession": (None, [p, p]),
      "TF_DeleteSession": (None, [p, p]),
      "TF_GraphOperationByName": (p, [p, c]),
      "TF_SessionRun": (None, [p, p, ctypes.POINTER(_Output), ctypes.POINTER(p), i,
                               ctypes.POINTER(_Output), ctypes.POINTER(p), i,
                               ctypes.POINTER(p), i, p, p]),
      "TF_AllocateTensor": (p, [i, ctypes.POINTER(ctypes.c_int64), i, ctypes.c_size_t]),
      "TF_DeleteTensor": (None, [p]),
      "TF_TensorType": (i, [p]),
      "TF_NumDims": (i, [p]),
      "TF_Dim": (ctypes.c_int64, [p, i]),
      "TF_TensorByteSize": (ctypes.c_size_t, [p]),
      "TF_TensorData": (p, [p]),
  }
  for name, (restype, argtypes) in signatures.items():
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = restype, argtypes
  return lib


def _check(lib, status, what: str) -> None:
  if lib.TF_GetCode(status) != 0:
    message = (lib.TF_Message(status) or b"").decode("utf-8", "replace")
    raise CApiError(f"{what}: {message.strip().splitlines()[0][:300] if message.strip() else 'failed'}")


def _to_tensor(lib, value: np.ndarray):
  value = np.ascontiguousarray(value)
  if value.dtype not in _NUMPY_TO_TF:
    raise CApiError(f"unsupported input dtype {value.dtype}")
  dims = (ctypes.c_int64 * max(value.ndim, 1))(*value.shape)
  tensor = lib.TF_AllocateTensor(_NUMPY_TO_TF[value.dtype], dims, value.ndim,
                                 value.nbytes)
  ctypes.memmove(lib.TF_TensorData(tensor), value.ctypes.data, value.nbytes)
  return tensor


def _from_tensor(lib, tensor) -> np.ndarray:
  dtype = _TF_TO_NUMPY.get(lib.TF_TensorType(tensor))
  if dtype is None:
    raise CApiError(f"unsupported output dtype (TF_DataType "
                    f"{lib.TF_TensorType(tensor)})")
  shape = [lib.TF_Dim(tensor, d) for d in range(lib.TF_NumDims(tensor))]
  size = lib.TF_TensorByteSize(tensor)
  data = ctypes.string_at(lib.TF_TensorData(tensor), size)
  return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def _output(lib, graph, name: str) -> _Output:
  op_name, _, index = name.partition(":")
  oper = lib.TF_GraphOperationByName(graph, op_name.encode())
  if not oper:
    raise CApiError(f"no operation '{op_name}' in the loaded graph")
  return _Output(oper, int(index or 0))


Feeds = Mapping[str, np.ndarray]  # Tensor name ("op:0") -> value.
Fetches = Mapping[str, str]  # Output key -> tensor name.


def run_saved_model(export_dir: str, tags: Sequence[str],
                    runs: Sequence[tuple[Feeds, Fetches]]
                    ) -> list[dict[str, np.ndarray]]:
  """Loads `export_dir` once with `TF_LoadSessionFromSavedModel` (tag set
  `tags`) and calls `TF_SessionRun` for each (feeds, fetches) of `runs`.

  Returns, per run, output key -> value. Raises `CApiError` with the C API's
  message for a non-OK status.
  """
  lib = _load()
  status = lib.TF_NewStatus()
  graph = lib.TF_NewGraph()
  options = lib.TF_NewSessionOptions()
  meta_graph = lib.TF_NewBuffer()
  session = None
  try:
    tag_array = (ctypes.c_char_p * len(tags))(*[t.encode() for t in tags])
    session = lib.TF_LoadSessionFromSavedModel(
        options, None, os.fsencode(export_dir), tag_array, len(tags), graph,
        meta_graph, status)
    _check(lib, status, f"TF_LoadSessionFromSavedModel({export_dir})")
    return [_session_run(lib, session, graph, status, feeds, fetches)
            for feeds, fetches in runs]
  finally:
    if session:
      lib.TF_CloseSession(session, status)
      lib.TF_DeleteSession(session, status)
    lib.TF_DeleteBuffer(meta_graph)
    lib.TF_DeleteSessionOptions(options)
    lib.TF_DeleteGraph(graph)
    lib.TF_DeleteStatus(status)


def _session_run(lib, session, graph, status, feeds: Feeds,
                 fetches: Fetches) -> dict[str, np.ndarray]:
  names, keys = list(feeds), list(fetches)
  inputs: list = []
  outputs = (ctypes.c_void_p * max(len(keys), 1))()
  try:
    feed_ops = (_Output * max(len(names), 1))(*[_output(lib, graph, n) for n in names])
    fetch_ops = (_Output * max(len(keys), 1))(
        *[_output(lib, graph, fetches[k]) for k in keys])
    inputs = [_to_tensor(lib, np.asarray(feeds[n])) for n in names]
    input_values = (ctypes.c_void_p * max(len(inputs), 1))(*inputs)
    lib.TF_SessionRun(session, None, feed_ops, input_values, len(inputs),
                      fetch_ops, outputs, len(keys), None, 0, None, status)
    _check(lib, status, "TF_SessionRun")
    return {k: _from_tensor(lib, outputs[i]) for i, k in enumerate(keys)}
  finally:
    for tensor in inputs:
      lib.TF_DeleteTensor(tensor)
    for tensor in outputs:
      if tensor:
        lib.TF_DeleteTensor(tensor)


def run_or_error(export_dir: str, tags: Sequence[str],
                 runs: Sequence[tuple[Feeds, Fetches]]
                 ) -> tuple[Optional[list[dict[str, np.ndarray]]], str]:
  """`run_saved_model` as (results, "") or (None, the C API's message): for
  a child process, whose exceptions the parent would take for a bug."""
  try:
    return run_saved_model(export_dir, tags, runs), ""
  except (CApiError, OSError) as e:
    return None, str(e)
