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


# Fixtures whose verification is the second part of issue 13 (done with the restructured
# verify): what fails today. Tests that need it are marked xfail(strict=True), so that they
# say when it works; remove the entries then.
VERIFICATION_PENDING = {
    "nasnet_cell_droppath":
        "verify: the reference side draws the unseeded random ops under op determinism",
    "efficientnet_tf2_swish":
        "verify: the reference side's tf.gradients raises LookupError on the lost gradient",
    "efficientnet_defun_swish":
        "verify: unseeded random ops; the fed copy (_inline_calls) cannot convert FunctionDefs "
        "that call library functions by op type, and its swish wrappers need "
        "build.library_gradient",
}
FED_COPY_PENDING = ("efficientnet_defun_swish",)


def pending(names, failing=tuple(VERIFICATION_PENDING)) -> list:
  """`names` as pytest params, those in `failing` expected to fail (strictly)."""
  import pytest  # pylint: disable=g-import-not-at-top
  return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=VERIFICATION_PENDING[n]))
          if n in failing else n for n in names]


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
