"""Killing a conversion never leaves a partial model (issue #6).

The CLI (or its worker process) is sent SIGKILL at seeded random moments over
a conversion of the smallest fixture. After each kill DST is either absent or
a complete model (loadable; the first one seen must pass `verify`), no process
of the killed run survives, and a later run cleans the temporary directories
the kills left and succeeds.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest

from tests import bad_inputs as bi
from tests import proctree

FIXTURE = "inference_only_asset"  # 64 KB, the smallest image module.
SEED = 6
TRIALS = 12


def _worker(pid: int):
  """The spawned conversion worker of CLI process `pid` (not the resource tracker)."""
  for child in proctree.children(pid):
    line = proctree.cmdline(child)
    if "spawn_main" in line and "resource_tracker" not in line:
      return child
  return None


def _check_dst(dst: str) -> str:
  """'absent' or 'complete'; fails on anything partial."""
  if not os.path.lexists(dst):
    return "absent"
  names = sorted(os.listdir(dst))
  for required in ("saved_model.pb", "variables", "MODEL_CARD.md", "assets"):
    assert required in names, f"partial DST {dst}: {names}"
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  obj = tf.saved_model.load(dst)
  assert obj(tf.zeros([2, 32, 32, 3])).shape == (2, 10)
  return "complete"


def test_sigkill_at_random_moments_leaves_dst_absent_or_complete(tmp_path):
  src = bi.copy_fixture(FIXTURE, str(tmp_path / "src"))
  digest = bi.tree_digest(src)
  dst = str(tmp_path / "out")
  # Calibrate: how long one whole run takes on this machine now.
  calibration = bi.run_cli([src, str(tmp_path / "calibration")])
  assert calibration.returncode == 0, calibration.describe()
  rng = random.Random(SEED)
  # Spread over a run: worker start-up, READ/BUILD, EXPORT, VERIFY, commit.
  delays = sorted(rng.uniform(0.2, calibration.seconds) for _ in range(TRIALS))
  outcomes = []
  verified_once = False
  start_all = time.monotonic()
  for i, delay in enumerate(delays):
    target = "cli" if i % 2 == 0 else "worker"
    proc = subprocess.Popen(bi.cli_command([src, dst]), cwd=bi.REPO,
                            env=bi.cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + delay
    worker = None
    while time.monotonic() < deadline and proc.poll() is None:
      worker = _worker(proc.pid) or worker
      time.sleep(0.05)
    killed = "nothing (finished first)"
    family = proctree.descendants(proc.pid)
    if proc.poll() is None:
      if target == "worker" and _worker(proc.pid):
        os.kill(_worker(proc.pid), signal.SIGKILL)
        killed = "worker"
      else:
        os.kill(proc.pid, signal.SIGKILL)
        killed = "cli"
    out, err = proc.communicate(timeout=120)
    # No process of the run survives it (the worker dies with the CLI).
    end = time.monotonic() + 10
    while any(proctree.alive(p) for p in family) and time.monotonic() < end:
      time.sleep(0.1)
    survivors = [p for p in family if proctree.alive(p)]
    assert not survivors, [(p, proctree.cmdline(p)) for p in survivors]
    state = _check_dst(dst)
    if killed == "worker" and proc.returncode == 0:
      killed = "worker (after it had sent its result)"
      assert state == "complete"
    elif killed == "worker":
      assert proc.returncode == 11, (proc.returncode, err)
      lines = err.splitlines()
      assert len(lines) == 1 and "killed by SIGKILL" in lines[0], err
      if state == "complete":  # Killed between the rename and the summary.
        killed = "worker (after it had moved DST into place)"
        assert "already been moved into place" in lines[0], err
      else:
        assert "nothing was written" in lines[0], err
      # The CLI outlived its worker: it removed what the worker staged.
      assert not bi.leftovers_beside(dst), bi.leftovers_beside(dst)
    elif killed == "nothing (finished first)":
      assert proc.returncode == 0, err
    assert "Traceback" not in out + err
    outcomes.append((round(delay, 2), killed, state))
    if state == "complete":
      if not verified_once:
        run = bi.run_cli(["verify", src, dst])
        assert run.returncode == 0 and "PASSED" in run.stdout, run.describe()
        verified_once = True
      subprocess.run(["rm", "-rf", dst], check=True)
    assert bi.tree_digest(src) == digest, "SRC modified"
  print(f"one run: {calibration.seconds:.1f}s; kill outcomes (delay s, killed, "
        f"DST): {outcomes}",
        f"in {time.monotonic() - start_all:.0f}s")
  assert any(k != "nothing (finished first)" for _, k, _ in outcomes)

  # The next run cleans what the kills left, and succeeds.
  run = bi.run_cli([src, dst, "--noverify"])
  assert run.returncode == 0, run.describe()
  assert _check_dst(dst) == "complete"
  assert not bi.leftovers_beside(dst), bi.leftovers_beside(dst)
  assert bi.tree_digest(src) == digest


def test_killed_during_worker_start_leaves_no_orphan(tmp_path):
  """The worker imports TensorFlow for seconds; the CLI killed then must not
  leave it to convert and write DST later."""
  src = bi.copy_fixture(FIXTURE, str(tmp_path / "src"))
  dst = str(tmp_path / "out")
  proc = subprocess.Popen(bi.cli_command([src, dst]), cwd=bi.REPO,
                          env=bi.cli_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  end = time.monotonic() + 30
  while _worker(proc.pid) is None and time.monotonic() < end:
    time.sleep(0.01)
  worker = _worker(proc.pid)
  if worker is None:
    pytest.skip("the worker did not start")
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  end = time.monotonic() + 30
  while proctree.alive(worker) and time.monotonic() < end:
    time.sleep(0.1)
  assert not proctree.alive(worker), "the worker outlived the killed CLI"
  time.sleep(1)
  assert not os.path.lexists(dst)


def _run_until(args, parent: str, trigger: str, signum: int, to_group: bool):
  """Runs the CLI; when `trigger` shows ("staged": a staging directory beside
  DST, "dst": DST itself), sends `signum`; returns (returncode, stderr)."""
  proc = subprocess.Popen(bi.cli_command(args), cwd=bi.REPO, env=bi.cli_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)
  dst = args[1]
  while proc.poll() is None:
    names = os.listdir(parent)
    if trigger == "staged" and any(".migrate-tmp-" in n for n in names):
      break
    if trigger == "dst" and os.path.exists(dst):
      break
    time.sleep(0.01)
  family = set(proctree.descendants(proc.pid))
  if proc.poll() is None:
    if to_group:  # Ctrl-C on a terminal reaches the whole process group.
      os.killpg(proc.pid, signum)
    else:
      os.kill(proc.pid, signum)
  _, err = proc.communicate(timeout=300)
  family_gone = time.monotonic() + 10
  while time.monotonic() < family_gone and any(proctree.alive(p) for p in family):
    time.sleep(0.1)
  assert not [p for p in family if proctree.alive(p)], "a process outlived the CLI"
  return proc.returncode, err


def test_interrupts_say_whether_dst_is_complete_and_leave_nothing(tmp_path):
  """Ctrl-C (to the process group) and SIGTERM (to the CLI), once the model
  is staged and once DST has appeared, and SIGHUP (to the group) once it is
  staged: exit 130/143/129 with one line that says the truth, and no staged
  directory beside DST."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  src = bi.copy_fixture(FIXTURE, str(tmp_path / "src"))
  digest = bi.tree_digest(src)
  scenarios = [(trigger, signum) for trigger in ("staged", "dst")
               for signum in (signal.SIGINT, signal.SIGTERM)]
  scenarios.append(("staged", signal.SIGHUP))  # The terminal closed.

  def one(scenario):
    trigger, signum = scenario
    parent = tmp_path / f"{trigger}_{signum}"
    parent.mkdir()
    dst = str(parent / "out")
    code, err = _run_until([src, dst], str(parent), trigger, signum,
                           to_group=signum != signal.SIGTERM)
    return dst, code, err
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    results = list(pool.map(one, scenarios))
  for (trigger, signum), (dst, code, err) in zip(scenarios, results):
    info = f"{trigger} {signal.Signals(signum).name}: rc={code} {err!r}"
    assert not bi.leftovers_beside(dst), info
    assert "Traceback" not in err, info
    state = _check_dst(dst)
    if code == 0:  # It finished before the signal.
      assert trigger == "dst" and state == "complete", info
      continue
    assert code == 128 + signum, info
    lines = err.splitlines()
    assert len(lines) == 1 and src in lines[0], info
    assert ("interrupted (Ctrl-C)" if signum == signal.SIGINT
            else f"terminated ({signal.Signals(signum).name})") in lines[0], info
    if state == "complete":
      assert f"{dst} is complete and verified" in lines[0], info
    else:
      assert lines[0].endswith("nothing was written"), info
  assert any(code != 0 for _, code, _ in results)
  assert bi.tree_digest(src) == digest


def test_a_parent_swapped_mid_run_gets_nothing_and_src_is_untouched(tmp_path):
  """Once the model is being staged, DST's parent is renamed and a symlink to
  SRC put in its place: nothing may land in SRC (or anywhere), exit 7."""
  src = bi.copy_fixture(FIXTURE, str(tmp_path / "src"))
  digest = bi.tree_digest(src)
  parent = tmp_path / "parent"
  parent.mkdir()
  dst = str(parent / "out")
  proc = subprocess.Popen(bi.cli_command([src, dst]), cwd=bi.REPO,
                          env=bi.cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  while proc.poll() is None:
    if any(".migrate-tmp-" in n for n in os.listdir(parent)):
      break
    time.sleep(0.002)
  assert proc.poll() is None, "the run ended before it staged anything"
  os.rename(parent, tmp_path / "moved")
  os.symlink(src, parent)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 7, err
  lines = err.splitlines()
  assert len(lines) == 1 and "replaced or moved during the run" in lines[0], err
  assert bi.tree_digest(src) == digest
  assert os.listdir(tmp_path / "moved") == []
