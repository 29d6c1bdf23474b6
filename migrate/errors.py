"""Errors a user can cause, each with its documented exit code.

This is the only place exit codes are defined. The CLI catches `MigrationError`
at its boundary and prints `str(error)` as one line; everything else that
escapes is a bug (exit code `INTERNAL`). A message often quotes text from the
module (node names, signature keys) or a path: `printable` escapes what could
break the line or drive the terminal, and `str()` of every `MigrationError`
applies it, so an error is always one line.
"""

from __future__ import annotations

import enum
import signal
from typing import Optional, Union

# Lines of TensorFlow's error text that say where, not what: its
# "Graph execution error:" header, the node it was detected at, the
# "in user code:" of a traced function, and the stack trace (indented) that
# follows them.
_HEADER_PREFIXES = ("Graph execution error", "Detected at node", "Node:",
                    "Original stack trace for", "in user code:", "<stack traces",
                    "File ", "Hint:", "[[", "Stack trace", "(most recent call")


class ExitCode(enum.IntEnum):
  """Exit codes of `migrate-hub-module`, documented in the README."""

  OK = 0
  INTERNAL = 1  # A bug in this tool; the line says where to report it.
  USAGE = 2  # Wrong command line, or options that contradict each other.
  NOT_FOUND = 3  # SRC does not exist or is not a directory/archive.
  NOT_A_HUB_MODULE = 4  # SRC is a TF2 SavedModel or a plain TF1 SavedModel.
  UNSUPPORTED = 5  # A TF1 Hub module we cannot convert (text module, ...).
  CORRUPT = 6  # A file of SRC is truncated, garbled or inconsistent.
  OUTPUT = 7  # DST exists, lies inside SRC, or cannot be written.
  UNSAFE_OPS = 8  # The module's graphs contain ops that reach outside.
  PARITY = 9  # The converted model does not compute what the module did.
  BATCH_FAILURES = 10  # A batch finished, but some modules failed.
  CRASHED = 11  # TensorFlow died (abort, segfault) on this module.
  TIMEOUT = 12  # The work on this module exceeded --timeout.
  RESOURCES = 13  # The work ran out of memory (the worker's limit, or TensorFlow's).
  INTERRUPTED = 128 + signal.SIGINT  # 130: Ctrl-C (SIGINT), as shells report it.
  TERMINATED = 128 + signal.SIGTERM  # 143: SIGTERM, as shells report it.
  HUNG_UP = 128 + signal.SIGHUP  # 129: the terminal went away (SIGHUP).
  QUIT = 128 + signal.SIGQUIT  # 131: Ctrl-\ (SIGQUIT).


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
  """`text` as one safe terminal line: every character that is not printable
  (newlines, ANSI escape sequences, bidirectional overrides, other control
  and format characters) written as a Python escape (`\\n`, `\\x1b`,
  `\\u202e`), and bytes that are not UTF-8 (surrogate-escaped in file names)
  as `\\xff`. Printable text is returned unchanged, so applying it twice is
  harmless."""
  if text.isprintable():
    return text
  out = []
  for c in text:
    if c.isprintable():
      out.append(c)
      continue
    code = ord(c)
    if c in _NAMED_ESCAPES:
      out.append(_NAMED_ESCAPES[c])
    elif 0xDC80 <= code <= 0xDCFF:  # A byte that is not UTF-8 (surrogateescape).
      out.append(f"\\x{code - 0xDC00:02x}")
    elif code < 0x100:
      out.append(f"\\x{code:02x}")
    elif code < 0x10000:
      out.append(f"\\u{code:04x}")
    else:
      out.append(f"\\U{code:08x}")
  return "".join(out)


class MigrationError(Exception):
  """Base class: a failure the user can act on, printed as one line."""

  exit_code: ExitCode = ExitCode.INTERNAL

  def __str__(self) -> str:
    return printable(super().__str__())


class UsageError(MigrationError):
  """Arguments or options that contradict each other (a usage error)."""

  exit_code = ExitCode.USAGE


class InputNotFoundError(MigrationError):
  exit_code = ExitCode.NOT_FOUND


class NotAHubModuleError(MigrationError):
  exit_code = ExitCode.NOT_A_HUB_MODULE


class UnsupportedModuleError(MigrationError):
  exit_code = ExitCode.UNSUPPORTED


class CorruptModuleError(MigrationError):
  exit_code = ExitCode.CORRUPT


class OutputError(MigrationError):
  exit_code = ExitCode.OUTPUT


class UnsafeOpsError(MigrationError):
  exit_code = ExitCode.UNSAFE_OPS


class ParityError(MigrationError):
  """The converted model fails parity; carries the report for the CLI."""

  exit_code = ExitCode.PARITY

  def __init__(self, message: str, table: str = "", report_json: str = ""):
    super().__init__(message)
    self.table = table
    self.report_json = report_json

  def __reduce__(self):
    return (type(self), (str(self), self.table, self.report_json))


class WorkerCrashedError(MigrationError):
  exit_code = ExitCode.CRASHED


class WorkerTimeoutError(MigrationError):
  exit_code = ExitCode.TIMEOUT


class ResourceLimitError(MigrationError):
  """The work ran out of memory: the worker's limit, or TensorFlow's allocator."""

  exit_code = ExitCode.RESOURCES


class InterruptedByUser(MigrationError):
  """Ctrl-C (SIGINT); the message says whether DST is complete."""

  exit_code = ExitCode.INTERRUPTED


class TerminatedBySignal(MigrationError):
  """SIGTERM; the message says whether DST is complete."""

  exit_code = ExitCode.TERMINATED


class HungUp(TerminatedBySignal):
  """SIGHUP (the terminal closed), handled as SIGTERM."""

  exit_code = ExitCode.HUNG_UP


class Quit(TerminatedBySignal):
  """SIGQUIT (Ctrl-\\), handled as SIGTERM."""

  exit_code = ExitCode.QUIT


class InternalError(MigrationError):
  """A bug in this tool, raised in a child process; carries its traceback."""

  exit_code = ExitCode.INTERNAL

  def __init__(self, message: str, traceback_text: str = ""):
    super().__init__(message)
    self.traceback_text = traceback_text

  def __reduce__(self):
    return (type(self), (str(self), self.traceback_text))


def first_line(error: Union[BaseException, str], *,
               limit: Optional[int] = 300) -> str:
  """The cause of `error` (an exception or its text) as one line.

  That is the first line of its text that is not one of TensorFlow's header
  lines (`Graph execution error:`, `Detected at node ...`, the indented
  stack trace after it): for an op that failed while a graph ran, the
  kernel's own message. If every other line is indented (a traced
  function's "in user code:" and its stack), the last one. At most `limit`
  characters (None: no limit); the exception's type name if it has no text.
  """
  text = str(error).strip()
  lines = [l for l in text.splitlines() if l.strip()]
  causes = [l for l in lines
            if not l[0].isspace() and not l.startswith(_HEADER_PREFIXES)]
  indented = [l for l in lines if l[0].isspace()]
  line = (causes[:1] or indented[-1:] or lines[:1] or [""])[0].strip()
  if not line:
    line = type(error).__name__ if isinstance(error, BaseException) else ""
  return line[:limit] if limit is not None else line
