"""The options of a conversion: one dataclass, no TensorFlow.

    options = ConvertOptions(signature="image_classification", verify=False)
    convert.convert(src, dst, options)          # or convert.convert(src, dst, verify=False)
    batch.run_batch(sources, dst_root, options=options)

The CLI builds one `ConvertOptions` from its flags (a flag and a field share
their name) and passes it on: to the conversion worker, to `batch`, to each
Beam element. Library callers give it, or `convert`'s keywords, which build it.

A field marked `fingerprint=True` changes the output or what verification
proves. A batch records those fields' values with each module
(`fingerprint`); a rerun skips a module only if they are equal
(`matches_fingerprint`). A record made before a field existed matches that
field's `recorded_before` value (by default, its default: the behaviour
before the field). So adding an option is: a field here (marked if it
changes the output or what is proven), one line in `cli.py`'s parser, and
the code that uses it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional

from migrate import errors

FORMAT_SAVEDMODEL = "savedmodel"
FORMAT_KERAS = "keras"
FORMATS = (FORMAT_SAVEDMODEL, FORMAT_KERAS)
_DEFAULT = object()  # `recorded_before`: the field's default.


def _option(default: Any, *, fingerprint: bool = False,
            recorded_before: Any = _DEFAULT) -> Any:
  return dataclasses.field(default=default, metadata={
      "fingerprint": fingerprint,
      "recorded_before": default if recorded_before is _DEFAULT else recorded_before})


# GiB: more is no limit the kernel can hold (a PiB).
MAX_MEMORY_LIMIT_GIB = 2**20


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
  """How to convert a module (every field has the CLI flag of its name)."""

  # What `__call__` computes (plan.make_plan).
  signature: Optional[str] = _option(None, fingerprint=True)
  output_key: Optional[str] = _option(None, fingerprint=True)
  keep_output_dropout: bool = _option(False, fingerprint=True)
  # FORMAT_SAVEDMODEL or FORMAT_KERAS; None: by DST's name (`.keras`), and
  # for a batch a SavedModel per module. Records before the field: SavedModels.
  output_format: Optional[str] = _option(None, fingerprint=True,
                                         recorded_before=FORMAT_SAVEDMODEL)
  # What is proven: verification on (before DST appears), the scan's
  # allowlist, the Keras backends of a `.keras` output (None: every one
  # installed), the consumers run on the output ("default" or "all").
  verify: bool = _option(True, fingerprint=True)
  allow_unsafe_ops: bool = _option(False, fingerprint=True)
  keras_backends: Optional[tuple[str, ...]] = _option(None, fingerprint=True)
  consumers: str = _option("default", fingerprint=True)
  # How the work is done; the output is the same either way.
  overwrite: bool = _option(False)  # Replace an existing DST.
  keep_failed: bool = _option(False)  # Keep a failing model at DST.failed-parity.
  # The TF1 side of verification in a child process during the conversion
  # (None: for modules big enough to gain from it; a batch: never).
  parallel_verify: Optional[bool] = _option(None)
  # Limits of the process the work runs in (the CLI's worker, each batch
  # worker); `convert` itself, running in the caller's process, has none.
  # Seconds per module; None: `preflight.default_timeout` of its size; 0: none.
  timeout: Optional[float] = _option(None)
  # GiB of data segment per TensorFlow process; None: a share of the
  # machine's memory (`isolation.default_memory_limit`); 0: none.
  memory_limit: Optional[float] = _option(None)

  def __post_init__(self):
    if self.keras_backends is not None and not isinstance(self.keras_backends, tuple):
      object.__setattr__(self, "keras_backends", tuple(self.keras_backends))
    for name, most in (("timeout", math.inf), ("memory_limit", MAX_MEMORY_LIMIT_GIB)):
      value = getattr(self, name)
      if value is not None and not (0 <= value <= most and math.isfinite(value)):
        upto = "" if most == math.inf else f" to {most}"
        raise errors.UsageError(f"{name}: expected a finite number from 0"
                                f"{upto}, found {value!r}")

  def replace(self, **changes: Any) -> "ConvertOptions":
    """A copy with `changes` (unknown names: TypeError, as for a keyword)."""
    return dataclasses.replace(self, **changes) if changes else self

  def memory_limit_bytes(self, processes: int) -> Optional[int]:
    """`memory_limit` in bytes for each of `processes` TensorFlow processes
    running at once (None: no limit)."""
    from migrate import isolation  # pylint: disable=g-import-not-at-top
    if self.memory_limit is None:
      return isolation.default_memory_limit(processes)
    return int(self.memory_limit * 2**30) or None


def build(options: Optional[ConvertOptions] = None, **keywords: Any) -> ConvertOptions:
  """`options` (default: the defaults) with `keywords` applied."""
  return (options or ConvertOptions()).replace(**keywords)


def fingerprint(options: ConvertOptions) -> dict[str, Any]:
  """The marked fields' values, as JSON stores them (a batch's record)."""
  return json.loads(json.dumps({
      f.name: getattr(options, f.name) for f in dataclasses.fields(options)
      if f.metadata.get("fingerprint")}))


def matches_fingerprint(options: ConvertOptions, recorded: dict[str, Any]) -> bool:
  """Whether a module recorded with `recorded` was made as `options` would
  make it: every marked field equal (absent ones: `recorded_before`)."""
  before = {f.name: f.metadata.get("recorded_before")
            for f in dataclasses.fields(options)}
  return all(recorded.get(name, json.loads(json.dumps(before[name]))) == value
             for name, value in fingerprint(options).items())
