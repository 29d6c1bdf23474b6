"""Run work in a child process, so that a TensorFlow crash costs only that work.

Malformed graphs can abort or crash TensorFlow's C++ side (CHECK failures,
segfaults); a hang or a memory blow-up is possible too. `run_isolated` runs a
picklable function in a fresh `spawn`ed process (never `fork` after
TensorFlow is loaded), returns its result or re-raises its
`MigrationError`, and turns a death by signal or a timeout into a
`WorkerCrashedError` / `WorkerTimeoutError` with one clear line. The child
dies with its parent (PR_SET_PDEATHSIG), so killing the CLI leaves no orphan
still writing; its temporary directory is cleaned by the next run.
"""

from __future__ import annotations

import ctypes
import importlib
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import traceback
from typing import Any, Callable, Optional, Union

from migrate import errors

_PR_SET_PDEATHSIG = 1
# How a crash message ends; a caller that finds the work did land replaces it.
NOTHING_WRITTEN = "; nothing was written"
_STDERR_SWAP = threading.Lock()


def _die_with_parent() -> None:
  try:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  except (OSError, AttributeError):
    pass  # Not Linux: the child may outlive a killed parent.


def _start_with_quiet_stderr(process) -> None:
  """Starts `process` with fd 2 on /dev/null.

  The spawned child imports TensorFlow while unpickling its target, before
  any of its own code runs; its C++ start-up chatter would bury the one line
  the CLI prints. Its errors come back through the pipe instead. fd 2 is
  process-wide, so concurrent starts (batch threads) take turns.
  """
  with _STDERR_SWAP:
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
      os.dup2(devnull, 2)
      process.start()
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      os.close(devnull)


def _resolve(target: Union[str, Callable[..., Any]]) -> Callable[..., Any]:
  if callable(target):
    return target
  module_name, _, attr = target.partition(":")
  return getattr(importlib.import_module(module_name), attr)


def _child(conn, parent_pid: int, work: bytes) -> None:
  # The work is unpickled only here, after PR_SET_PDEATHSIG: unpickling a
  # callable imports its module (TensorFlow: seconds), and a parent killed
  # during that time would leave an orphan that goes on to write DST.
  _die_with_parent()
  if os.getppid() != parent_pid:
    os._exit(70)  # The parent is already gone: do nothing.
  try:
    fn, args, kwargs = pickle.loads(work)
    result = _resolve(fn)(*args, **kwargs)
    conn.send(("ok", result))
  except errors.MigrationError as e:
    conn.send(("error", e))
  except BaseException as e:  # pylint: disable=broad-except
    conn.send(("bug", (type(e).__name__, str(e), traceback.format_exc())))
  finally:
    conn.close()


def _signal_name(code: int) -> str:
  try:
    return signal.Signals(-code).name
  except ValueError:
    return f"signal {-code}"


class IsolatedCall:
  """Work started by `start_isolated`: `result()` waits for it, `cancel()` stops it."""

  def __init__(self, process, conn, what: str):
    self._process = process
    self._conn = conn
    self._what = what

  def result(self, timeout: Optional[float] = None) -> Any:
    """The work's result; raises as `run_isolated` documents."""
    process, conn, what = self._process, self._conn, self._what
    try:
      ready = conn.poll(timeout)
      if not ready:
        process.kill()
        process.join()
        raise errors.WorkerTimeoutError(
            f"{what}: expected the conversion to finish within {timeout:g} s, "
            f"found it still running; stopped it (nothing was written)")
      try:
        status, payload = conn.recv()
      except EOFError:
        process.join()
        code = process.exitcode
        how = (f"was killed by {_signal_name(code)}" if code is not None and code < 0
               else f"exited with code {code}")
        raise errors.WorkerCrashedError(
            f"{what}: TensorFlow {how} while processing this module (a malformed "
            f"graph can abort it){NOTHING_WRITTEN}") from None
      process.join()
    except BaseException:
      self.cancel()
      raise
    finally:
      conn.close()
    if status == "ok":
      return payload
    if status == "error":
      raise payload
    name, message, trace = payload
    raise errors.InternalError(f"{what}: internal error ({name}: "
                               f"{message.strip().splitlines()[0][:300] if message.strip() else ''})",
                               traceback_text=trace)

  def cancel(self) -> None:
    """Kills the child if it still runs (its result is dropped)."""
    if self._process.is_alive():
      self._process.kill()
    self._process.join()
    self._conn.close()


def start_isolated(fn: Union[str, Callable[..., Any]], *args: Any, what: str,
                   quiet: bool = True, **kwargs: Any) -> IsolatedCall:
  """Starts `fn(*args, **kwargs)` in a child process; see `run_isolated`."""
  ctx = multiprocessing.get_context("spawn")
  parent_conn, child_conn = ctx.Pipe(duplex=False)
  work = pickle.dumps((fn, args, kwargs))
  # Not a daemon: a daemonic process may not start children, and a worker
  # starts one for the reference side of verification. The child dies with
  # this process all the same (PR_SET_PDEATHSIG), and every path through
  # `IsolatedCall` joins or kills it.
  process = ctx.Process(target=_child, args=(child_conn, os.getpid(), work),
                        daemon=False)
  if quiet:
    _start_with_quiet_stderr(process)
  else:
    process.start()
  child_conn.close()
  return IsolatedCall(process, parent_conn, what)


def run_isolated(fn: Union[str, Callable[..., Any]], *args: Any, what: str,
                 timeout: Optional[float] = None, quiet: bool = True,
                 **kwargs: Any) -> Any:
  """Runs `fn(*args, **kwargs)` in a child process and returns its result.

  `fn` is a picklable callable, or "package.module:function", imported only
  in the child (the parent then never loads TensorFlow).
  `what` names the work in error messages (e.g. the module path). Raises the
  child's `MigrationError`, `WorkerCrashedError` if the child died (signal or
  exit without a result), `WorkerTimeoutError` after `timeout` seconds, and
  `errors.InternalError` for a bug in the child (with its traceback text).
  """
  return start_isolated(fn, *args, what=what, quiet=quiet, **kwargs).result(
      timeout)
