"""The one tolerance table of the parity checks (tests and `verify` alike).

A value passes when `|actual - expected| <= atol * scale + rtol * |expected|`
elementwise (`scale` is 1 unless an entry's reason says otherwise).

An entry may have a variant for modules with a property that needs another
bound: `<entry>_fake_quant` for modules with FakeQuant* ops. `resolve` picks
the entry to use; an entry without a variant applies to every module.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping


@dataclasses.dataclass(frozen=True)
class Tolerance:
  rtol: float
  atol: float
  reason: str


TOLERANCES: Mapping[str, Tolerance] = {
    "variables": Tolerance(
        0.0, 0.0, "copied from the module's checkpoint: bit for bit"),
    "inference": Tolerance(
        1e-5, 1e-5, "same graph, same kernels, same process (CPU): only "
        "grappler/oneDNN fusion differences between Session and tf.function"),
    "training_output": Tolerance(
        1e-5, 1e-5, "same kernels; batch statistics in training mode add one "
        "reduction whose order may differ"),
    "training_output_fake_quant": Tolerance(
        1e-5, 2e-2, "a FakeQuant* op rounds to a grid (0.015 apart on "
        "mobilenet_quantops' output): an ulp upstream moves a value to the "
        "next grid point. Op determinism does not remove every such ulp "
        "(the same graph in two processes gave 4 of 96 values one step apart, "
        "likely buffer alignment choosing another vectorized path); atol is "
        "one grid step"),
    "inference_fake_quant": Tolerance(
        1e-5, 2e-2, "as training_output_fake_quant"),
    "moving_averages": Tolerance(
        1e-5, 1e-6, "one update step: old*(1-m) + batch_stat*m; tiny updates"),
    "moving_averages_fake_quant": Tolerance(
        1e-5, 1e-4, "a FakeQuant grid step flipped upstream (see "
        "training_output_fake_quant) moves a batch mean by step/N: seen "
        "5.2e-6 on a mobilenet_quantops moving average within one verify"),
    "regularization": Tolerance(
        1e-5, 1e-7, "a sum of a few l2 losses; summation order may differ"),
    "gradients": Tolerance(
        1e-3, 1e-4, "backprop reduction order differs; atol is relative to the "
        "largest gradient entry (scale), since gradients that are zero in exact "
        "arithmetic (biases before batch norm) are only numerically small"),
    "gradient_norms": Tolerance(
        1e-4, 1e-5, "L2 norms of the gradients; atol relative to the largest "
        "norm (scale), for the same reason as 'gradients'"),
    "gradients_fake_quant": Tolerance(
        2e-2, 2e-2, "through FakeQuant* ops the gradient is masked to the clip range: an "
        "activation within an ulp of a range edge (summation order of an "
        "upstream kernel) flips its mask, changing the gradient by a discrete "
        "step; seen as 0.14% on one bias norm of mobilenet_quantops. That "
        "case was run-to-run nondeterminism of threaded reductions, now "
        "removed by op determinism during verify(); the two sides' kernels "
        "may still differ by an ulp"),
    "gradient_norms_fake_quant": Tolerance(
        1e-2, 1e-3, "L2 norms of 'gradients_fake_quant', same reason"),
    # The converted model as its users load it (consumers.py): saved_model_cli
    # and TF Serving's loader run the serving graph in a Session, the Keras
    # layers call the restored functions, each with Grappler on (remapper
    # fusions such as Conv2D+BiasAdd+Relu, constant folding), as in
    # production; verification's own runs keep it off. Other fusions sum in
    # other orders: an error is still orders of magnitude beyond this.
    # atol is relative to each output's largest value (at least 1): a sum in
    # another order errs by a fraction of the largest terms, not of the
    # element compared.
    "consumer_loader": Tolerance(
        1e-4, 1e-4, "Grappler-optimized graphs: the full-size ResNet-v2-50 "
        "differed from the TF1 Session by up to 3.8e-4 on logits of -2.3 (of "
        "2e-5 of the largest logit), NASNet-A Mobile by 2.7 on features of "
        "1.2e5 and 0.8 on one of 4.5e3 (2e-5 of the largest); the fixtures by "
        "<= 1e-5"),
    "consumer_loader_fake_quant": Tolerance(
        1e-4, 8e-3, "as consumer_loader, and a FakeQuant grid step: at most "
        "2/255 of the largest value (see training_output_fake_quant)"),
    "consumer_tflite": Tolerance(
        1e-3, 1e-3, "TFLite runs other kernels (XNNPACK) on a converted graph "
        "(batch norm folded into the convolutions): ResNet-v2-50 at 224x224 "
        "differed from the TF graph by up to 7.3e-4 (1.0e-4 relative) on "
        "pooled features of magnitude ~7 and 1.3e-4 on block2 activations near "
        "0.04; the fixtures by <= 3e-6. Covers the goldens' TF 2.15 kernels too"),
    "consumer_tflite_fake_quant": Tolerance(
        1e-3, 2e-2, "as consumer_tflite, and a FakeQuant grid step (see "
        "training_output_fake_quant)"),
    # The native Keras model (keras_verify), on each backend: other kernels
    # (XLA on CPU for JAX, ATen for PyTorch, Keras's unfused batch norm on
    # TensorFlow) than the TF1 Session's, summing in other orders. The
    # baseline: two TF1 Sessions of ResNet-v2-50 (random weights, non-trivial
    # batch-norm statistics) differing only in their convolution kernels
    # (oneDNN on/off). atol is relative to the largest expected value (scale).
    "keras_inference": Tolerance(
        1e-4, 1e-5, "other kernels: the baseline differs by 7e-7 of the "
        "largest output (features up to 2e3), the Keras model by up to 8e-7"),
    "keras_training_output": Tolerance(
        1e-3, 2e-3, "as keras_inference, with batch statistics (Keras's "
        "keras.ops.moments, not TF's fused batch norm): on ResNet-v2-50 the "
        "baseline and the Keras model differ by 5.4e-5 and 5.5e-5 of the "
        "largest output; on Inception-v3 the Keras model by 3e-4 absolute"),
    "keras_gradients": Tolerance(
        1e-2, 1e-1, "per entry, gradients through 50 to 94 batch-norm layers "
        "in training mode on a batch of 2 are ill-conditioned: the baseline "
        "differs by up to 1.5% of the largest entry (ResNet-v2-50's conv1), "
        "the Keras model by 1.9% (ResNet-v2-50, MobileNet-v2) and 6% "
        "(Inception-v3's first convolutions); this check catches gross "
        "errors, keras_gradient_norms is the finer one"),
    "keras_gradient_norms": Tolerance(
        1e-2, 1e-3, "L2 norm per variable: the baseline's weights differ by up "
        "to 0.31%, the Keras model's by up to 0.36% (MobileNet-v2); atol, "
        "relative to the largest norm, covers biases before batch norm, whose "
        "exact gradient is zero"),
    "top_k": Tolerance(
        0.0, 1e-5, "identical top-k indices, except where the reference's "
        "k-th and (k+1)-th scores tie within this atol"),
    "golden_inference": Tolerance(
        1e-4, 1e-4, "goldens were recorded by hub.Module on TF 2.15 without "
        "oneDNN; TF 2.21 kernels (oneDNN on) differ in rounding"),
    "golden_training": Tolerance(
        1e-4, 1e-4, "as golden_inference, with batch statistics"),
    "golden_inference_fake_quant": Tolerance(
        1e-4, 2e-2, "as training_output_fake_quant: one FakeQuant grid step"),
    "golden_training_fake_quant": Tolerance(
        1e-4, 2e-2, "as training_output_fake_quant: one FakeQuant grid step"),
    "golden_moving_averages": Tolerance(
        1e-4, 1e-5, "as golden_inference, one moving-average update"),
    "golden_moving_averages_fake_quant": Tolerance(
        1e-4, 1e-4, "as moving_averages_fake_quant"),
    "golden_regularization": Tolerance(
        1e-5, 1e-6, "a sum of l2 losses of the same weights"),
    "golden_gradient_norms": Tolerance(
        1e-3, 1e-4, "as golden_inference, through backprop; atol relative to the "
        "largest norm (scale)"),
    "golden_gradient_norms_fake_quant": Tolerance(
        1e-2, 1e-3, "as gradients_fake_quant: TF 2.15's kernels (goldens) and "
        "TF 2.21's may differ by an ulp, which FakeQuant* ops can turn into a "
        "discrete step"),
}


def get(name: str) -> Tolerance:
  """The entry `name`; a KeyError names the known entries."""
  try:
    return TOLERANCES[name]
  except KeyError:
    raise KeyError(f"no tolerance '{name}' (known: "
                   f"{', '.join(sorted(TOLERANCES))})") from None


# The variants an entry may have: `<entry>_<variant>`, used by `resolve`.
VARIANTS = ("fake_quant",)


def resolve(name: str, *, fake_quant: bool = False) -> str:
  """The entry to use for `name`: its `_fake_quant` variant for a module with
  FakeQuant* ops if the table has one, else `name` (a KeyError if neither)."""
  get(name)
  if fake_quant and f"{name}_fake_quant" in TOLERANCES:
    return f"{name}_fake_quant"
  return name
