"""Builds bad inputs for `migrate-hub-module` and checks its failure contract.

Every input is derived from a committed fixture: the fixture is COPIED into a
fresh directory and the copy is mutated (bytes, protobuf fields, files). The
contract checked for each failing run (README "Bad input and untrusted
modules"):

- the documented exit code (`migrate.errors.ExitCode`);
- exactly one line on stderr, naming the path, what was expected and what was
  found; no "Traceback" anywhere in the output;
- nothing at DST and no temporary directory beside it;
- SRC unchanged (sha256 over the whole tree, names and bytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = os.path.join(REPO, "legacy_fixtures", "modules")
PROG = "migrate-hub-module"


# --------------------------------------------------------------------------
# Running the real CLI.


@dataclasses.dataclass
class CliRun:
  argv: list[str]
  returncode: int
  stdout: str
  stderr: str
  seconds: float

  @property
  def stderr_lines(self) -> list[str]:
    return self.stderr.splitlines()

  def describe(self) -> str:
    return (f"argv={self.argv}\nrc={self.returncode} ({self.seconds:.1f}s)\n"
            f"stdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}")


def cli_env() -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  # The CLI must silence TensorFlow itself: do not help it.
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  return env


def cli_command(args: Sequence[str]) -> list[str]:
  return [sys.executable, "-m", "migrate.cli", *map(str, args)]


def run_cli(args: Sequence[str], *, timeout: float = 300,
            cwd: Optional[str] = None) -> CliRun:
  argv = cli_command(args)
  start = time.monotonic()
  proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                        cwd=cwd or REPO, env=cli_env(), check=False)
  return CliRun(argv=argv, returncode=proc.returncode, stdout=proc.stdout,
                stderr=proc.stderr, seconds=time.monotonic() - start)


# --------------------------------------------------------------------------
# Inspecting trees.


def tree_digest(path: str) -> str:
  """sha256 over every name, type and byte under `path` (or of one file)."""
  digest = hashlib.sha256()
  if not os.path.lexists(path):
    return "absent"
  if not os.path.isdir(path):
    with open(path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(dirs + files):
      full = os.path.join(root, name)
      rel = os.path.relpath(full, path)
      digest.update(rel.encode() + b"\0")
      if os.path.islink(full):
        digest.update(b"L" + os.readlink(full).encode())
      elif os.path.isfile(full):
        with open(full, "rb") as f:
          digest.update(b"F" + f.read())
      else:
        digest.update(b"D")
  return digest.hexdigest()


def leftovers_beside(dst: str) -> list[str]:
  """Temporary directories (ours) left beside DST."""
  parent = os.path.dirname(os.path.abspath(dst))
  base = os.path.basename(os.path.abspath(dst))
  try:
    names = os.listdir(parent)
  except OSError:
    return []
  return sorted(n for n in names
                if n.startswith(f".{base}.migrate-") or ".migrate-tmp-" in n)


def check_failure_contract(run: CliRun, *, code: int, needles: Sequence[str],
                           src: Optional[str], src_digest: Optional[str],
                           dst: Optional[str]) -> None:
  """Asserts the one-line-error contract for one failing CLI run."""
  info = run.describe()
  assert run.returncode == int(code), info
  assert "Traceback" not in run.stdout + run.stderr, info
  lines = run.stderr_lines
  assert len(lines) == 1, f"expected exactly one line on stderr\n{info}"
  line = lines[0]
  assert line.startswith(f"{PROG}: error: "), info
  for needle in needles:
    assert needle in line, f"{needle!r} not in the error line\n{info}"
  if dst is not None:
    assert not os.path.lexists(dst), f"DST left behind\n{info}"
    assert not leftovers_beside(dst), (leftovers_beside(dst), info)
  if src is not None:
    assert tree_digest(src) == src_digest, f"SRC was modified\n{info}"


# --------------------------------------------------------------------------
# Mutating copies of fixtures.


def copy_fixture(name: str, dest: str) -> str:
  shutil.copytree(os.path.join(MODULES, name), dest)
  return dest


def read_saved_model(module_dir: str) -> saved_model_pb2.SavedModel:
  sm = saved_model_pb2.SavedModel()
  with open(os.path.join(module_dir, "saved_model.pb"), "rb") as f:
    sm.ParseFromString(f.read())
  return sm


def write_saved_model(module_dir: str, sm: saved_model_pb2.SavedModel) -> None:
  with open(os.path.join(module_dir, "saved_model.pb"), "wb") as f:
    f.write(sm.SerializeToString())


def edit_saved_model(module_dir: str,
                     fn: Callable[[saved_model_pb2.SavedModel], None]) -> None:
  sm = read_saved_model(module_dir)
  fn(sm)
  write_saved_model(module_dir, sm)


def edit_signatures(module_dir: str, fn: Callable) -> None:
  """fn(signature_name, SignatureDef) for every signature of every MetaGraph."""
  def apply(sm):
    for mg in sm.meta_graphs:
      for name, sig in mg.signature_def.items():
        fn(name, sig)
  edit_saved_model(module_dir, apply)


def set_shape(tensor_info, dims: Sequence[int]) -> None:
  tensor_info.tensor_shape.Clear()
  for d in dims:
    tensor_info.tensor_shape.dim.add(size=d)


def module_def_bytes(fmt: int = 3, features: Sequence[str] = ()) -> bytes:
  from migrate import legacy_format  # pylint: disable=g-import-not-at-top
  md = legacy_format.ModuleDef(format=fmt)
  md.required_features.extend(features)
  return md.SerializeToString()


def random_bytes(n: int, seed: int) -> bytes:
  import random  # pylint: disable=g-import-not-at-top
  rng = random.Random(seed)
  return bytes(rng.getrandbits(8) for _ in range(n))


def make_tf2_saved_model(dest: str) -> str:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  class Tiny(tf.Module):
    def __init__(self):
      super().__init__()
      self.w = tf.Variable([[1.0], [2.0], [3.0]])

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def __call__(self, x):
      return tf.matmul(x, self.w)

  tf.saved_model.save(Tiny(), dest)
  return dest


# --------------------------------------------------------------------------
# Mount helpers (tests run as root: chmod does not stop root, a read-only or
# full file system does).


def mount_tmpfs(path: str, size: str) -> bool:
  os.makedirs(path, exist_ok=True)
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                         path], capture_output=True, check=False)
  return proc.returncode == 0


def mount_readonly_bind(path: str) -> bool:
  os.makedirs(path, exist_ok=True)
  proc = subprocess.run(["mount", "--bind", "-o", "ro", path, path],
                        capture_output=True, check=False)
  if proc.returncode != 0:
    return False
  # Older util-linux needs a remount for the ro flag of a bind mount.
  subprocess.run(["mount", "-o", "remount,bind,ro", path], capture_output=True,
                 check=False)
  probe = os.path.join(path, ".probe")
  try:
    with open(probe, "w"):
      pass
  except OSError:
    return True
  os.unlink(probe)
  unmount(path)
  return False


def unmount(path: str) -> None:
  subprocess.run(["umount", path], capture_output=True, check=False)


# --------------------------------------------------------------------------
# Untrusted modules: ops injected into a copy's GraphDef.


def graph_nodes(build: Callable[[], None]):
  """NodeDefs (and function library) that `build()` makes in a fresh TF1 graph."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  graph = tf.Graph()
  with graph.as_default():
    build()
  return graph.as_graph_def()


def inject(module_dir: str, graph_def, *, tags: Optional[set] = None,
           control_input_of: Optional[str] = None) -> None:
  """Adds graph_def's nodes (and functions) to the module's MetaGraphs.

  `tags`: only the MetaGraph with these tags (default: every MetaGraph).
  `control_input_of`: also make the last injected node a control input of
  this existing node, putting it on that node's path.
  """
  def apply(sm):
    for mg in sm.meta_graphs:
      if tags is not None and set(mg.meta_info_def.tags) != set(tags):
        continue
      mg.graph_def.node.extend(graph_def.node)
      have = {f.signature.name for f in mg.graph_def.library.function}
      for f in graph_def.library.function:
        if f.signature.name not in have:
          mg.graph_def.library.function.add().CopyFrom(f)
      if control_input_of:
        for node in mg.graph_def.node:
          if node.name == control_input_of:
            node.input.append("^" + graph_def.node[-1].name)
  edit_saved_model(module_dir, apply)


def raw_node(name: str, op: str, inputs: Sequence[str] = (), **attrs):
  from tensorflow.core.framework import node_def_pb2  # pylint: disable=g-import-not-at-top
  node = node_def_pb2.NodeDef(name=name, op=op, input=list(inputs))
  for key, value in attrs.items():
    if isinstance(value, bytes):
      node.attr[key].s = value
    elif isinstance(value, int):
      node.attr[key].i = value
  return node


def output_node(module_dir: str, signature: str = "default",
                tags: frozenset = frozenset()) -> str:
  sm = read_saved_model(module_dir)
  for mg in sm.meta_graphs:
    if frozenset(mg.meta_info_def.tags) == tags:
      sig = mg.signature_def[signature]
      return next(iter(sig.outputs.values())).name.split(":")[0]
  raise KeyError(signature)


# --------------------------------------------------------------------------
# Fuzzing: byte mutations, and a worker that converts many mutated modules.

MUTATIONS = ("bitflip", "truncate", "insert", "overwrite")


def mutate_bytes(data: bytes, kind: str, rng) -> bytes:
  data = bytearray(data)
  if kind == "bitflip":
    for _ in range(rng.randint(1, 8)):
      if data:
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
  elif kind == "truncate":
    data = data[:rng.randrange(len(data) + 1)]
  elif kind == "insert":
    i = rng.randrange(len(data) + 1)
    data[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
  elif kind == "overwrite":
    if data:
      i = rng.randrange(len(data))
      n = rng.randint(1, 64)
      data[i:i + n] = bytes(rng.getrandbits(8) for _ in range(n))
  else:
    raise ValueError(kind)
  return bytes(data)


def convert_cases(cases: Sequence[tuple[str, str]], results_path: str) -> int:
  """Runs `convert(src, dst, verify=False)` per case, one JSON line per result.

  Meant to run in one spawned worker (`isolation.run_isolated`) for many
  cases; a line is flushed before the next case starts, so if TensorFlow
  kills the worker, the caller knows which case did it.
  """
  import json  # pylint: disable=g-import-not-at-top
  import traceback  # pylint: disable=g-import-not-at-top
  from migrate import convert, errors  # pylint: disable=g-import-not-at-top
  with open(results_path, "a", encoding="utf-8") as out:
    for src, dst in cases:
      out.write(json.dumps({"start": src}) + "\n")
      out.flush()
      start = time.monotonic()
      record = {"src": src}
      try:
        convert.convert(src, dst, verify=False)
        record.update(status="ok", code=0)
      except errors.MigrationError as e:
        record.update(status="error", code=int(e.exit_code), message=str(e))
      except Exception as e:  # pylint: disable=broad-except
        record.update(status="bug", code=1, message=f"{type(e).__name__}: {e}",
                      trace=traceback.format_exc())
      record["seconds"] = time.monotonic() - start
      out.write(json.dumps(record) + "\n")
      out.flush()
  return len(cases)


GRAPH_MUTATIONS = ("op", "input_drop", "input_rewire", "attr_type", "attr_shape",
                   "attr_int", "attr_string", "const_tensor", "delete_node",
                   "duplicate_name")


def mutate_graph(sm: saved_model_pb2.SavedModel, kind: str, rng) -> str:
  """One structural mutation of a random NodeDef; returns what it did."""
  mg = rng.choice(list(sm.meta_graphs))
  nodes = mg.graph_def.node
  node = rng.choice(list(nodes))
  names = [n.name for n in nodes]
  what = f"{kind} on {node.name} ({node.op})"
  if kind == "op":
    node.op = rng.choice(sorted({n.op for n in nodes}))
  elif kind == "input_drop" and node.input:
    del node.input[rng.randrange(len(node.input))]
  elif kind == "input_rewire":
    ref = rng.choice(names) + rng.choice(["", ":1", ":7"])
    if node.input:
      node.input[rng.randrange(len(node.input))] = ref
    else:
      node.input.append(ref)
  elif kind == "attr_type":
    typed = [k for k, v in node.attr.items() if v.WhichOneof("value") == "type"]
    if typed:
      node.attr[rng.choice(typed)].type = rng.choice([0, 2, 3, 7, 9, 10, 20, 21, 30, 99])
  elif kind == "attr_shape":
    shaped = [k for k, v in node.attr.items() if v.WhichOneof("value") == "shape"]
    if shaped:
      shape = node.attr[rng.choice(shaped)].shape
      if shape.dim:
        shape.dim[rng.randrange(len(shape.dim))].size = rng.choice(
            [-7, -1, 0, 1, 5, 2 ** 31, 2 ** 62])
      else:
        shape.unknown_rank = not shape.unknown_rank
  elif kind == "attr_int":
    ints = [k for k, v in node.attr.items() if v.WhichOneof("value") in ("i", "list")]
    if ints:
      value = node.attr[rng.choice(ints)]
      pick = lambda: rng.choice([-(2 ** 40), -1, 0, 1, 3, 2 ** 31, 2 ** 62])
      if value.WhichOneof("value") == "i":
        value.i = pick()
      elif value.list.i:
        value.list.i[rng.randrange(len(value.list.i))] = pick()
  elif kind == "attr_string":
    strs = [k for k, v in node.attr.items() if v.WhichOneof("value") == "s"]
    if strs:
      node.attr[rng.choice(strs)].s = rng.choice(
          [b"", b"NCHW", b"NHWC", b"VALID", b"EXPLICIT", b"\xff\xfe", b"x" * 300])
  elif kind == "const_tensor":
    consts = [n for n in nodes if n.op == "Const"]
    if consts:
      tensor = rng.choice(consts).attr["value"].tensor
      choice = rng.randrange(3)
      if choice == 0:
        tensor.dtype = rng.choice([1, 3, 7, 9, 20, 21])
      elif choice == 1 and tensor.tensor_shape.dim:
        tensor.tensor_shape.dim[0].size = rng.choice([0, 3, 2 ** 31, -2])
      else:
        tensor.tensor_content = tensor.tensor_content[:len(tensor.tensor_content) // 2]
  elif kind == "delete_node":
    del nodes[names.index(node.name)]
  elif kind == "duplicate_name":
    node.name = rng.choice(names)
  return what


# Op-type and attribute mutations (issue #14): what an attacker changes to
# get an op past the scan, rather than bytes.
OP_MUTATIONS = ("op_from_registry", "op_unsafe", "attr_func", "attr_path",
                "call_an_op", "function_with_unsafe_op", "gradient_of_unsafe")
UNSAFE_FOR_FUZZ = ("ReadFile", "WriteFile", "SaveV2", "RestoreV2",
                   "MergeV2Checkpoints", "PyFunc", "EagerPyFunc", "PrintV2",
                   "MatchingFiles", "FixedUnigramCandidateSampler",
                   "TFRecordDataset", "ImmutableConst", "DeleteFile", "_Send",
                   "Abort", "DebugIdentityV2", "Skipgram")


def registered_ops() -> list[str]:
  from tensorflow.core.framework import op_def_pb2  # pylint: disable=g-import-not-at-top
  from tensorflow.python.client import pywrap_tf_session  # pylint: disable=g-import-not-at-top
  ops = op_def_pb2.OpList()
  ops.ParseFromString(bytes(pywrap_tf_session.TF_GetBuffer(
      pywrap_tf_session.TF_GetAllOpList())))
  return sorted(op.name for op in ops.op)


def mutate_ops(sm: saved_model_pb2.SavedModel, kind: str, rng,
               registry: Sequence[str]) -> str:
  """One op-type or attribute mutation of a random NodeDef; returns what it did."""
  mg = rng.choice(list(sm.meta_graphs))
  graph_def = mg.graph_def
  node = rng.choice(list(graph_def.node))
  what = f"{kind} on {node.name} ({node.op})"
  if kind == "op_from_registry":
    node.op = rng.choice(registry)
  elif kind == "op_unsafe":
    node.op = rng.choice(UNSAFE_FOR_FUZZ)
  elif kind == "attr_func":
    key = rng.choice(sorted(node.attr) + ["f", "then_branch", "body"])
    node.attr[key].func.name = rng.choice(list(UNSAFE_FOR_FUZZ) + ["NoSuchFn"])
  elif kind == "attr_path":
    key = rng.choice(sorted(node.attr) + ["vocab_file", "filename", "output_stream"])
    node.attr[key].s = rng.choice([b"/etc/passwd", b"file:///tmp/fuzz_canary",
                                   b"../../outside", b"\x00"])
  elif kind == "call_an_op":
    node.op = rng.choice(["StatefulPartitionedCall", "PartitionedCall", "If",
                          "While"])
    node.attr["f"].func.name = rng.choice(UNSAFE_FOR_FUZZ)
  elif kind in ("function_with_unsafe_op", "gradient_of_unsafe"):
    fdef = graph_def.library.function.add()
    fdef.signature.name = f"fuzz_fn_{rng.randrange(10**6)}"
    inner = fdef.node_def.add(name="inner", op=rng.choice(UNSAFE_FOR_FUZZ))
    inner.attr["T"].type = 1
    if kind == "function_with_unsafe_op":
      node.op = fdef.signature.name  # Called by name, as TF1 Defuns were.
    else:
      # The gradient is the unsafe function itself, or names no function.
      graph_def.library.gradient.add(function_name=fdef.signature.name,
                                     gradient_func=rng.choice(["NoSuchGrad",
                                                               fdef.signature.name]))
  return what
