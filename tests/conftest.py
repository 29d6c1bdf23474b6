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
