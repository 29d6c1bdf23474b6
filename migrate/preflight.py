"""Checks that need only the file system (no TensorFlow import).

The CLI runs them in its own process before it starts a worker, so a wrong
path or an existing DST is reported at once instead of after a TensorFlow
import; the stages run them again (they are cheap) and go deeper.
"""

from __future__ import annotations

import os

from migrate import errors
from migrate import fileutil
from migrate import isolation
from migrate import staging

SAVED_MODEL_FILENAME = "saved_model.pb"
SAVED_MODEL_TEXT_FILENAME = "saved_model.pbtxt"
MODULE_DEF_FILENAME = "tfhub_module.pb"
FINGERPRINT_FILENAME = "fingerprint.pb"  # Written by TF2 (>= 2.9) savers only.
CHECKPOINT_PREFIX = os.path.join("variables", "variables")
# When the reference side of verification gets a child process of its own
# (`reference_child_pays`): below this much checkpoint data, the child's
# TensorFlow import costs more than the Session work it takes off the
# verifying process; with one CPU, the two processes could only take turns.
PARALLEL_MIN_BYTES = 4 * 2**20
PARALLEL_MIN_CPUS = 2
# The default time limit per module (CLI and batch; --timeout overrides it):
# 10 minutes, plus 6 s per MiB of module. Generous: a full-size ResNet-v2-50
# (100 MiB) converts and verifies in about 14 s on 2 cores, so its limit of
# 20 minutes is 80 times that; yet a module that hangs (a graph that loops
# forever) ends with exit code 12 instead of holding a batch slot for good.
DEFAULT_TIMEOUT_SECONDS = 600.0
DEFAULT_TIMEOUT_SECONDS_PER_MIB = 6.0


def default_timeout(module_bytes: int) -> float:
  """Seconds the work on a module of `module_bytes` may take by default."""
  return DEFAULT_TIMEOUT_SECONDS + DEFAULT_TIMEOUT_SECONDS_PER_MIB * module_bytes / 2**20


def check_source(path: str) -> bool:
  """Refuses what the file system alone shows is not a TF1 Hub module.

  Returns whether `tfhub_module.pb` is present; when it is not (and no
  fingerprint says TF2), telling a TF2 SavedModel from a plain TF1 one needs
  parsing `saved_model.pb`: the READ stage's job. Every entry of the module
  must be a regular file or directory inside it (`fileutil.source_files`).
  """
  fileutil.check_utf8(path, "a module path")
  if not os.path.exists(path):
    raise errors.InputNotFoundError(
        f"{path}: expected a TF1 Hub module directory, found nothing (no such "
        f"file or directory)")
  if not os.path.isdir(path):
    raise errors.InputNotFoundError(
        f"{path}: expected a TF1 Hub module directory, found a file")
  has_pb = os.path.isfile(os.path.join(path, SAVED_MODEL_FILENAME))
  has_pbtxt = os.path.isfile(os.path.join(path, SAVED_MODEL_TEXT_FILENAME))
  has_module_def = os.path.isfile(os.path.join(path, MODULE_DEF_FILENAME))
  if not (has_pb or has_pbtxt):
    if not os.listdir(path):
      raise errors.NotAHubModuleError(
          f"{path}: expected a TF1 Hub module, found an empty directory")
    raise errors.NotAHubModuleError(
        f"{path}: expected a TF1 Hub module ({SAVED_MODEL_FILENAME} and "
        f"{MODULE_DEF_FILENAME}), found neither")
  if not has_module_def and os.path.isfile(os.path.join(path, FINGERPRINT_FILENAME)):
    raise_already_tf2(path)
  fileutil.source_files(path)
  return has_module_def


def raise_already_tf2(path: str) -> None:
  raise errors.NotAHubModuleError(
      f"{path}: expected a TF1 Hub module, found a TF2 SavedModel "
      f"(already TF2: load it with hub.load or tf.saved_model.load)")


def check_destination(src: str, dst: str, *, overwrite: bool) -> None:
  """Refuses a DST that exists (without overwrite), is inside SRC, or is unwritable.

  Inside or around SRC is decided by device and inode (`staging.is_within`),
  so another path to the same directory (a symlink, a bind mount) is caught.
  """
  fileutil.check_utf8(dst, "an output path")
  src_real = os.path.realpath(src)
  dst_real = os.path.realpath(dst)
  parent_real = os.path.dirname(os.path.abspath(dst))
  if (dst_real == src_real or dst_real.startswith(src_real + os.sep) or
      staging.is_within(dst, src) or staging.is_within(parent_real, src)):
    raise errors.OutputError(
        f"{dst}: expected an output path outside the input module {src}, "
        f"found it inside (the input is never modified)")
  if src_real.startswith(dst_real + os.sep) or staging.is_within(src, dst):
    raise errors.OutputError(
        f"{dst}: expected an output path that does not contain the input "
        f"module {src}, found it does")
  if os.path.lexists(dst) and not overwrite:
    kind = "directory" if os.path.isdir(dst) else "file"
    raise errors.OutputError(
        f"{dst}: expected a new output path, found an existing {kind} "
        f"(pass --overwrite to replace it)")
  if os.path.lexists(dst):
    staging.check_replaceable(dst, os.lstat(dst))
  parent = os.path.dirname(os.path.abspath(dst))
  if not os.path.isdir(parent):
    raise errors.OutputError(
        f"{dst}: expected an existing parent directory, found no {parent}")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise errors.OutputError(
        f"{dst}: expected a writable parent directory, found {parent} "
        f"not writable")


def check_converted(new: str) -> None:
  """Refuses a NEW (for `verify OLD NEW`) that is not a converted SavedModel,
  or holds anything but regular files and directories inside it."""
  fileutil.check_utf8(new, "a model path")
  if not os.path.isdir(new):
    raise errors.InputNotFoundError(
        f"{new}: expected a converted SavedModel directory, found "
        f"{'a file' if os.path.exists(new) else 'nothing'}")
  if not os.path.isfile(os.path.join(new, SAVED_MODEL_FILENAME)):
    raise errors.NotAHubModuleError(
        f"{new}: expected a converted SavedModel (saved_model.pb), found none")
  if os.path.isfile(os.path.join(new, MODULE_DEF_FILENAME)):
    raise errors.NotAHubModuleError(
        f"{new}: expected a converted SavedModel, found a TF1 Hub module "
        f"({MODULE_DEF_FILENAME}); convert it first")
  fileutil.source_files(new)


def checkpoint_bytes(prefix: str) -> int:
  """Bytes of the checkpoint files at `prefix` (0 if there are none)."""
  folder, name = os.path.split(prefix)
  try:
    return sum(os.path.getsize(os.path.join(folder, f))
               for f in os.listdir(folder) if f.startswith(name + "."))
  except OSError:
    return 0


def reference_child_pays(checkpoint_prefix: str) -> bool:
  """Whether the reference side of verification should get its own child
  process: at least `PARALLEL_MIN_CPUS` usable CPUs and `PARALLEL_MIN_BYTES`
  of checkpoint at `checkpoint_prefix`."""
  return (isolation.usable_cpus() >= PARALLEL_MIN_CPUS and
          checkpoint_bytes(checkpoint_prefix) >= PARALLEL_MIN_BYTES)
