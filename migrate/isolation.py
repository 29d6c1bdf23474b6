"""Run work in a child process, so that a TensorFlow crash costs only that work.

Malformed graphs can abort or crash TensorFlow's C++ side (CHECK failures,
segfaults); a hang or a memory blow-up is possible too. `run_isolated` runs a
picklable function in a fresh `spawn`ed process (never `fork` after
TensorFlow is loaded), returns its result or re-raises its
`MigrationError`, and turns a death by signal or a timeout into a
`WorkerCrashedError` / `WorkerTimeoutError` with one clear line. The child
dies with its parent (PR_SET_PDEATHSIG), so killing the CLI leaves no orphan
still writing; its temporary directory is cleaned by the next run.

`memory_limit` caps each child's data segment (`RLIMIT_DATA`, set before it
imports TensorFlow; its own children inherit it): a runaway graph then fails
an allocation (TensorFlow's ResourceExhausted, Python's MemoryError, or a
crash near the limit) instead of exhausting the machine, and the caller gets
a `ResourceLimitError`. RLIMIT_DATA rather than RLIMIT_AS: TensorFlow
reserves gigabytes of address space it never touches (2.2 GB of VmSize for
0.55 GB of data converting inception_v3_tiny), while its tensors are all
data-segment allocations.

`prestart(module)` spawns a child that imports `module` at once and then
waits: the next `start_isolated` of a function of that module runs there
instead of in a fresh child. A worker converting to a Keras 3 model
prestarts the verification's reference child before it imports TensorFlow
itself (`run_isolated(prestart=...)`), so the two imports overlap; otherwise
the child's import is paid while the worker waits.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib
import resource
import multiprocessing
from multiprocessing import util as _mp_util  # pylint: disable=unused-import  # Its exit hook, before ours.
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional, Union

from migrate import errors

_PR_SET_PDEATHSIG = 1
# How a crash message ends; a caller that finds the work did land replaces it.
NOTHING_WRITTEN = "; nothing was written"
_STDERR_SWAP = threading.Lock()
# Prestarted children by module name: (process, duplex connection), unused.
_PRESTARTED: dict[str, list[tuple[Any, Any]]] = {}
# Reusable children not yet cancelled. Each waits for more work until it is
# killed, and at exit multiprocessing joins every non-daemonic child: without
# `_stop_reusable` (registered after multiprocessing's hook, so run before it)
# a process that forgot one would hang on exit.
_REUSABLE: set[Any] = set()
# A child that dies with its data segment this close to its limit is taken
# to have run out of memory (an allocation failure in C++ can abort it).
_NEAR_LIMIT = 0.85
_POLL_SECONDS = 0.25


def total_memory() -> int:
  """Physical memory of the machine, in bytes (0 if unknown)."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return 0


def default_memory_limit(processes: int) -> Optional[int]:
  """Bytes each of `processes` concurrent TensorFlow processes may use: 3/4
  of physical memory shared among them, and at least 2 GiB (None if the
  machine's memory is unknown)."""
  total = total_memory()
  if not total:
    return None
  return max(2 << 30, total * 3 // 4 // max(1, processes))


def _limit_memory(limit: Optional[int]) -> None:
  if not limit:
    return
  try:
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
      limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
  except (ValueError, OSError):
    pass  # Not permitted here: run without the limit.


def _data_bytes(pid: int) -> int:
  """The data segment (VmData) of process `pid`, in bytes (0 if unknown)."""
  try:
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith("VmData:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return 0


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


def usable_cpus() -> int:
  """CPUs this process may run on (its affinity mask, else the machine's)."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except (AttributeError, OSError):
    return max(1, os.cpu_count() or 1)


def _resolve(target: Union[str, Callable[..., Any]]) -> Callable[..., Any]:
  if callable(target):
    return target
  module_name, _, attr = target.partition(":")
  return getattr(importlib.import_module(module_name), attr)


def _run(work: bytes) -> tuple[str, Any]:
  """One unit of work: ("ok", result), ("error", MigrationError) or ("bug", ...)."""
  try:
    fn, args, kwargs = pickle.loads(work)
    return ("ok", _resolve(fn)(*args, **kwargs))
  except errors.MigrationError as e:
    return ("error", e)
  except MemoryError:
    limit = resource.getrlimit(resource.RLIMIT_DATA)[0]
    return ("oom", None if limit == resource.RLIM_INFINITY else limit)
  except BaseException as e:  # pylint: disable=broad-except
    return ("bug", (type(e).__name__, str(e), traceback.format_exc()))


def _reply(conn, work: bytes) -> None:
  try:
    conn.send(_run(work))
  except Exception as e:  # pylint: disable=broad-except
    conn.send(("bug", (type(e).__name__, str(e), traceback.format_exc())))


def _child(conn, parent_pid: int, work: Optional[bytes],
           preload: Optional[str] = None, prestart_modules: tuple[str, ...] = (),
           quiet: bool = True, memory_limit: Optional[int] = None) -> None:
  # The work is unpickled only here, after PR_SET_PDEATHSIG: unpickling a
  # callable imports its module (TensorFlow: seconds), and a parent killed
  # during that time would leave an orphan that goes on to write DST.
  _die_with_parent()
  if os.getppid() != parent_pid:
    os._exit(70)  # The parent is already gone: do nothing.
  _limit_memory(memory_limit)
  # The parent decides about interrupts: it kills this process and cleans up
  # after it, so a Ctrl-C sent to the whole terminal group must not make this
  # one unwind half-way (and report a bug) meanwhile; nor a hang-up, nor a
  # Ctrl-\ (whose default would also dump a core file into the directory).
  for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(signum, signal.SIG_IGN)
  try:
    for module_name in prestart_modules:  # Before this process imports TensorFlow.
      prestart(module_name, quiet=quiet)
    if work is not None:  # One call, on a one-way pipe.
      _reply(conn, work)
      return
    # Reusable: import `preload` now, then run calls until the pipe closes.
    if preload:
      try:
        importlib.import_module(preload)
      except BaseException:  # pylint: disable=broad-except
        pass  # The first call imports it again and reports what fails.
    while True:
      try:
        work = conn.recv_bytes()
      except EOFError:
        return  # No more work.
      _reply(conn, work)
  finally:
    stop_prestarted()
    conn.close()


def _signal_name(code: int) -> str:
  try:
    return signal.Signals(-code).name
  except ValueError:
    return f"signal {-code}"


class IsolatedCall:
  """Work started by `start_isolated`: `result()` waits for it, `cancel()` stops it.

  In a reusable child (`start_isolated(reusable=True)`, `prestart`), the child
  waits for more work after replying: `submit` sends it the next call, and
  the caller stops it with `cancel()` when done.
  """

  def __init__(self, process, conn, what: str, reusable: bool = False,
               memory_limit: Optional[int] = None):
    self._process = process
    self._conn = conn
    self._what = what
    self._reusable = reusable
    self._replied = False
    self._memory_limit = memory_limit
    self._peak_data = 0  # Largest data segment seen while waiting.

  def _wait(self, timeout: Optional[float]) -> bool:
    """Waits for the reply (True) or the timeout (False), watching the
    child's data segment meanwhile."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
      step = _POLL_SECONDS
      if deadline is not None:
        step = min(step, max(0.0, deadline - time.monotonic()))
      if self._conn.poll(step):
        return True
      if self._memory_limit and self._process.pid:
        self._peak_data = max(self._peak_data, _data_bytes(self._process.pid))
      if deadline is not None and time.monotonic() >= deadline:
        return False

  def _died(self) -> errors.MigrationError:
    code = self._process.exitcode
    how = (f"was killed by {_signal_name(code)}" if code is not None and code < 0
           else f"exited with code {code}")
    limit = self._memory_limit
    if limit and self._peak_data >= _NEAR_LIMIT * limit:
      return errors.ResourceLimitError(
          f"{self._what}: expected the work to fit in the memory limit of "
          f"{limit / 2**30:.1f} GiB per process, found TensorFlow at "
          f"{self._peak_data / 2**30:.1f} GiB when it {how} (raise it with "
          f"--memory_limit){NOTHING_WRITTEN}")
    return errors.WorkerCrashedError(
        f"{self._what}: TensorFlow {how} while processing this module (a "
        f"malformed graph can abort it){NOTHING_WRITTEN}")

  def ready(self) -> bool:
    """Whether `result()` would return without waiting."""
    try:
      return self._replied or self._conn.poll(0)
    except (OSError, ValueError):  # Closed: result() raises at once.
      return True

  def result(self, timeout: Optional[float] = None) -> Any:
    """The work's result; raises as `run_isolated` documents."""
    process, conn, what = self._process, self._conn, self._what
    try:
      if not self._wait(timeout):
        process.kill()
        process.join()
        raise errors.WorkerTimeoutError(
            f"{what}: expected the conversion to finish within {timeout:g} s, "
            f"found it still running; stopped it{NOTHING_WRITTEN}")
      try:
        status, payload = conn.recv()
      except EOFError:
        process.join()
        raise self._died() from None
      if not self._reusable:
        process.join()
    except BaseException:
      self.cancel()
      raise
    finally:
      if not self._reusable:
        conn.close()
    self._replied = True
    if status == "ok":
      return payload
    if status == "error":
      raise payload
    if status == "oom":
      shown = f" of {payload / 2**30:.1f} GiB per process" if payload else ""
      raise errors.ResourceLimitError(
          f"{what}: expected the work to fit in the memory limit{shown}, "
          f"found Python out of memory (MemoryError; raise it with "
          f"--memory_limit){NOTHING_WRITTEN}")
    name, message, trace = payload
    raise errors.InternalError(
        f"{what}: internal error ({name}: {errors.first_line(message)})",
        traceback_text=trace)

  def submit(self, fn: Union[str, Callable[..., Any]], *args: Any, what: str,
             **kwargs: Any) -> "IsolatedCall":
    """Runs `fn(*args, **kwargs)` next in the same (reusable) child, once this
    call's result was taken."""
    if not (self._reusable and self._replied):
      raise ValueError("submit needs a reusable child whose result was taken")
    try:
      self._conn.send_bytes(pickle.dumps((fn, args, kwargs)))
    except (OSError, ValueError):
      self.cancel()
      raise errors.WorkerCrashedError(
          f"{what}: the worker process is gone{NOTHING_WRITTEN}") from None
    return IsolatedCall(self._process, self._conn, what, reusable=True,
                        memory_limit=self._memory_limit)

  def cancel(self) -> None:
    """Kills the child if it still runs (its result is dropped)."""
    if self._process.is_alive():
      self._process.kill()
    self._process.join()
    self._conn.close()
    _REUSABLE.discard(self._process)


def _spawn(conn, work: Optional[bytes], quiet: bool, **child_kwargs: Any):
  ctx = multiprocessing.get_context("spawn")
  # Not a daemon: a daemonic process may not start children, and a worker
  # starts some (the C API loader's, a Keras output's reference side). The child dies with
  # this process all the same (PR_SET_PDEATHSIG), and every path through
  # `IsolatedCall` joins or kills it.
  process = ctx.Process(target=_child, args=(conn, os.getpid(), work),
                        kwargs=dict(child_kwargs, quiet=quiet), daemon=False)
  if quiet:
    _start_with_quiet_stderr(process)
  else:
    process.start()
  return process


def _spawn_reusable(preload: Optional[str], quiet: bool,
                    memory_limit: Optional[int] = None):
  ctx = multiprocessing.get_context("spawn")
  parent_conn, child_conn = ctx.Pipe(duplex=True)
  process = _spawn(child_conn, None, quiet, preload=preload,
                   memory_limit=memory_limit)
  child_conn.close()
  _REUSABLE.add(process)
  return process, parent_conn


@atexit.register
def _stop_reusable() -> None:
  stop_prestarted()
  for process in list(_REUSABLE):
    if process.is_alive():
      process.kill()
    process.join()
  _REUSABLE.clear()


def prestart(module_name: str, *, quiet: bool = True) -> int:
  """Spawns a reusable child that imports `module_name` now and waits.

  The next `start_isolated` of a function of `module_name` ("module:function")
  runs in it. Returns its pid. `stop_prestarted` stops the unused ones (a
  worker does so when its work ends).
  """
  process, conn = _spawn_reusable(module_name, quiet)
  _PRESTARTED.setdefault(module_name, []).append((process, conn))
  return process.pid


def stop_prestarted() -> None:
  """Kills the prestarted children that got no work."""
  while _PRESTARTED:
    _, waiting = _PRESTARTED.popitem()
    for process, conn in waiting:
      conn.close()
      process.kill()
      process.join()
      _REUSABLE.discard(process)


def _take_prestarted(fn: Union[str, Callable[..., Any]], work: bytes,
                     what: str) -> Optional[IsolatedCall]:
  """Hands `work` to a prestarted child of `fn`'s module, if one is alive."""
  if not isinstance(fn, str):
    return None
  waiting = _PRESTARTED.get(fn.partition(":")[0], [])
  while waiting:
    process, conn = waiting.pop(0)
    try:
      conn.send_bytes(work)
      return IsolatedCall(process, conn, what, reusable=True)
    except OSError:  # It died while importing: use a fresh child.
      conn.close()
      process.kill()
      process.join()
      _REUSABLE.discard(process)
  return None


def start_isolated(fn: Union[str, Callable[..., Any]], *args: Any, what: str,
                   quiet: bool = True, prestart: tuple[str, ...] = (),
                   reusable: bool = False, memory_limit: Optional[int] = None,
                   **kwargs: Any) -> IsolatedCall:
  """Starts `fn(*args, **kwargs)` in a child process; see `run_isolated`.

  A prestarted child of `fn`'s module is used if there is one (it is
  reusable). `reusable=True` keeps the child for `IsolatedCall.submit`.
  `prestart` (see `run_isolated`) applies to one-shot children only.
  """
  if reusable and prestart:
    raise ValueError("prestart applies to one-shot children only")
  work = pickle.dumps((fn, args, kwargs))
  call = _take_prestarted(fn, work, what)
  if call is not None:
    return call
  if reusable:
    process, conn = _spawn_reusable(None, quiet, memory_limit)
    conn.send_bytes(work)
    return IsolatedCall(process, conn, what, reusable=True,
                        memory_limit=memory_limit)
  ctx = multiprocessing.get_context("spawn")
  parent_conn, child_conn = ctx.Pipe(duplex=False)
  process = _spawn(child_conn, work, quiet, prestart_modules=tuple(prestart),
                   memory_limit=memory_limit)
  child_conn.close()
  return IsolatedCall(process, parent_conn, what, memory_limit=memory_limit)


def run_isolated(fn: Union[str, Callable[..., Any]], *args: Any, what: str,
                 timeout: Optional[float] = None, quiet: bool = True,
                 prestart: tuple[str, ...] = (),
                 memory_limit: Optional[int] = None, **kwargs: Any) -> Any:
  """Runs `fn(*args, **kwargs)` in a child process and returns its result.

  `fn` is a picklable callable, or "package.module:function", imported only
  in the child (the parent then never loads TensorFlow).
  `what` names the work in error messages (e.g. the module path). Raises the
  child's `MigrationError`, `WorkerCrashedError` if the child died (signal or
  exit without a result), `WorkerTimeoutError` after `timeout` seconds, and
  `errors.InternalError` for a bug in the child (with its traceback text).
  The child first `prestart`s a child for each module in `prestart`.
  `memory_limit` (bytes) caps the child's data segment; running out raises
  `ResourceLimitError`.
  """
  call = start_isolated(fn, *args, what=what, quiet=quiet, prestart=prestart,
                        memory_limit=memory_limit, **kwargs)
  try:
    return call.result(timeout)
  finally:
    call.cancel()  # A prestarted (reusable) child would wait for more.
