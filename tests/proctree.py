"""A process and its descendants, read from /proc (Linux): for the tests that
kill the CLI or a batch and check that no process outlives it, and for
tools/memory.py, which measures the tree."""

from __future__ import annotations

import os


def children(pid: int) -> list[int]:
  """The children of every thread of `pid` (a batch starts its workers from
  threads), in pid order; [] once it is gone."""
  found = set()
  try:
    tasks = os.listdir(f"/proc/{pid}/task")
  except OSError:
    return []
  for task in tasks:
    try:
      with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
        found.update(int(c) for c in f.read().split())
    except OSError:
      pass
  return sorted(found)


def descendants(pid: int) -> list[int]:
  result, todo = [], [pid]
  while todo:
    for child in children(todo.pop()):
      result.append(child)
      todo.append(child)
  return result


def cmdline(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read().replace(b"\0", b" ").decode(errors="replace")
  except OSError:
    return ""


def alive(pid: int) -> bool:
  """Whether `pid` exists and is not a zombie."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except (OSError, IndexError):
    return False
