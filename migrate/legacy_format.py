"""READ stage: the TF1 Hub format, read directly from disk.

A TF1 Hub module (what `hub.Module(...).export` wrote) is a SavedModel with
one MetaGraph per tag set (`set()` for inference, `{"train"}` for
fine-tuning), no saver, a checkpoint under `variables/`, a `tfhub_module.pb`
holding a `ModuleDef` (format 3), and attached messages (e.g.
`image_module_info`) in the collection `hub_module_attachments`.

tensorflow_hub >= 0.16 no longer ships the protos for `ModuleDef`,
`ModuleAttachment` and `ImageModuleInfo`; they are declared here from their
published `.proto` definitions with the protobuf library.

Nothing here runs a graph: this module only parses and validates.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional, Sequence

import numpy as np
from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message as pb_message
from google.protobuf import message_factory
import tensorflow as tf
from tensorflow.core.framework import variable_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow.core.protobuf import saved_model_pb2

from migrate import errors
from migrate import fileutil
from migrate import preflight

MODULE_DEF_FILENAME = preflight.MODULE_DEF_FILENAME
SAVED_MODEL_FILENAME = preflight.SAVED_MODEL_FILENAME
ATTACHMENTS_COLLECTION = "hub_module_attachments"
IMAGE_MODULE_INFO_KEY = "image_module_info"
SUPPORTED_MODULE_FORMAT = 3  # ModuleDef.FORMAT_V3, the only one ever published.
SUPPORTED_REQUIRED_FEATURES: frozenset[str] = frozenset()  # As in hub 0.15.

# Image sides this tool accepts (the default size attached to a module, or a
# fixed input size of its signature): real TF1 Hub image modules use 96 to
# 600 pixels; verification makes images of that size, so a corrupt or
# hostile value must not become a memory bomb.
MAX_IMAGE_SIDE = 4096

# A ModuleDef is a format number and a few feature names.
_MAX_MODULE_DEF_BYTES = 1 << 20

INFERENCE_TAGS: frozenset[str] = frozenset()
TRAIN_TAGS: frozenset[str] = frozenset({"train"})


def node_name(ref: str) -> str:
  """The node of a GraphDef reference: '^a', 'a:1' and 'a' name node 'a'."""
  return ref.lstrip("^").split(":")[0]


def tensor_name(ref: str) -> str:
  """The tensor a reference names: 'a' is output 0 ('a:0'), 'a:1' stays."""
  return ref if ":" in ref else ref + ":0"


def _declare_hub_protos():
  """Declares ModuleDef, ModuleAttachment and ImageModuleInfo (tensorflow_hub/*.proto)."""
  fdp = descriptor_pb2.FileDescriptorProto(
      name="migrate/tf1_hub_protos.proto", package="tensorflow_hub",
      syntax="proto3")
  f = descriptor_pb2.FieldDescriptorProto
  module_def = fdp.message_type.add(name="ModuleDef")
  fmt_enum = module_def.enum_type.add(name="Format")
  fmt_enum.value.add(name="FORMAT_UNSPECIFIED", number=0)
  fmt_enum.value.add(name="FORMAT_V3", number=3)
  module_def.field.add(name="format", number=1, type=f.TYPE_ENUM,
                       type_name=".tensorflow_hub.ModuleDef.Format",
                       label=f.LABEL_OPTIONAL)
  module_def.field.add(name="required_features", number=2, type=f.TYPE_STRING,
                       label=f.LABEL_REPEATED)
  attachment = fdp.message_type.add(name="ModuleAttachment")
  attachment.field.add(name="key", number=1, type=f.TYPE_STRING,
                       label=f.LABEL_OPTIONAL)
  attachment.field.add(name="value", number=2, type=f.TYPE_BYTES,
                       label=f.LABEL_OPTIONAL)
  info = fdp.message_type.add(name="ImageModuleInfo")
  size = info.nested_type.add(name="InputSize")
  size.field.add(name="height", number=1, type=f.TYPE_INT32,
                 label=f.LABEL_OPTIONAL)
  size.field.add(name="width", number=2, type=f.TYPE_INT32,
                 label=f.LABEL_OPTIONAL)
  info.field.add(name="default_image_size", number=1, type=f.TYPE_MESSAGE,
                 type_name=".tensorflow_hub.ImageModuleInfo.InputSize",
                 label=f.LABEL_OPTIONAL)
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fdp)
  get = lambda n: message_factory.GetMessageClass(
      pool.FindMessageTypeByName("tensorflow_hub." + n))
  return get("ModuleDef"), get("ModuleAttachment"), get("ImageModuleInfo")


ModuleDef, ModuleAttachment, ImageModuleInfo = _declare_hub_protos()


@dataclasses.dataclass(frozen=True)
class TensorSpecInfo:
  """One input or output of a signature: its graph tensor and static type."""

  tensor_name: str  # e.g. "module/images:0" without the module scope.
  dtype: tf.DType
  shape: Optional[tuple[Optional[int], ...]]  # None: unknown rank.

  @property
  def rank(self) -> Optional[int]:
    return None if self.shape is None else len(self.shape)


@dataclasses.dataclass(frozen=True)
class Signature:
  name: str
  inputs: Mapping[str, TensorSpecInfo]
  outputs: Mapping[str, TensorSpecInfo]
  # The module's own key of the input known here as "images", where it was
  # another (see `_images_key`); None if it was "images".
  renamed_images_input: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class VariableInfo:
  name: str  # Graph name without ":0", also the checkpoint key.
  trainable: bool
  is_resource: bool


@dataclasses.dataclass(frozen=True)
class GraphVariant:
  """One MetaGraph of the module (one tag set)."""

  tags: frozenset[str]
  meta_graph: meta_graph_pb2.MetaGraphDef
  signatures: Mapping[str, Signature]
  variables: Sequence[VariableInfo]
  update_ops: Sequence[str]  # Op names of UPDATE_OPS.
  regularization_losses: Sequence[str]  # Tensor names.
  asset_files: Mapping[str, str]  # Graph tensor name -> file name in assets/.

  @property
  def graph_def(self) -> tf.compat.v1.GraphDef:
    return self.meta_graph.graph_def


@dataclasses.dataclass(frozen=True)
class LegacyModule:
  """Everything the later stages need to know about a TF1 Hub module."""

  path: str
  required_features: Sequence[str]
  variants: Mapping[frozenset[str], GraphVariant]
  attachments: Mapping[str, bytes]
  checkpoint_prefix: str
  saved_model_sha256: str
  source_bytes: int = 0  # Bytes of the module's files (what conversion reads).

  @property
  def inference(self) -> GraphVariant:
    return self.variants[INFERENCE_TAGS]

  @property
  def train(self) -> Optional[GraphVariant]:
    return self.variants.get(TRAIN_TAGS)

  def image_module_info_size(self) -> Optional[tuple[int, int]]:
    """The default image size attached as `image_module_info`, if any."""
    raw = self.attachments.get(IMAGE_MODULE_INFO_KEY)
    if raw is None:
      return None
    info = ImageModuleInfo()
    try:
      info.ParseFromString(raw)
    except pb_message.DecodeError as e:
      raise errors.CorruptModuleError(
          f"{self.path}: attached message '{IMAGE_MODULE_INFO_KEY}' is not an "
          f"ImageModuleInfo ({e})") from None
    if not info.HasField("default_image_size"):
      return None
    size = info.default_image_size
    check_image_size(f"{self.path}: attached message '{IMAGE_MODULE_INFO_KEY}'",
                     "default image size", (size.height, size.width))
    return (size.height, size.width)


def check_image_size(where: str, what: str, size: Sequence[Optional[int]]) -> None:
  """Refuses an image side outside 1..MAX_IMAGE_SIDE (None: variable)."""
  if any(s is not None and not 1 <= s <= MAX_IMAGE_SIDE for s in size):
    shown = "x".join("None" if s is None else str(s) for s in size)
    raise errors.CorruptModuleError(
        f"{where}: expected a {what} of 1 to {MAX_IMAGE_SIDE} pixels per "
        f"side, found {shown}")


def placeholder_defaults(graph_def) -> dict[str, np.ndarray]:
  """Tensor name -> default value of each PlaceholderWithDefault fed by a Const.

  E.g. `batch_norm_momentum` of the `*_with_bn_hparams` signatures (0.99).
  """
  nodes = {n.name: n for n in graph_def.node}
  result = {}
  for node in graph_def.node:
    if node.op != "PlaceholderWithDefault" or not node.input:
      continue
    src = nodes.get(node_name(node.input[0]))
    if src is not None and src.op == "Const":
      try:
        result[node.name + ":0"] = tf.make_ndarray(src.attr["value"].tensor)
      except (TypeError, ValueError):
        continue  # A garbled constant: the import reports it.
  return result


def _read_module_def(path: str) -> ModuleDef:
  module_def_path = os.path.join(path, MODULE_DEF_FILENAME)
  module_def = ModuleDef()
  try:
    module_def.ParseFromString(fileutil.read_regular_file(
        module_def_path, max_bytes=_MAX_MODULE_DEF_BYTES))
  except (pb_message.DecodeError, ValueError) as e:
    raise errors.CorruptModuleError(
        f"{module_def_path}: expected a ModuleDef protocol buffer, found "
        f"unparsable bytes ({e})") from None
  if module_def.format != SUPPORTED_MODULE_FORMAT:
    raise errors.UnsupportedModuleError(
        f"{module_def_path}: expected ModuleDef format "
        f"{SUPPORTED_MODULE_FORMAT} (FORMAT_V3), found format "
        f"{module_def.format}")
  unknown = sorted(set(module_def.required_features) -
                   SUPPORTED_REQUIRED_FEATURES)
  if unknown:
    raise errors.UnsupportedModuleError(
        f"{module_def_path}: the module requires features this tool does not "
        f"know: {', '.join(unknown)}")
  return module_def


def _check_is_hub_module(path: str) -> None:
  if preflight.check_source(path):
    return
  if _is_tf2(path):
    preflight.raise_already_tf2(path)
  raise errors.NotAHubModuleError(
      f"{path}: expected a TF1 Hub module, found a plain SavedModel without "
      f"{MODULE_DEF_FILENAME}")


def _is_tf2(path: str) -> bool:
  """True when saved_model.pb carries a TF2 object graph."""
  try:
    saved_model = parse_saved_model(path)
  except errors.MigrationError:
    return False
  return any(mg.HasField("object_graph_def") and mg.object_graph_def.nodes
             for mg in saved_model.meta_graphs)


def parse_saved_model(path: str) -> saved_model_pb2.SavedModel:
  """The SavedModel protocol buffer of the directory `path` (one MetaGraph
  at least); raises a MigrationError naming the file otherwise."""
  pb_path = os.path.join(path, SAVED_MODEL_FILENAME)
  saved_model = saved_model_pb2.SavedModel()
  if not os.path.isfile(pb_path):
    raise errors.UnsupportedModuleError(
        f"{path}: expected a binary {SAVED_MODEL_FILENAME}, found only a text "
        f"saved_model.pbtxt")
  try:
    saved_model.ParseFromString(fileutil.read_regular_file(pb_path))
  except (pb_message.DecodeError, ValueError, RuntimeError) as e:
    raise errors.CorruptModuleError(
        f"{pb_path}: expected a SavedModel protocol buffer, found unparsable "
        f"bytes ({e})") from None
  if not saved_model.meta_graphs:
    raise errors.CorruptModuleError(
        f"{pb_path}: expected one MetaGraph per tag set, found none")
  return saved_model


def _tensor_info(info: meta_graph_pb2.TensorInfo, where: str) -> TensorSpecInfo:
  if info.WhichOneof("encoding") != "name":
    raise errors.UnsupportedModuleError(
        f"{where}: expected a dense tensor, found a "
        f"{info.WhichOneof('encoding')} encoding")
  if info.tensor_shape.unknown_rank:
    shape = None
  else:
    shape = tuple(d.size if d.size >= 0 else None
                  for d in info.tensor_shape.dim)
  try:
    dtype = tf.as_dtype(info.dtype)
  except TypeError:
    raise errors.CorruptModuleError(
        f"{where}: expected a TensorFlow dtype, found enum value "
        f"{info.dtype}") from None
  return TensorSpecInfo(tensor_name=info.name, dtype=dtype, shape=shape)


def _check_tensors_exist(mg: meta_graph_pb2.MetaGraphDef, name: str,
                        sig: Signature, where: str) -> None:
  """Each input and output names a node of the graph ("node:index")."""
  nodes = {n.name for n in mg.graph_def.node}
  for kind, infos in (("input", sig.inputs), ("output", sig.outputs)):
    for key, info in infos.items():
      node, _, index = info.tensor_name.partition(":")
      if node not in nodes or (index and not index.isdigit()):
        raise errors.CorruptModuleError(
            f"{where} signature '{name}' {kind} '{key}': expected a tensor of "
            f"the graph, found '{info.tensor_name}', which is not in it")


IMAGES_INPUT = "images"  # The input of the image signatures ("Common Signatures for Images").


def _images_key(inputs: Mapping[str, TensorSpecInfo],
                images_tensors: set[str]) -> Optional[str]:
  """The key of a signature's only input when it holds images under another
  key than 'images': 'default', what `hub.add_signature(inputs=images)`
  makes and `hub.Module` callers never name (`module(images)`), if it is
  float32 of rank 4 (or unknown) with 3 (or unknown) channels; or any key
  whose tensor is another signature's 'images'."""
  if len(inputs) != 1 or IMAGES_INPUT in inputs:
    return None
  key, info = next(iter(inputs.items()))
  if info.tensor_name in images_tensors:
    return key
  if key != "default" or info.dtype != tf.float32 or info.rank not in (None, 4):
    return None
  if info.shape is not None and info.shape[3] not in (None, 3):
    return None
  return key


def _signatures(mg: meta_graph_pb2.MetaGraphDef,
                where: str) -> dict[str, Signature]:
  """The signatures; an image input under another key (`_images_key`) is
  known as 'images' here, and so in the converted model."""
  result = {}
  images_tensors = {sig.inputs[IMAGES_INPUT].name
                    for sig in mg.signature_def.values()
                    if IMAGES_INPUT in sig.inputs}
  for name, sig in sorted(mg.signature_def.items()):
    inputs = {k: _tensor_info(v, f"{where} signature '{name}' input '{k}'")
              for k, v in sorted(sig.inputs.items())}
    renamed = _images_key(inputs, images_tensors)
    if renamed is not None:
      inputs = {IMAGES_INPUT: inputs[renamed]}
    result[name] = Signature(
        name=name, inputs=inputs,
        outputs={k: _tensor_info(v, f"{where} signature '{name}' output '{k}'")
                 for k, v in sorted(sig.outputs.items())},
        renamed_images_input=renamed)
    _check_tensors_exist(mg, name, result[name], where)
  return result


def _variables(mg: meta_graph_pb2.MetaGraphDef, where: str) -> list[VariableInfo]:
  def var_defs(key):
    coll = mg.collection_def.get(key)
    if coll is None:
      return []
    defs = []
    for raw in coll.bytes_list.value:
      vd = variable_pb2.VariableDef()
      try:
        vd.ParseFromString(raw)
      except pb_message.DecodeError:
        raise errors.CorruptModuleError(
            f"{where}: collection '{key}' holds an unparsable VariableDef"
        ) from None
      defs.append(vd)
    return defs

  trainable = {vd.variable_name for vd in var_defs("trainable_variables")}
  result, seen = [], set()
  for key in ("variables", "model_variables", "trainable_variables"):
    for vd in var_defs(key):
      name = node_name(vd.variable_name)
      if name in seen:
        continue
      seen.add(name)
      result.append(VariableInfo(name=name,
                                 trainable=vd.variable_name in trainable,
                                 is_resource=vd.is_resource))
  return result


def _node_list(mg: meta_graph_pb2.MetaGraphDef, key: str) -> list[str]:
  coll = mg.collection_def.get(key)
  return list(coll.node_list.value) if coll is not None else []


def _attachments(mg: meta_graph_pb2.MetaGraphDef, where: str) -> dict[str, bytes]:
  result = {}
  coll = mg.collection_def.get(ATTACHMENTS_COLLECTION)
  if coll is None:
    return result
  for raw in coll.bytes_list.value:
    att = ModuleAttachment()
    try:
      att.ParseFromString(raw)
    except pb_message.DecodeError:
      raise errors.CorruptModuleError(
          f"{where}: collection '{ATTACHMENTS_COLLECTION}' holds an unparsable "
          f"ModuleAttachment") from None
    result[att.key] = att.value
  return result


def _check_asset_name(path: str, filename: str, where: str) -> str:
  """An asset is a file directly in SRC/assets/, never a path out of it."""
  assets = os.path.realpath(os.path.join(path, "assets"))
  target = os.path.realpath(os.path.join(assets, filename))
  if (not filename or os.path.isabs(filename) or os.sep in filename or
      (os.altsep and os.altsep in filename) or filename in (".", "..") or
      os.path.dirname(target) != assets):
    raise errors.CorruptModuleError(
        f"{where}: expected an asset file name inside assets/, found "
        f"{filename!r} (an asset may not refer to a file outside the module)")
  return filename


def unpack_asset_file_def(raw) -> Optional[meta_graph_pb2.AssetFileDef]:
  """The AssetFileDef packed in an `Any` of a collection, or None."""
  asset = meta_graph_pb2.AssetFileDef()
  try:
    return asset if raw.Unpack(asset) else None
  except pb_message.DecodeError:
    return None


def _asset_files(mg: meta_graph_pb2.MetaGraphDef, path: str,
                 where: str) -> dict[str, str]:
  result = {}
  for asset in mg.asset_file_def:
    result[asset.tensor_info.name] = _check_asset_name(path, asset.filename,
                                                       where)
  # Before asset_file_def existed, SavedModels listed assets in a collection.
  coll = mg.collection_def.get("saved_model_assets")
  if coll is not None:
    for raw in coll.any_list.value:
      asset = unpack_asset_file_def(raw)
      if asset is None:
        raise errors.CorruptModuleError(
            f"{where}: expected AssetFileDef messages in collection "
            f"'saved_model_assets', found {raw.type_url or 'an empty Any'}")
      result[asset.tensor_info.name] = _check_asset_name(path, asset.filename,
                                                         where)
  return result


def read_module(path: str) -> LegacyModule:
  """Reads and validates a TF1 Hub module directory.

  Raises a `migrate.errors.MigrationError` subclass naming the path, what was
  expected and what was found, for anything that is not a readable TF1 Hub
  module.
  """
  path = os.fspath(path)
  _check_is_hub_module(path)
  module_def = _read_module_def(path)
  saved_model = parse_saved_model(path)
  variants: dict[frozenset[str], GraphVariant] = {}
  attachments: dict[str, bytes] = {}
  for mg in saved_model.meta_graphs:
    tags = frozenset(mg.meta_info_def.tags)
    where = f"{path} (tags {sorted(tags)})"
    if tags in variants:
      raise errors.CorruptModuleError(
          f"{where}: expected one MetaGraph per tag set, found two")
    variants[tags] = GraphVariant(
        tags=tags, meta_graph=mg, signatures=_signatures(mg, where),
        variables=_variables(mg, where),
        update_ops=_node_list(mg, tf.compat.v1.GraphKeys.UPDATE_OPS),
        regularization_losses=_node_list(
            mg, tf.compat.v1.GraphKeys.REGULARIZATION_LOSSES),
        asset_files=_asset_files(mg, path, where))
    attachments.update(_attachments(mg, where))
  if INFERENCE_TAGS not in variants:
    found = ", ".join(str(sorted(t)) for t in variants)
    raise errors.UnsupportedModuleError(
        f"{path}: expected an inference graph (tag set []), found only tag "
        f"sets {found}")
  variables_dir = os.path.join(path, "variables")
  prefix = os.path.join(path, preflight.CHECKPOINT_PREFIX)
  if any(v.variables for v in variants.values()):
    if not os.path.isfile(prefix + ".index"):
      raise errors.CorruptModuleError(
          f"{path}: expected a checkpoint at variables/variables.index, found "
          f"{'no variables/ directory' if not os.path.isdir(variables_dir) else 'none'}")
  return LegacyModule(
      path=path,
      required_features=tuple(module_def.required_features),
      variants=variants,
      attachments=attachments,
      checkpoint_prefix=prefix,
      saved_model_sha256=fileutil.file_sha256(os.path.join(path, SAVED_MODEL_FILENAME)),
      source_bytes=sum(f.size for f in fileutil.source_files(path)))
