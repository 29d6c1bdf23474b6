"""Bad inputs through the real CLI: one clear line, documented code, no damage.

Issue #6. Each case below is a COPY of a committed fixture mutated to be
wrong in one way (or a bad command line). Every case runs `python -m
migrate.cli ...` in its own process (several at once: each run imports
TensorFlow twice, in the CLI and in its worker), then asserts the contract
of `tests/bad_inputs.check_failure_contract`: the documented exit code,
exactly one stderr line naming the path / what was expected / what was
found, no traceback, nothing at DST nor beside it, SRC byte-identical.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import shutil
from typing import Callable, Optional, Sequence

import pytest

from migrate.errors import ExitCode
from tests import bad_inputs as bi

SMALL = "classifier_probabilities"  # 96 KB; has a train graph.
ASSET = "inference_only_asset"  # 64 KB; has an asset, no train graph.


@dataclasses.dataclass
class Case:
  args: list[str]
  code: ExitCode
  needles: Sequence[str]
  src: Optional[str] = None  # Digested before and after.
  dst: Optional[str] = None  # Must not exist afterwards.
  skip: Optional[str] = None
  cleanup: Optional[Callable[[], None]] = None
  post: Optional[Callable[[], None]] = None  # Extra checks after the run.


CASES: dict[str, Callable[[str], Case]] = {}


def case(fn):
  CASES[fn.__name__] = fn
  return fn


def _copy(root, name=SMALL):
  return bi.copy_fixture(name, os.path.join(root, "src"))


def _convert_case(src, root, code, needles, *extra, dst_name="out"):
  dst = os.path.join(root, dst_name)
  return Case([src, dst, *extra], code, [*needles], src=src, dst=dst)


# ---- SRC is not there, or not a module ------------------------------------

@case
def missing_path(root):
  src = os.path.join(root, "no_such_module")
  return _convert_case(src, root, ExitCode.NOT_FOUND,
                       [src, "expected", "found nothing"])


@case
def file_instead_of_directory(root):
  src = os.path.join(root, "module.pb")
  with open(src, "wb") as f:
    f.write(b"\x08\x03")
  return _convert_case(src, root, ExitCode.NOT_FOUND,
                       [src, "expected a TF1 Hub module directory", "found a file"])


@case
def empty_directory(root):
  src = os.path.join(root, "empty")
  os.makedirs(src)
  return _convert_case(src, root, ExitCode.NOT_A_HUB_MODULE,
                       [src, "expected a TF1 Hub module", "empty directory"])


@case
def directory_of_unrelated_files(root):
  src = os.path.join(root, "photos")
  os.makedirs(src)
  with open(os.path.join(src, "cat.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff")
  return _convert_case(src, root, ExitCode.NOT_A_HUB_MODULE,
                       [src, "expected a TF1 Hub module", "found neither"])


@case
def tf2_saved_model(root):
  src = bi.make_tf2_saved_model(os.path.join(root, "tf2"))
  return _convert_case(src, root, ExitCode.NOT_A_HUB_MODULE,
                       [src, "expected a TF1 Hub module", "already TF2"])


@case
def plain_tf1_saved_model(root):
  src = _copy(root)
  os.remove(os.path.join(src, "tfhub_module.pb"))
  return _convert_case(src, root, ExitCode.NOT_A_HUB_MODULE,
                       [src, "expected a TF1 Hub module", "plain SavedModel"])


@case
def text_saved_model_only(root):
  src = _copy(root)
  sm = bi.read_saved_model(src)
  os.remove(os.path.join(src, "saved_model.pb"))
  from google.protobuf import text_format  # pylint: disable=g-import-not-at-top
  with open(os.path.join(src, "saved_model.pbtxt"), "w") as f:
    f.write(text_format.MessageToString(sm.meta_graphs[0].meta_info_def))
  return _convert_case(src, root, ExitCode.UNSUPPORTED,
                       [src, "expected a binary saved_model.pb", "found only"])


# ---- Hub modules this tool cannot convert ---------------------------------

@case
def text_module(root):
  src = _copy(root, "text_module")
  return _convert_case(src, root, ExitCode.UNSUPPORTED,
                       [src, "expected an image module", "found a text module"])


@case
def no_image_signature(root):
  src = _copy(root)

  def rename(_, sig):
    sig.inputs["pixels"].CopyFrom(sig.inputs["images"])
    del sig.inputs["images"]
  bi.edit_signatures(src, rename)
  return _convert_case(src, root, ExitCode.UNSUPPORTED,
                       [src, "expected an input 'images'", "found inputs: pixels"])


@case
def images_wrong_dtype(root):
  src = _copy(root)
  bi.edit_signatures(src, lambda _, s: setattr(s.inputs["images"], "dtype",
                                               bi.types_pb2.DT_INT32))
  return _convert_case(src, root, ExitCode.UNSUPPORTED,
                       [src, "expected input 'images' of dtype float32", "found int32"])


@case
def images_wrong_rank(root):
  src = _copy(root)
  bi.edit_signatures(src, lambda _, s: bi.set_shape(s.inputs["images"], [-1, 32, 32]))
  return _convert_case(src, root, ExitCode.UNSUPPORTED,
                       [src, "expected input 'images' of rank 4", "found shape [None, 32, 32]"])


@case
def images_wrong_channels(root):
  src = _copy(root)
  bi.edit_signatures(src, lambda _, s: bi.set_shape(s.inputs["images"], [-1, 32, 32, 1]))
  return _convert_case(src, root, ExitCode.UNSUPPORTED,
                       [src, "expected input 'images' with 3 RGB channels", "found 1 channels"])


@case
def images_sparse_encoding(root):
  src = _copy(root)

  def sparse(_, sig):
    info = sig.inputs["images"]
    info.coo_sparse.values_tensor_name = "images_values:0"
  bi.edit_signatures(src, sparse)
  return _convert_case(src, root, ExitCode.UNSUPPORTED,
                       [src, "input 'images'", "expected a dense tensor", "found a coo_sparse"])


@case
def output_wrong_rank(root):
  src = _copy(root)

  def rank4(_, sig):
    for out in sig.outputs.values():
      bi.set_shape(out, [-1, 1, 1, 10])
  bi.edit_signatures(src, rank4)
  return _convert_case(src, root, ExitCode.UNSUPPORTED,
                       [src, "of rank 2", "found shape [None, 1, 1, 10]",
                        "available output keys"])


@case
def unknown_signature(root):
  src = _copy(root)
  return _convert_case(src, root, ExitCode.UNSUPPORTED,
                       [src, "unknown signature 'features'",
                        "available signatures: default, image_classification"],
                       "--signature=features")


@case
def unknown_output_key(root):
  src = _copy(root)
  return _convert_case(src, root, ExitCode.UNSUPPORTED,
                       [src, "unknown output key 'logits'",
                        "available output keys: image_classifier"],
                       "--output_key=logits")


def _lost_gradient_copy(root, edit):
  """A copy of the TF 2.x-swish fixture with `edit(graph_def, identity_n_node)` applied
  to the first swish IdentityN of every MetaGraph."""
  src = _copy(root, "efficientnet_tf2_swish")

  def apply(sm):
    for mg in sm.meta_graphs:
      node = next(n for n in mg.graph_def.node
                  if n.op == "IdentityN" and "_gradient_op_type" in n.attr)
      edit(mg.graph_def, node)
  bi.edit_saved_model(src, apply)
  return src


@case
def gradient_override_not_in_module(root):
  """gradient_override_map to a Python gradient the module cannot carry."""
  def override(_, node):
    node.attr["_gradient_op_type"].s = b"MyStraightThroughGrad"
  src = _lost_gradient_copy(root, override)
  return _convert_case(src, root, ExitCode.UNSUPPORTED,
                       [src, "node 'efficientnet-tiny/stem/IdentityN'", "op IdentityN",
                        "'MyStraightThroughGrad'", "cannot convert"], "--noverify")


@case
def lost_custom_gradient_without_forward_gradient(root):
  """A straight-through custom gradient: its forward is under stop_gradient."""
  def stop(graph_def, node):
    stopped = graph_def.node.add()
    stopped.name = node.name + "/forward_stopped"
    stopped.op = "StopGradient"
    stopped.input.append(node.input[0])
    stopped.attr["T"].type = bi.types_pb2.DT_FLOAT
    node.input[0] = stopped.name
  src = _lost_gradient_copy(root, stop)
  return _convert_case(src, root, ExitCode.UNSUPPORTED,
                       [src, "node 'efficientnet-tiny/stem/IdentityN'",
                        "lost its custom gradient", "forward computation cannot replace it",
                        "cannot convert"], "--noverify")


@case
def unknown_module_format(root):
  src = _copy(root)
  with open(os.path.join(src, "tfhub_module.pb"), "wb") as f:
    f.write(bi.module_def_bytes(fmt=4))
  return _convert_case(src, root, ExitCode.UNSUPPORTED,
                       [os.path.join(src, "tfhub_module.pb"),
                        "expected ModuleDef format 3", "found format 4"])


@case
def unknown_required_feature(root):
  src = _copy(root)
  with open(os.path.join(src, "tfhub_module.pb"), "wb") as f:
    f.write(bi.module_def_bytes(features=["quantum_ops"]))
  return _convert_case(src, root, ExitCode.UNSUPPORTED,
                       [os.path.join(src, "tfhub_module.pb"), "requires features",
                        "quantum_ops"])


@case
def only_serve_tag_set(root):
  src = _copy(root)

  def serve_only(sm):
    keep = [mg for mg in sm.meta_graphs if not mg.meta_info_def.tags]
    del sm.meta_graphs[:]
    sm.meta_graphs.add().CopyFrom(keep[0])
    sm.meta_graphs[0].meta_info_def.tags.append("serve")
  bi.edit_saved_model(src, serve_only)
  return _convert_case(src, root, ExitCode.UNSUPPORTED,
                       [src, "expected an inference graph (tag set [])",
                        "found only tag sets ['serve']"])


# ---- Corrupt modules ------------------------------------------------------

@case
def truncated_saved_model(root):
  src = _copy(root)
  pb = os.path.join(src, "saved_model.pb")
  data = open(pb, "rb").read()
  with open(pb, "wb") as f:
    f.write(data[:len(data) // 2])
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [pb, "expected a SavedModel protocol buffer", "found unparsable"])


@case
def random_bytes_saved_model(root):
  src = _copy(root)
  pb = os.path.join(src, "saved_model.pb")
  with open(pb, "wb") as f:
    f.write(b"\xff" + bi.random_bytes(4096, seed=6))
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [pb, "expected a SavedModel protocol buffer", "found unparsable"])


@case
def empty_saved_model(root):
  src = _copy(root)
  pb = os.path.join(src, "saved_model.pb")
  open(pb, "wb").close()
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [pb, "expected one MetaGraph per tag set", "found none"])


@case
def duplicate_tag_sets(root):
  src = _copy(root)

  def dup(sm):
    sm.meta_graphs[1].meta_info_def.ClearField("tags")
  bi.edit_saved_model(src, dup)
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [src, "expected one MetaGraph per tag set", "found two"])


@case
def corrupt_module_def(root):
  src = _copy(root)
  path = os.path.join(src, "tfhub_module.pb")
  with open(path, "wb") as f:
    f.write(b"\xff\xff\xff\xff\x0f")
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [path, "expected a ModuleDef protocol buffer", "found unparsable"])


@case
def corrupt_image_module_info(root):
  src = _copy(root)
  from migrate import legacy_format  # pylint: disable=g-import-not-at-top

  def garble(sm):
    for mg in sm.meta_graphs:
      coll = mg.collection_def[legacy_format.ATTACHMENTS_COLLECTION].bytes_list
      att = legacy_format.ModuleAttachment(key="image_module_info",
                                           value=b"\x0a\xff\xff")
      del coll.value[:]
      coll.value.append(att.SerializeToString())
  bi.edit_saved_model(src, garble)
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [src, "image_module_info", "is not an ImageModuleInfo"])


@case
def missing_variables_directory(root):
  src = _copy(root)
  shutil.rmtree(os.path.join(src, "variables"))
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [src, "expected a checkpoint at variables/variables.index",
                        "found no variables/ directory"])


@case
def truncated_variables_data(root):
  src = _copy(root)
  data = os.path.join(src, "variables", "variables.data-00000-of-00001")
  content = open(data, "rb").read()
  with open(data, "wb") as f:
    f.write(content[:len(content) // 3])
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [os.path.join(src, "variables", "variables"), "expected",
                        "found"])


@case
def truncated_variables_index(root):
  src = _copy(root)
  index = os.path.join(src, "variables", "variables.index")
  content = open(index, "rb").read()
  with open(index, "wb") as f:
    f.write(content[:len(content) - 20])
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [os.path.join(src, "variables", "variables"),
                        "expected a readable checkpoint", "found"])


@case
def variables_of_another_module(root):
  src = _copy(root)
  shutil.rmtree(os.path.join(src, "variables"))
  shutil.copytree(os.path.join(bi.MODULES, "refvars_bn", "variables"),
                  os.path.join(src, "variables"))
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [os.path.join(src, "variables", "variables"),
                        "the variables index does not match the graph", "missing"])


@case
def variable_shape_mismatch(root):
  src = _copy(root)

  def reshape(sm):
    for mg in sm.meta_graphs:
      for node in mg.graph_def.node:
        if node.op == "VarHandleOp" and node.name.endswith("logits/biases"):
          node.attr["shape"].shape.dim[0].size = 7
  bi.edit_saved_model(src, reshape)
  return _convert_case(src, root, ExitCode.CORRUPT,
                       ["the variables index does not match the graph",
                        "in the checkpoint", "[7] in the graph"])


@case
def signature_tensor_not_in_graph(root):
  src = _copy(root)

  def dangle(_, sig):
    sig.inputs["images"].name = "no_such_node:0"
  bi.edit_signatures(src, dangle)
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [src, "expected a tensor of the graph",
                        "found 'no_such_node:0'"])


@case
def missing_asset_file(root):
  src = _copy(root, ASSET)
  assets = os.path.join(src, "assets")
  for name in os.listdir(assets):
    os.remove(os.path.join(assets, name))
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [assets, "expected the asset file", "found none"])


@case
def asset_path_outside_module(root):
  src = _copy(root, ASSET)
  secret = os.path.join(root, "secret.txt")
  with open(secret, "w") as f:
    f.write("not part of the module\n")

  def escape(sm):
    from tensorflow.core.protobuf import meta_graph_pb2  # pylint: disable=g-import-not-at-top
    for mg in sm.meta_graphs:
      for asset in mg.asset_file_def:
        asset.filename = "../../secret.txt"
      for raw in mg.collection_def["saved_model_assets"].any_list.value:
        asset = meta_graph_pb2.AssetFileDef()
        raw.Unpack(asset)
        asset.filename = "../../secret.txt"
        raw.Pack(asset)
  bi.edit_saved_model(src, escape)
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [src, "expected an asset file name inside assets/",
                        "'../../secret.txt'"])


# ---- DST problems ---------------------------------------------------------

@case
def dst_exists(root):
  src = _copy(root)
  dst = os.path.join(root, "out")
  os.makedirs(dst)
  with open(os.path.join(dst, "mine.txt"), "w") as f:
    f.write("keep me")
  c = Case([src, dst], ExitCode.OUTPUT,
           [dst, "expected a new output path", "found an existing directory"],
           src=src)
  c.dst = None  # It existed before; checked by the test for its content.
  return c


@case
def dst_inside_src(root):
  src = _copy(root)
  return _convert_case(src, root, ExitCode.OUTPUT,
                       ["expected an output path outside the input module",
                        "found it inside"], dst_name="src/converted")


@case
def dst_is_src(root):
  src = _copy(root)
  c = Case([src, src, "--overwrite"], ExitCode.OUTPUT,
           ["expected an output path outside the input module", "found it inside"],
           src=src)
  return c


@case
def dst_contains_src(root):
  src = _copy(root)
  c = Case([src, root, "--overwrite"], ExitCode.OUTPUT,
           [root, "expected an output path that does not contain the input"],
           src=src)
  return c


@case
def dst_parent_missing(root):
  src = _copy(root)
  return _convert_case(src, root, ExitCode.OUTPUT,
                       ["expected an existing parent directory", "found no"],
                       dst_name="no/such/parent/out")


@case
def dst_parent_is_a_file(root):
  src = _copy(root)
  with open(os.path.join(root, "afile"), "w") as f:
    f.write("x")
  return _convert_case(src, root, ExitCode.OUTPUT,
                       ["afile/out", "expected an existing parent directory"],
                       dst_name="afile/out")


@case
def dst_parent_read_only(root):
  src = _copy(root)
  ro = os.path.join(root, "readonly")
  if not bi.mount_readonly_bind(ro):
    return Case([], ExitCode.OUTPUT, [], skip="cannot bind-mount read-only "
                "(needs root / CAP_SYS_ADMIN)")
  c = _convert_case(src, root, ExitCode.OUTPUT,
                    [os.path.join(ro, "out"), "expected a writable parent directory",
                     "not writable"], dst_name="readonly/out")
  c.cleanup = lambda: bi.unmount(ro)
  return c


@case
def disk_full(root):
  src = _copy(root)
  small = os.path.join(root, "small_fs")
  # 64 KB: room for the staging directory, not for the ~80 KB model.
  if not bi.mount_tmpfs(small, "64k"):
    return Case([], ExitCode.OUTPUT, [], skip="cannot mount a tmpfs (needs "
                "root / CAP_SYS_ADMIN)")
  c = _convert_case(src, root, ExitCode.OUTPUT,
                    [os.path.join(small, "out"), "expected room to write the model",
                     "found the disk full"], "--noverify", dst_name="small_fs/out")
  c.cleanup = lambda: bi.unmount(small)
  return c


# ---- Command line and verify misuse ---------------------------------------

@case
def usage_one_argument(root):
  src = _copy(root)
  return Case([src], ExitCode.USAGE, ["expected SRC DST", "found 1 argument"],
              src=src)


@case
def usage_unknown_flag(root):
  src = _copy(root)
  return _convert_case(src, root, ExitCode.USAGE, ["Unknown command line flag 'frobnicate'"],
                       "--frobnicate")


@case
def timeout(root):
  src = _copy(root)
  return _convert_case(src, root, ExitCode.TIMEOUT,
                       [src, "expected the conversion to finish within 1 s",
                        "found it still running"], "--timeout=1")


@case
def verify_new_missing(root):
  src = _copy(root)
  new = os.path.join(root, "never_converted")
  return Case(["verify", src, new], ExitCode.NOT_FOUND,
              [new, "expected a converted SavedModel directory", "found nothing"],
              src=src, dst=new)


@case
def verify_new_is_a_file(root):
  src = _copy(root)
  new = os.path.join(root, "model.pb")
  with open(new, "wb") as f:
    f.write(b"x")
  return Case(["verify", src, new], ExitCode.NOT_FOUND,
              [new, "expected a converted SavedModel directory", "found a file"],
              src=src)


@case
def verify_new_not_a_saved_model(root):
  src = _copy(root)
  new = os.path.join(root, "empty")
  os.makedirs(new)
  return Case(["verify", src, new], ExitCode.NOT_A_HUB_MODULE,
              [new, "expected a converted SavedModel", "found none"], src=src)


@case
def verify_new_is_the_tf1_module(root):
  src = _copy(root)
  return Case(["verify", src, src], ExitCode.NOT_A_HUB_MODULE,
              [src, "expected a converted SavedModel",
               "found a TF1 Hub module"], src=src)


@case
def verify_new_is_a_plain_tf2_saved_model(root):
  src = _copy(root)
  new = bi.make_tf2_saved_model(os.path.join(root, "tf2"))
  return Case(["verify", src, new], ExitCode.NOT_A_HUB_MODULE,
              [new, "expected a SavedModel converted by migrate-hub-module",
               "found a SavedModel without metadata"], src=new)


@case
def verify_old_missing(root):
  old = os.path.join(root, "gone")
  new = bi.make_tf2_saved_model(os.path.join(root, "tf2"))
  return Case(["verify", old, new], ExitCode.NOT_FOUND,
              [old, "expected", "found nothing"], src=new)


# ---- Untrusted modules: refused before anything runs (exit 8) -------------

def _canary_absent(path):
  def check():
    assert not os.path.exists(path), f"an op of the module wrote {path}"
  return check


def _write_file_nodes(canary, scope="evil"):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def build():
    with tf.name_scope(scope):
      tf.io.write_file(canary, "written by the module")
  return bi.graph_nodes(build)


@case
def unsafe_write_file_on_the_output_path(root):
  """WriteFile as a control input of the output: running the graph writes the canary."""
  src = _copy(root)
  canary = os.path.join(root, "CANARY_written_by_module")
  out = bi.output_node(src)
  bi.inject(src, _write_file_nodes(canary), control_input_of=out)
  c = _convert_case(src, root, ExitCode.UNSAFE_OPS,
                    [src, "expected a graph of pure computations",
                     "WriteFile at 'evil/WriteFile' (file system)",
                     "refusing before anything runs", "--allow_unsafe_ops"])
  c.post = _canary_absent(canary)
  return c


@case
def unsafe_read_file_in_train_graph_only(root):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  src = _copy(root)
  secret = os.path.join(root, "secret.txt")
  with open(secret, "w") as f:
    f.write("secret")

  def build():
    with tf.name_scope("exfil"):
      tf.io.read_file(secret)
  bi.inject(src, bi.graph_nodes(build), tags={"train"})
  return _convert_case(src, root, ExitCode.UNSAFE_OPS,
                       [src, "ReadFile at 'exfil/ReadFile' (file system)"])


@case
def unsafe_py_func(root):
  src = _copy(root)
  gd = bi.graph_nodes(lambda: None)
  gd.node.append(bi.raw_node("hook/PyFunc", "PyFunc", token=b"pyfunc_0"))
  bi.inject(src, gd)
  return _convert_case(src, root, ExitCode.UNSAFE_OPS,
                       [src, "PyFunc at 'hook/PyFunc' (Python process)"])


@case
def unsafe_print_to_file(root):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  src = _copy(root)
  canary = os.path.join(root, "CANARY_printed")

  def build():
    with tf.name_scope("log"):
      tf.print("leak", output_stream=f"file://{canary}")
  out = bi.output_node(src)
  bi.inject(src, bi.graph_nodes(build), control_input_of=out)
  c = _convert_case(src, root, ExitCode.UNSAFE_OPS,
                    [src, "PrintV2 at 'log/PrintV2' (file system)"])
  c.post = _canary_absent(canary)
  return c


@case
def unsafe_dataset_ops(root):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  src = _copy(root)

  def build():
    with tf.name_scope("pipeline"):
      ds = tf.data.TFRecordDataset([os.path.join(root, "data.tfrecord")])
      tf.compat.v1.data.make_one_shot_iterator(ds).get_next()
  bi.inject(src, bi.graph_nodes(build))
  return _convert_case(src, root, ExitCode.UNSAFE_OPS,
                       [src, "(input pipeline)", "Iterator"])


@case
def unsafe_op_inside_a_library_function(root):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  src = _copy(root)
  canary = os.path.join(root, "CANARY_function")

  def build():
    @tf.function
    def sneaky(x):
      tf.io.write_file(canary, "x")
      return x + 1.0
    with tf.name_scope("helper"):
      sneaky(tf.constant(1.0))
  out = bi.output_node(src)
  bi.inject(src, bi.graph_nodes(build), control_input_of=out)
  c = _convert_case(src, root, ExitCode.UNSAFE_OPS,
                    [src, "WriteFile at '__inference_sneaky_"])
  c.post = _canary_absent(canary)
  return c


@case
def unsafe_write_file_disguised_as_saver(root):
  """A saver scope exempts only checkpoint ops, not a WriteFile named save/..."""
  src = _copy(root)
  canary = os.path.join(root, "CANARY_saver")
  bi.inject(src, _write_file_nodes(canary, scope="save"))

  def saver(sm):
    for mg in sm.meta_graphs:
      mg.saver_def.restore_op_name = "save/WriteFile"
      mg.saver_def.filename_tensor_name = "save/Const:0"
  bi.edit_saved_model(src, saver)
  c = _convert_case(src, root, ExitCode.UNSAFE_OPS,
                    [src, "WriteFile at 'save/WriteFile' (file system)"])
  c.post = _canary_absent(canary)
  return c


@case
def unsafe_module_given_to_verify(root):
  src = _copy(root)
  canary = os.path.join(root, "CANARY_verify")
  out = bi.output_node(src)
  bi.inject(src, _write_file_nodes(canary), control_input_of=out)
  new = bi.make_tf2_saved_model(os.path.join(root, "tf2"))
  c = Case(["verify", src, new], ExitCode.UNSAFE_OPS,
           [src, "WriteFile at 'evil/WriteFile'"], src=src)
  c.post = _canary_absent(canary)
  return c


# ---- Issue #14: a scan that cannot be talked around ------------------------

@case
def unsafe_save_under_the_savers_own_scope(root):
  """SaveV2 with a file name of its choosing, in the scope its SaverDef names."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  src = _copy(root)
  canary = os.path.join(root, "CANARY_saved")

  def build():
    with tf.name_scope("save"):
      tf.raw_ops.SaveV2(prefix=canary, tensor_names=["x"], shape_and_slices=[""],
                        tensors=[tf.constant(1.0)])
  bi.inject(src, bi.graph_nodes(build), control_input_of=bi.output_node(src))

  def saver(sm):
    for mg in sm.meta_graphs:
      mg.saver_def.restore_op_name = "save/restore_all"
      mg.saver_def.save_tensor_name = "save/SaveV2:0"
      mg.saver_def.filename_tensor_name = "save/SaveV2/prefix:0"
  bi.edit_saved_model(src, saver)
  c = _convert_case(src, root, ExitCode.UNSAFE_OPS,
                    [src, "SaveV2 at 'save/SaveV2'", "file system"])
  c.post = _canary_absent(canary + ".index")
  return c


@case
def unsafe_file_read_through_an_attribute(root):
  """A candidate sampler reads its vocab_file attribute: no input names it."""
  src = _copy(root)
  secret = os.path.join(root, "secret_vocab.txt")
  with open(secret, "w") as f:
    f.write("1\n2\n3\n")
  gd = bi.graph_nodes(lambda: None)
  gd.node.append(bi.raw_node("sampler/Const", "Const"))
  node = bi.raw_node("sampler/FixedUnigramCandidateSampler",
                     "FixedUnigramCandidateSampler", ["sampler/Const"],
                     vocab_file=secret.encode(), num_true=1, num_sampled=1,
                     range_max=3)
  gd.node.append(node)
  bi.inject(src, gd, control_input_of=bi.output_node(src))
  return _convert_case(src, root, ExitCode.UNSAFE_OPS,
                       [src, "FixedUnigramCandidateSampler at "
                        "'sampler/FixedUnigramCandidateSampler'", "vocabulary file"])


@case
def unsafe_function_attribute_naming_an_op(root):
  """StatefulPartitionedCall(f=WriteFile) would run WriteFile itself."""
  src = _copy(root)
  gd = bi.graph_nodes(lambda: None)
  call = bi.raw_node("call", "StatefulPartitionedCall")
  call.attr["f"].func.name = "WriteFile"
  gd.node.append(call)
  bi.inject(src, gd, control_input_of=bi.output_node(src))
  return _convert_case(src, root, ExitCode.UNSAFE_OPS,
                       [src, "StatefulPartitionedCall at 'call'",
                        "names 'WriteFile', not a function of the library"])


@case
def unsafe_node_name_forging_a_second_line(root):
  """A node name with a newline and ANSI escapes cannot forge a stderr line."""
  src = _copy(root)
  gd = bi.graph_nodes(lambda: None)
  gd.node.append(bi.raw_node("x\nmigrate-hub-module: converted OK\x1b[2K\x1b[1A",
                             "WriteFile"))
  bi.inject(src, gd)
  return _convert_case(src, root, ExitCode.UNSAFE_OPS,
                       [src, "x\\nmigrate-hub-module: converted OK\\x1b[2K\\x1b[1A"])


@case
def signature_keys_forging_lines(root):
  src = _copy(root)

  def rename(sm):
    for mg in sm.meta_graphs:
      sigs = dict(mg.signature_def)
      mg.ClearField("signature_def")
      for key, sig in sigs.items():
        mg.signature_def[key + "\n\x1b[31mforged"].CopyFrom(sig)
  bi.edit_saved_model(src, rename)
  return _convert_case(src, root, ExitCode.UNSUPPORTED,
                       [src, "found signatures: default\\n\\x1b[31mforged"])


@case
def verify_new_that_writes_a_file(root):
  """verify scans NEW (a TF2 model from anywhere) before loading it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  src = _copy(root)
  canary = os.path.join(root, "CANARY_new")

  class Evil(tf.Module):

    def __init__(self):
      super().__init__()
      self.w = tf.Variable(1.0)

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
    def __call__(self, images):
      tf.io.write_file(canary, "written by NEW")
      return tf.reduce_mean(images, [1, 2]) * self.w
  new = os.path.join(root, "evil_new")
  tf.saved_model.save(Evil(), new)
  c = Case(["verify", src, new], ExitCode.UNSAFE_OPS,
           [new, "WriteFile at '__inference___call__", "before anything loads it"],
           src=src)
  c.post = _canary_absent(canary)
  return c


# ---- Issue #14: SRC read as regular files inside it ------------------------

@case
def symlinked_assets_directory_outside(root):
  src = _copy(root, ASSET)
  outside = os.path.join(root, "elsewhere")
  shutil.copytree(os.path.join(src, "assets"), outside)
  with open(os.path.join(outside, "private.txt"), "w") as f:
    f.write("not part of the module\n")
  shutil.rmtree(os.path.join(src, "assets"))
  os.symlink(outside, os.path.join(src, "assets"))
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [os.path.join(src, "assets"), "a symlink to", "outside it"])


@case
def fifo_in_the_variables_directory(root):
  src = _copy(root)
  os.mkfifo(os.path.join(src, "variables", "variables.data-00001-of-00002"))
  return _convert_case(src, root, ExitCode.CORRUPT,
                       ["variables.data-00001-of-00002", "found a FIFO"])


@case
def checkpoint_linked_to_dev_zero(root):
  src = _copy(root)
  data = os.path.join(src, "variables", "variables.data-00000-of-00001")
  os.remove(data)
  os.symlink("/dev/zero", data)
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [data, "a symlink to /dev/zero, outside it"])


@case
def dangling_symlink(root):
  src = _copy(root)
  os.symlink(os.path.join(root, "gone"), os.path.join(src, "README"))
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [os.path.join(src, "README"), "outside it"])


@case
def dangling_symlink_inside(root):
  src = _copy(root)
  os.symlink("gone", os.path.join(src, "README"))
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [os.path.join(src, "README"), "a dangling symlink"])


@case
def non_utf8_module_path(root):
  src = os.fsdecode(shutil.copytree(os.fsencode(os.path.join(bi.MODULES, SMALL)),
                                    os.fsencode(root) + b"/caf\xe9"))
  return _convert_case(src, root, ExitCode.NOT_FOUND,
                       [os.fsencode(src).decode("ascii", "backslashreplace"),
                        "expected a module path in UTF-8"])


@case
def dst_is_a_fifo_with_overwrite(root):
  """--overwrite replaces a directory or a file, never a FIFO or a device."""
  import stat  # pylint: disable=g-import-not-at-top
  src = _copy(root)
  fifo = os.path.join(root, "out")
  os.mkfifo(fifo)
  c = Case([src, fifo, "--overwrite"], ExitCode.OUTPUT,
           [fifo, "found a special file", "refusing to replace it"], src=src)

  def still_there():
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert not bi.leftovers_beside(fifo)
  c.post = still_there
  return c


@case
def report_inside_src(root):
  src = _copy(root)
  report = os.path.join(src, "saved_model.pb")
  return _convert_case(src, root, ExitCode.OUTPUT,
                       [report, "expected a report path outside", src],
                       f"--report={report}")


def _report_case(root, report, *needles):
  """A --report path that cannot take the report: refused before the run."""
  return _convert_case(_copy(root), root, ExitCode.OUTPUT, [report, *needles],
                       f"--report={report}")


@case
def report_is_a_directory(root):
  report = os.path.join(root, "reportdir")
  os.makedirs(report)
  return _report_case(root, report, "expected a report file to replace",
                      "found a directory")


@case
def report_in_a_missing_directory(root):
  report = os.path.join(root, "no", "r.json")
  return _report_case(root, report,
                      "expected a report path in an existing, searchable directory")


@case
def report_is_a_fifo(root):
  """A FIFO as the report would block the end of the run forever."""
  report = os.path.join(root, "r.json")
  os.mkfifo(report)
  return _report_case(root, report, "found a special file")


# ---- Issue #14: bad input that was exit 1 ----------------------------------

def _image_size_case(root, height, width):
  from migrate import legacy_format  # pylint: disable=g-import-not-at-top
  src = _copy(root)

  def garble(sm):
    info = legacy_format.ImageModuleInfo()
    info.default_image_size.height = height
    info.default_image_size.width = width
    att = legacy_format.ModuleAttachment(key="image_module_info",
                                         value=info.SerializeToString())
    for mg in sm.meta_graphs:
      coll = mg.collection_def[legacy_format.ATTACHMENTS_COLLECTION].bytes_list
      del coll.value[:]
      coll.value.append(att.SerializeToString())
  bi.edit_saved_model(src, garble)
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [src, "expected a default image size of 1 to 4096",
                        f"found {height}x{width}"])


@case
def image_size_negative(root):
  return _image_size_case(root, -224, 224)


@case
def image_size_zero(root):
  return _image_size_case(root, 0, 0)


@case
def image_size_huge(root):
  return _image_size_case(root, 2 ** 31 - 1, 2 ** 31 - 1)


@case
def signature_image_size_huge(root):
  src = _copy(root)
  bi.edit_signatures(src, lambda _, s: bi.set_shape(s.inputs["images"],
                                                    [-1, 100000, 100000, 3]))
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [src, "input 'images'", "found 100000x100000"])


@case
def memory_bomb(root):
  """A 4 GiB Fill on the output path, under a 1.5 GiB memory limit."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  src = _copy(root)

  def build():
    with tf.name_scope("bomb"):
      tf.reduce_sum(tf.fill(tf.constant([64, 1024, 1024, 16]), 1.0))
  bi.inject(src, bi.graph_nodes(build), control_input_of=bi.output_node(src))
  return _convert_case(src, root, ExitCode.RESOURCES,
                       [src, "out of memory"], "--memory_limit=1.5")


@case
def op_tensorflow_refuses_to_run(root):
  """NCHW convolutions have no CPU kernel."""
  src = _copy(root)

  def nchw(sm):
    for mg in sm.meta_graphs:
      for node in mg.graph_def.node:
        if node.op == "Conv2D":
          node.attr["data_format"].s = b"NCHW"
  bi.edit_saved_model(src, nchw)
  return _convert_case(src, root, ExitCode.CORRUPT, [src, "expected", "found"])


@case
def fixed_batch_size(root):
  src = _copy(root)
  bi.edit_signatures(src, lambda _, s: bi.set_shape(s.inputs["images"], [8, 32, 32, 3]))
  return _convert_case(src, root, ExitCode.CORRUPT,
                       [src, "expected a module whose graphs run on the inputs "
                        "its signatures declare", "found ValueError"])


@case
def graph_that_never_ends(root):
  """A while loop on the output path: --timeout stops it after staging, and
  the staged model beside DST is removed."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  src = _copy(root)

  def build():
    with tf.name_scope("spin"):
      tf.while_loop(lambda i: tf.constant(True), lambda i: i + 1, [tf.constant(0)])
  bi.inject(src, bi.graph_nodes(build), control_input_of=bi.output_node(src))
  return _convert_case(src, root, ExitCode.TIMEOUT,
                       [src, "within 45 s", "nothing was written"], "--timeout=45")


# --------------------------------------------------------------------------


def test_corpus_is_large_enough():
  assert len(CASES) >= 30, len(CASES)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Builds every case, runs them all (3 CLIs at a time), yields the results."""
  base = tmp_path_factory.mktemp("bad_inputs")
  built: dict[str, Case] = {}
  digests: dict[str, str] = {}
  try:
    for name, builder in CASES.items():
      root = os.path.join(str(base), name)
      os.makedirs(root)
      built[name] = builder(root)
      if built[name].src:
        digests[name] = bi.tree_digest(built[name].src)
    runnable = {n: c for n, c in built.items() if not c.skip}
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
      futures = {n: pool.submit(bi.run_cli, c.args, timeout=300)
                 for n, c in runnable.items()}
      runs = {n: f.result() for n, f in futures.items()}
    yield built, digests, runs
  finally:
    for c in built.values():
      if c.cleanup:
        c.cleanup()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(corpus, name):
  built, digests, runs = corpus
  c = built[name]
  if c.skip:
    pytest.skip(c.skip)
  run = runs[name]
  bi.check_failure_contract(run, code=c.code, needles=c.needles, src=c.src,
                            src_digest=digests.get(name), dst=c.dst)
  if name == "dst_exists":
    dst = c.args[1]
    assert open(os.path.join(dst, "mine.txt")).read() == "keep me"
    assert os.listdir(dst) == ["mine.txt"]
  if c.post:
    c.post()


def test_allowed_unsafe_op_off_the_signature_path_never_runs(tmp_path):
  """--allow_unsafe_ops converts (and verifies) without running the WriteFile."""
  src = bi.copy_fixture(SMALL, str(tmp_path / "src"))
  canary = str(tmp_path / "CANARY_allowed")
  bi.inject(src, _write_file_nodes(canary))  # In every graph, on no output's path.
  digest = bi.tree_digest(src)
  dst = str(tmp_path / "out")
  run = bi.run_cli([src, dst, "--allow_unsafe_ops"])
  assert run.returncode == 0, run.describe()
  assert "PASSED" in run.stdout, run.describe()
  assert not os.path.exists(canary), "the converter or verifier ran WriteFile"
  assert bi.tree_digest(src) == digest
  # Nor does using the converted model run it.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  obj = tf.saved_model.load(dst)
  obj(tf.zeros([1, 32, 32, 3]))
  obj(tf.zeros([1, 32, 32, 3]), training=True)
  for fn in obj.signatures.values():
    fn(images=tf.zeros([1, 32, 32, 3]))
  assert not os.path.exists(canary), "the converted model runs WriteFile"


UNSAFE_OP_TYPES = [
    "ReadFile", "WriteFile", "MatchingFiles", "SaveV2", "RestoreV2",
    "MergeV2Checkpoints", "PyFunc", "PyFuncStateless", "EagerPyFunc",
    "TFRecordDataset", "IteratorGetNext", "MakeIterator", "TextLineReaderV2",
    "ReaderReadV2", "InitializeTableFromTextFileV2", "ImmutableConst",
    "CreateSummaryFileWriter", "WriteScalarSummary", "DumpTensor",
    "DebugIdentityV2", "RemoteCall", "RpcCall", "CollectiveReduceV3", "_Send",
    "_HostRecv", "XlaSendToHost", "FileSystemSetConfiguration",
    "DecodeProtoV2", "LoadAndRemapMatrix", "Print", "PrintV2",
    "ReaderNumRecordsProduced", "FixedUnigramCandidateSampler", "Skipgram",
    "NoSuchOp"]
SAFE_OP_TYPES = ["Conv2D", "ReadVariableOp", "ScalarSummary", "Const",
                 "ShardedFilename", "Assert"]


def test_safety_scan_finds_every_known_unsafe_op(tmp_path):
  """A static check of the allowlist (no process per op): one module, many
  nodes. Checkpoint ops pass only in a saver's shape (tests/test_safety.py),
  whatever scope the SaverDef names."""
  from migrate import legacy_format, safety  # pylint: disable=g-import-not-at-top
  src = bi.copy_fixture(SMALL, str(tmp_path / "src"))
  gd = bi.graph_nodes(lambda: None)
  for op in UNSAFE_OP_TYPES + SAFE_OP_TYPES:
    gd.node.append(bi.raw_node(f"probe/{op}", op))
  for stream, name in ((b"stderr", "stderr"), (b"file:///tmp/x", "file")):
    gd.node.append(bi.raw_node(f"print/{name}", "PrintV2", output_stream=stream))
  for op in ("RestoreV2", "SaveV2", "MergeV2Checkpoints", "WriteFile"):
    gd.node.append(bi.raw_node(f"save/{op}", op))
  bi.inject(src, gd, tags=set())

  def saver(sm):
    sm.meta_graphs[0].saver_def.restore_op_name = "save/restore_all"
    sm.meta_graphs[0].saver_def.filename_tensor_name = "save/Const:0"
  bi.edit_saved_model(src, saver)
  found = {op.node for op in safety.find_unsafe_ops(legacy_format.read_module(src))}
  expected = ({f"probe/{op}" for op in UNSAFE_OP_TYPES} |
              {"print/stderr", "print/file", "save/RestoreV2", "save/SaveV2",
               "save/MergeV2Checkpoints", "save/WriteFile"})
  assert found == expected, (sorted(found - expected), sorted(expected - found))
