"""Shared test fixtures: the legacy corpus, its goldens, cached conversions."""

from __future__ import annotations

import json
import os
import sys

# The goldens were recorded with oneDNN off; the same kernels give identical
# numbers. Must be set before TensorFlow is imported.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "legacy_fixtures")
MODULES = os.path.join(FIXTURES, "modules")
GOLDENS = os.path.join(FIXTURES, "goldens")

if REPO not in sys.path:
  sys.path.insert(0, REPO)


def module_path(name: str) -> str:
  return os.path.join(MODULES, name)


def fixture_names() -> list[str]:
  return sorted(n for n in os.listdir(MODULES)
                if os.path.isdir(os.path.join(MODULES, n)))


def convertible_fixture_names() -> list[str]:
  return [n for n in fixture_names() if not golden_meta(n).get("expect_refusal")]


# The family (`migrate.batch_family`) of each committed fixture: the root
# scope of its variables, as the builders in legacy_fixtures/generate.py name it.
FIXTURE_FAMILIES = {
    "bn_in_place_mixed": "mixednet",
    "classifier_probabilities": "classifier", "efficientnet_defun_swish": "efficientnet",
    "efficientnet_tf2_swish": "efficientnet", "inception_v2_tiny": "inception_v2",
    "inception_v3_tiny": "inception_v3", "inference_only_asset": "assetnet",
    "mobilenet_quantops": "mobilenet_v1", "mobilenet_v1_bn_hparams": "mobilenet_v1",
    "nasnet_cell_droppath": "nasnet", "refvars_bn": "refnet",
    "resnet_v2_tiny": "resnet_v2", "text_module": "embeddings",
}


def golden_meta(name: str) -> dict:
  with open(os.path.join(GOLDENS, f"{name}.json"), encoding="utf-8") as f:
    return json.load(f)


def golden_arrays(name: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(GOLDENS, f"{name}.npz")) as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def convert_cached(tmp_path_factory):
  """convert_cached(name, **options) -> path of the converted model (made once)."""
  from migrate import convert  # pylint: disable=g-import-not-at-top
  cache: dict = {}

  def get(name: str, **options) -> str:
    key = (name, tuple(sorted(options.items())))
    if key not in cache:
      options.setdefault("verify", False)
      dst = tmp_path_factory.mktemp("converted") / name
      cache[key] = (str(dst), convert.convert(module_path(name), str(dst), **options))
    return cache[key][0]

  return get


class Verified:
  """`verify(SRC, DST, consumers="all")` of a converted fixture, run once,
  with every consumer run it made also run on the goldens' inputs (tags
  `golden/<batch>`) in the same load of the model: `report`, and `results`,
  each consumer's full result (None if verify raised: `error`)."""

  GOLDEN = "golden/"

  def __init__(self, name: str, path: str):
    self.name, self.path = name, path
    self.report = None
    self.error = ""
    self.results: dict = {}
    meta, gold = golden_meta(name), golden_arrays(name)
    self.golden_inputs = {
        self.GOLDEN + tag: {"images": gold[f"images/{tag}"],
                            **{k: np.float32(v) for k, v in meta["infer_feeds"].items()}}
        for tag in meta["batches"]}

  def run(self) -> "Verified":
    import dataclasses  # pylint: disable=g-import-not-at-top
    from migrate import consumers  # pylint: disable=g-import-not-at-top
    from migrate import verify  # pylint: disable=g-import-not-at-top

    def recorded(c):
      def run(path, inputs, **kwargs):
        if "signature_tags" in kwargs:
          kwargs["signature_tags"] = {s: list(t) + list(self.golden_inputs)
                                      for s, t in kwargs["signature_tags"].items()}
        result = c.run(path, {**inputs, **self.golden_inputs}, **kwargs)
        self.results[c.name] = result
        return dataclasses.replace(result, outputs={
            k: v for k, v in result.outputs.items() if not k[1].startswith(self.GOLDEN)})
      return dataclasses.replace(c, run=run)

    with pytest.MonkeyPatch.context() as patch:
      for name, c in list(consumers.CONSUMERS.items()):
        patch.setitem(consumers.CONSUMERS, name, recorded(c))
      try:  # In this process: the consumer runs are recorded here.
        self.report = verify.verify(module_path(self.name), self.path,
                                    consumers="all", parallel=False)
      except Exception as e:  # pylint: disable=broad-except  # Reported by the tests.
        self.error = f"{type(e).__name__}: {e}"
    return self

  def result(self, consumer: str):
    """The consumer's recorded result; if verify raised before it ran the
    consumer (a bug the tests report), a run on the goldens' inputs alone."""
    if consumer not in self.results and self.error:
      from migrate import consumers  # pylint: disable=g-import-not-at-top
      self.results[consumer] = consumers.CONSUMERS[consumer].run(
          self.path, self.golden_inputs)
    return self.results[consumer]


@pytest.fixture(scope="session")
def verified_all(convert_cached):
  """verified_all(name) -> `Verified`: verification with every consumer, once."""
  cache: dict[str, Verified] = {}

  def get(name: str) -> Verified:
    if name not in cache:
      cache[name] = Verified(name, convert_cached(name)).run()
    return cache[name]

  return get
