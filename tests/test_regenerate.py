"""The fixture generator rebuilds the committed corpus (issue: foundation).

Runs `legacy_fixtures/generate.py --check` in the legacy environment (TF
2.15.1, tensorflow-hub 0.15.0, tf-slim 1.1.0): every module is regenerated in
a temporary directory with `hub.Module(...).export` and every golden value
re-recorded by `hub.Module`, then compared with the committed files. `.ci/run`
builds that environment (legacy_fixtures/setup_legacy_env.sh) and points
LEGACY_VENV at it.
"""

import os
import subprocess

import pytest

from tests.conftest import REPO, fixture_names

LEGACY_VENV = os.environ.get("LEGACY_VENV", os.path.join(REPO, ".legacy-venv"))
LEGACY_PYTHON = os.path.join(LEGACY_VENV, "bin", "python")


@pytest.mark.skipif(
    not os.path.exists(LEGACY_PYTHON),
    reason="no legacy environment: run legacy_fixtures/setup_legacy_env.sh "
           "(.ci/run does) or set LEGACY_VENV")
def test_generator_reproduces_every_committed_fixture():
  proc = subprocess.run(
      [LEGACY_PYTHON, os.path.join(REPO, "legacy_fixtures", "generate.py"), "--check"],
      cwd=REPO, capture_output=True, text=True, timeout=1200, check=False)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  for name in fixture_names():
    assert f"OK   {name}" in proc.stdout, f"{name} was not checked:\n{proc.stdout[-3000:]}"
