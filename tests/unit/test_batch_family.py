"""The family of a module (`migrate.batch_family`), read from its checkpoint
index without TensorFlow: the reader checked against TensorFlow's own on
every committed fixture, the scopes of the real networks' variables, and
spoiled indexes (unknown, never a hang or an exception). Fast."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import tensorflow as tf

from migrate import batch_family
from tests.conftest import FIXTURE_FAMILIES, fixture_names, module_path

INDEX = os.path.join("variables", "variables.index")


def _index_bytes(name: str) -> bytes:
  with open(os.path.join(module_path(name), INDEX), "rb") as f:
    return f.read()


def test_every_fixture_has_its_family_listed():
  assert sorted(FIXTURE_FAMILIES) == fixture_names()


@pytest.mark.parametrize("name", fixture_names())
def test_index_keys_are_the_variables_tensorflow_reads(name):
  prefix = os.path.join(module_path(name), "variables", "variables")
  keys = batch_family.index_keys(_index_bytes(name))
  assert sorted(keys) == sorted(n for n, _ in tf.train.list_variables(prefix))
  assert batch_family.family(module_path(name)) == FIXTURE_FAMILIES[name]


@pytest.mark.parametrize("names, family", [
    # Root scopes as tf-slim and the TPU models name them.
    (["resnet_v1_101/conv1/weights", "resnet_v1_101/block1/unit_1/x",
      "resnet_v1_101/logits/weights"], "resnet_v1"),
    (["resnet_v2_152/conv1/weights"], "resnet_v2"),
    (["InceptionResnetV2/Conv2d_1a_3x3/weights", "InceptionResnetV2/Logits/w"],
     "inception_resnet_v2"),
    (["InceptionV1/Conv2d_1a_7x7/weights"], "inception_v1"),
    (["InceptionV3/Conv2d_1a_3x3/weights", "InceptionV3/AuxLogits/x"], "inception_v3"),
    (["MobilenetV2/Conv/weights", "MobilenetV2/expanded_conv/x"], "mobilenet_v2"),
    (["MobilenetV1/Conv2d_0/weights", "MobilenetV1/Conv2d_0/act_quant/min"],
     "mobilenet_v1"),
    (["efficientnet-b7/stem/conv2d/kernel", "efficientnet-b7/head/dense/kernel"],
     "efficientnet"),
    # NASNet-A and PNASNet keep their cells at the root; PNASNet has no
    # reduction_cell_N (its reduction cells are numbered as normal ones).
    (["cell_stem_0/1x1/weights", "cell_0/1x1/weights", "cell_1/1x1/weights",
      "reduction_cell_0/1x1/weights", "final_layer/FC/weights"], "nasnet"),
    (["cell_stem_0/1x1/weights", "cell_0/1x1/weights", "cell_1/1x1/weights",
      "final_layer/FC/weights"], "pnasnet"),
    (["AmoebaNet/cell_0/x"], "amoebanet"),
    # A head or a projection with more variables than the body is not the family.
    (["Logits/a", "Logits/b", "Logits/c", "Projection/fc/weights", "SmallNet/conv1/w"],
     "smallnet"),
    (["vgg_16/conv1/conv1_1/weights"], "vgg_16"),
    ([], "unknown"),
])
def test_family_of_names(names, family):
  assert batch_family.family_of_names(names) == family


def test_an_unreadable_index_is_unknown_and_never_blocks_or_raises(tmp_path):
  data = _index_bytes("mobilenet_v1_bn_hparams")
  # Every truncation and every flipped byte of a real index.
  for spoiled in [data[:n] for n in range(len(data))] + [
      data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:] for i in range(len(data))]:
    try:
      keys = batch_family.index_keys(spoiled)
    except ValueError:
      continue
    assert isinstance(batch_family.family_of_names(keys), str)

  def module_with(make_index) -> str:
    path = tmp_path / f"m{len(os.listdir(tmp_path))}"
    shutil.copytree(module_path("mobilenet_v1_bn_hparams"), path)
    os.remove(path / INDEX)
    make_index(str(path / INDEX))
    return str(path)

  def write(data: bytes):
    def make(p: str):
      with open(p, "wb") as f:
        f.write(data)
    return make

  def sparse(p: str):
    with open(p, "wb") as f:
      f.truncate(batch_family.MAX_INDEX_BYTES + 1)

  cases = {
      "missing": lambda p: None, "empty": write(b""), "half": write(data[:len(data) // 2]),
      "text": write(b"not a table\n" * 10), "fifo": os.mkfifo, "directory": os.mkdir,
      "too big": sparse, "link to /dev/zero": lambda p: os.symlink("/dev/zero", p),
  }
  found = {}
  reader = threading.Thread(target=lambda: found.update(
      {what: batch_family.family(module_with(make)) for what, make in cases.items()}))
  reader.start()
  reader.join(timeout=60)
  assert not reader.is_alive(), "reading the family blocked"
  assert found == {what: "unknown" for what in cases}
  assert batch_family.family(None) == batch_family.family(str(tmp_path / "no")) == "unknown"
