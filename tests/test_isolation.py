"""Child processes (migrate.isolation): prestarted and reusable children.

Light targets (`os`, `json`, `migrate.preflight`) keep these fast: the
mechanism is the same for the TensorFlow-importing ones.
"""

from __future__ import annotations

import os
import time

import pytest

from migrate import errors
from migrate import isolation


def _gone(pid: int, wait: float = 10.0) -> bool:
  end = time.monotonic() + wait
  while time.monotonic() < end:
    try:
      with open(f"/proc/{pid}/stat") as f:
        if f.read().split(")")[-1].split()[0] == "Z":
          return True
    except OSError:
      return True
    time.sleep(0.05)
  return False


def prestarted() -> dict[str, list[int]]:
  """What this process has prestarted (run in a worker by the test below)."""
  return {m: [p.pid for p, _ in waiting]
          for m, waiting in isolation._PRESTARTED.items()}  # pylint: disable=protected-access


def test_a_prestarted_child_runs_the_next_call_of_its_module():
  pid = isolation.prestart("os")
  assert isolation.run_isolated("os:getpid", what="test") == pid
  assert _gone(pid), "run_isolated left the prestarted child waiting"
  # Used once: the next call gets a fresh child.
  assert isolation.run_isolated("os:getpid", what="test") not in (pid, os.getpid())


def test_a_prestarted_child_is_not_used_for_another_module():
  pid = isolation.prestart("json")
  try:
    assert isolation.run_isolated("os:getpid", what="test") != pid
  finally:
    isolation.stop_prestarted()
  assert _gone(pid)


def test_unused_prestarted_children_are_stopped():
  pids = [isolation.prestart("json"), isolation.prestart("os")]
  isolation.stop_prestarted()
  assert all(_gone(p) for p in pids)


def test_a_worker_prestarts_before_its_work_and_stops_what_it_did_not_use():
  seen = isolation.run_isolated("tests.test_isolation:prestarted", what="test",
                                prestart=("json",))
  assert list(seen) == ["json"] and len(seen["json"]) == 1
  assert _gone(seen["json"][0]), "the worker's unused child outlived it"


def test_a_reusable_child_runs_calls_in_order_and_survives_their_errors():
  call = isolation.start_isolated("os:getpid", what="test", reusable=True)
  try:
    with pytest.raises(ValueError):
      call.submit("os:getpid", what="test")  # Its result was not taken yet.
    pid = call.result()
    failing = call.submit("migrate.preflight:check_source", "/nonexistent/module",
                          what="test")
    with pytest.raises(errors.InputNotFoundError):
      failing.result()
    assert failing.submit("os:getpid", what="test").result() == pid
  finally:
    call.cancel()
  assert _gone(pid)


def test_a_reusable_child_that_dies_is_a_worker_crash():
  call = isolation.start_isolated("os:getpid", what="test", reusable=True)
  pid = call.result()
  with pytest.raises(errors.WorkerCrashedError, match="SIGABRT"):
    call.submit("os:abort", what="test").result()
  assert _gone(pid)


def test_ready_says_whether_result_would_wait():
  call = isolation.start_isolated("time:sleep", 0.5, what="test", reusable=True)
  try:
    assert not call.ready()
    assert call.result() is None
    assert call.ready()
  finally:
    call.cancel()


def test_the_reference_child_gets_its_own_process_only_when_it_pays(
    tmp_path, monkeypatch):
  from migrate import preflight  # pylint: disable=g-import-not-at-top
  prefix = str(tmp_path / "variables" / "variables")
  os.makedirs(os.path.dirname(prefix))
  with open(prefix + ".index", "wb") as f:
    f.write(b"x" * 100)
  with open(prefix + ".data-00000-of-00001", "wb") as f:
    f.truncate(preflight.PARALLEL_MIN_BYTES)  # Sparse: no disk used.
  with open(str(tmp_path / "variables" / "other"), "wb") as f:
    f.write(b"x" * 100)  # Not the checkpoint's.
  assert preflight.checkpoint_bytes(prefix) == preflight.PARALLEL_MIN_BYTES + 100
  assert preflight.checkpoint_bytes(str(tmp_path / "none" / "variables")) == 0
  monkeypatch.setattr(isolation, "usable_cpus", lambda: 2)
  assert preflight.reference_child_pays(prefix)
  monkeypatch.setattr(isolation, "usable_cpus", lambda: 1)
  assert not preflight.reference_child_pays(prefix)
  monkeypatch.setattr(isolation, "usable_cpus", lambda: 2)
  with open(prefix + ".data-00000-of-00001", "wb") as f:
    f.truncate(preflight.PARALLEL_MIN_BYTES // 2)
  assert not preflight.reference_child_pays(prefix)


@pytest.mark.parametrize("leftover", [
    "isolation.prestart('json')",
    "isolation.start_isolated('os:getpid', what='t', reusable=True).result()",
])
def test_a_process_that_leaves_a_reusable_child_still_exits(leftover):
  # The child would wait for more work, and multiprocessing joins
  # non-daemonic children at exit.
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  run = subprocess.run(
      [sys.executable, "-c", f"from migrate import isolation; {leftover}"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      timeout=60, capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr
