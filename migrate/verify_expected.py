"""VERIFY, the reference side: the TF1 module in a Session -> `Expected`.

`reference_side(old_path, spec)` runs the module as TF1 did (graph mode,
`migrate.reference`) on the inputs of `verify_spec` and returns what it
computed as plain data: picklable, so it can run in a child process while
the model is being converted. It needs nothing of the converted model.
`verify_actual.Actual` is its mirror for the converted model.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Optional

import numpy as np
import tensorflow as tf

from migrate import legacy_format
from migrate import reference as reference_lib
from migrate import verify_spec
from migrate.verify_spec import Spec


@dataclasses.dataclass
class ExpectedStep:
  """One training step of the TF1 module (see `reference.TrainStepResult`)."""

  error: str = ""  # Why the step could not run ("" if it ran).
  output: Optional[np.ndarray] = None
  random_values: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  variable_names: list[str] = dataclasses.field(default_factory=list)
  changed: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  gradients: Optional[dict[str, np.ndarray]] = None  # The default step only.


@dataclasses.dataclass
class Expected:
  """What the TF1 module computed for a `Spec`: plain data, picklable."""

  spec: Spec
  # Batch tag -> graph tensor -> value: every output of every image signature.
  outputs: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
  output_dropout: str = ""  # The train graph's output dropout node, if any.
  random_ops: list[str] = dataclasses.field(default_factory=list)
  # IdentityN ops of the graph the steps ran whose custom gradient the
  # module's export lost: the gradients are those of their forward computation.
  forward_gradients: list[str] = dataclasses.field(default_factory=list)
  steps: dict[str, ExpectedStep] = dataclasses.field(default_factory=dict)
  regularization: tuple[list[float], float] = dataclasses.field(
      default_factory=lambda: ([], 0.0))  # (each loss, their total)
  # The module's variables (each graph's) as its checkpoint holds them, read
  # when a check asks (`reference.CheckpointValues`).
  variables: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  seconds: float = 0.0


def reference_side(old_path: str, spec: Spec, *,
                   module: Optional[legacy_format.LegacyModule] = None
                   ) -> Expected:
  """Runs the TF1 module at `old_path` (graph mode, Session) for `spec`.

  Needs nothing of the converted model, so it can run before the model
  exists, in another thread or process (`verify.start_reference`, the
  `.keras` path's reference child). The caller may pass the module, already
  read.
  """
  start = time.monotonic()
  module = module or legacy_format.read_module(old_path)
  checkpoint = reference_lib.read_checkpoint(module)
  facts = verify_spec.module_facts(module, spec)
  expected = Expected(spec=spec)
  with verify_spec.deterministic_ops(), reference_lib.ReferenceModule(
      old_path, module=module, checkpoint=checkpoint,
      optimize_graphs=spec.optimize_graphs) as ref:
    sigs = facts.image_signatures
    feeds = {s.images_tensor for s in sigs.values()}
    fetches = {t: t for s in sigs.values() for t in s.outputs.values()}
    for sig in sigs.values():
      for tag in verify_spec.batch_tags(sig.sizes):
        if tag.name not in expected.outputs:
          x = tag.images(spec.seed)
          expected.outputs[tag.name] = ref.infer_tensors(fetches,
                                                         {t: x for t in feeds})
    if facts.train_signature:
      _training(ref, spec, facts, expected)
    expected.regularization = ref.regularization_losses()
  names = set(facts.variables).union(
      *(s.variable_names for s in expected.steps.values()))
  expected.variables = reference_lib.CheckpointValues(
      module.checkpoint_prefix, (n for n in names if n in checkpoint))
  expected.seconds = time.monotonic() - start
  return expected


def _training(ref: reference_lib.ReferenceModule, spec: Spec,
              facts: verify_spec.ModuleFacts, expected: Expected) -> None:
  """The training steps of `verify_spec.train_steps`, into `expected.steps`."""
  sig_name, key = spec.signature, spec.output_key
  match = ref.output_dropout(sig_name, key)
  expected.output_dropout = match.output_node if match else ""
  bypass = bool(spec.output_dropout_removed)
  if bypass and expected.output_dropout != spec.output_dropout_removed:
    return  # The check 'train/output_dropout' fails.
  steps = verify_spec.train_steps(facts)
  x = verify_spec.train_images(spec, facts)
  expected.forward_gradients = list(ref.graph(ref.train_tags()).forward_gradients)
  try:
    expected.random_ops = ref.train_random_ops(sig_name, key,
                                               bypass_output_dropout=bypass)
  except (ValueError, KeyError) as e:
    for prefix, _ in steps:
      expected.steps[prefix] = ExpectedStep(error=verify_spec.error_text(e))
    return
  for prefix, values in steps:
    try:
      r = ref.train_step(
          sig_name, key, x, bypass_output_dropout=bypass, seed=spec.seed,
          feeds_by_tensor={facts.hparam_tensors[n]: np.float32(v)
                           for n, v in values.items()})
    except (TypeError, ValueError, KeyError, tf.errors.OpError) as e:
      expected.steps[prefix] = ExpectedStep(error=verify_spec.error_text(e))
      continue
    finally:
      ref.reset()
    expected.steps[prefix] = ExpectedStep(
        output=r.output, random_values=r.random_values,
        variable_names=sorted(r.variable_names), changed=r.changed,
        gradients=r.gradients if prefix == "train" else None)
