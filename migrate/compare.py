"""The one comparison helper of the parity checks (tests and `verify` alike)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import numpy as np

from migrate import tolerances as tolerances_lib


@dataclasses.dataclass
class CheckResult:
  """One parity check: what was compared, how far apart, and the verdict."""

  name: str
  passed: bool
  max_abs_err: Optional[float] = None
  max_rel_err: Optional[float] = None
  rtol: Optional[float] = None
  atol: Optional[float] = None
  detail: str = ""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def __str__(self) -> str:
    return f"check '{self.name}' {'passed' if self.passed else 'failed'}: {self.detail}"


def _tolerance(tolerance) -> tolerances_lib.Tolerance:
  if isinstance(tolerance, str):
    return tolerances_lib.get(tolerance)
  return tolerance


def compare(name: str, actual: Any, expected: Any,
            tolerance: "tolerances_lib.Tolerance | str", *,
            scale: float = 1.0, check_dtype: bool = True) -> CheckResult:
  """Compares `actual` with `expected`: dtype, shape and values separately.

  Values pass when `|a - e| <= atol * scale + rtol * |e|` everywhere, with NaN
  only where the expected value is NaN too. The detail names what differs
  (dtype, shape, the worst element) so that a failure is actionable.
  """
  tol = _tolerance(tolerance)
  a, e = np.asarray(actual), np.asarray(expected)
  result = CheckResult(name=name, passed=False, rtol=tol.rtol,
                       atol=tol.atol * scale)
  problems = []
  if check_dtype and a.dtype != e.dtype:
    problems.append(f"dtype {a.dtype} != expected {e.dtype}")
  if a.shape != e.shape:
    problems.append(f"shape {list(a.shape)} != expected {list(e.shape)}")
    result.detail = "; ".join(problems)
    return result
  if a.size == 0:
    result.max_abs_err = result.max_rel_err = 0.0
    result.passed = not problems
    result.detail = "; ".join(problems) or "empty"
    return result
  if a.dtype == e.dtype and np.array_equal(a, e):  # Fast path: bit-identical.
    result.max_abs_err = result.max_rel_err = 0.0
    result.passed = not problems
    result.detail = "; ".join(problems) or f"{a.size} values identical"
    return result
  if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) or not (
      np.issubdtype(e.dtype, np.number) or e.dtype == bool):
    equal = np.array_equal(a, e)
    result.max_abs_err = result.max_rel_err = 0.0 if equal else float("inf")
    if not equal:
      problems.append("values differ")
    result.passed = not problems
    result.detail = "; ".join(problems) or "equal"
    return result
  a64, e64 = a.astype(np.float64), e.astype(np.float64)
  nan_a, nan_e = np.isnan(a64), np.isnan(e64)
  if (nan_a != nan_e).any():
    problems.append(f"NaN at {int((nan_a != nan_e).sum())} positions where "
                    f"the other side is not NaN")
  finite = ~(nan_a | nan_e)
  with np.errstate(invalid="ignore", over="ignore"):
    diff = np.where(finite, np.abs(a64 - e64), 0.0)
    same_inf = np.isinf(a64) & (a64 == e64)
    diff = np.where(same_inf, 0.0, diff)
    # An infinity on either side passes only against the same infinity
    # (its bound, rtol * inf, would let anything pass).
    other_inf = finite & (np.isinf(a64) | np.isinf(e64)) & ~same_inf
    diff = np.where(other_inf, np.inf, diff)
    rel = np.where(finite, diff / np.maximum(np.abs(e64), 1e-30), 0.0)
    rel = np.where(other_inf, np.inf, rel)
    bound = tol.atol * scale + tol.rtol * np.abs(e64)
    excess = np.where(other_inf, np.inf, diff - bound)
  result.max_abs_err = float(diff.max())
  result.max_rel_err = float(rel.max())
  bad = finite & ((diff > bound) | other_inf)
  if bad.any():
    worst = np.unravel_index(int(np.argmax(np.where(bad, excess, -1.0))),
                             a.shape)
    problems.append(
        f"{int(bad.sum())} of {a.size} values out of tolerance; worst at "
        f"index {list(map(int, worst))}: {a64[worst]!r} vs expected "
        f"{e64[worst]!r}")
  result.passed = not problems
  result.detail = "; ".join(problems) or f"{a.size} values within tolerance"
  return result


def compare_many(name: str, actual: Mapping[str, Any],
                 expected: Mapping[str, Any],
                 tolerance: "tolerances_lib.Tolerance | str", *,
                 scale: float = 1.0, scale_each: bool = False,
                 check_dtype: bool = True) -> CheckResult:
  """`compare` for named arrays (e.g. per variable), folded into one result.

  Fails when a name is missing on either side; the detail names the worst
  entry and how many entries failed. With `scale_each`, each entry's atol is
  relative to its own largest expected magnitude (outputs of other scales,
  such as logits and pooled features, side by side); the result's `atol` is
  then that relative figure.
  """
  tol = _tolerance(tolerance)
  result = CheckResult(name=name, passed=False, rtol=tol.rtol,
                       atol=tol.atol * scale, max_abs_err=0.0, max_rel_err=0.0)
  missing = sorted(set(expected) - set(actual))
  extra = sorted(set(actual) - set(expected))
  failures = []
  for key in sorted(set(expected) & set(actual)):
    entry_scale = scale
    if scale_each:
      e = np.asarray(expected[key], np.float64)
      finite = np.abs(e[np.isfinite(e)]) if e.size else e
      entry_scale = scale * max(float(finite.max()) if finite.size else 0.0, 1.0)
    r = compare(key, actual[key], expected[key], tol, scale=entry_scale,
                check_dtype=check_dtype)
    result.max_abs_err = max(result.max_abs_err, r.max_abs_err
                             if r.max_abs_err is not None else float("inf"))
    result.max_rel_err = max(result.max_rel_err, r.max_rel_err
                             if r.max_rel_err is not None else float("inf"))
    if not r.passed:
      failures.append(r)
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} (e.g. '{missing[0]}')")
  if extra:
    problems.append(f"unexpected {len(extra)} (e.g. '{extra[0]}')")
  if failures:
    worst = max(failures, key=lambda r: r.max_abs_err
                if r.max_abs_err is not None else float("inf"))
    problems.append(f"{len(failures)} of {len(expected)} differ; worst "
                    f"'{worst.name}': {worst.detail}")
  result.passed = not problems
  result.detail = "; ".join(problems) or f"{len(expected)} entries within tolerance"
  return result


def check(name: str, passed: bool, detail: str) -> CheckResult:
  """A check without numbers (a name exists, a property holds, ...)."""
  return CheckResult(name=name, passed=bool(passed), detail=detail)


def top_k(name: str, actual: Any, expected: Any, k: int,
          tolerance: "tolerances_lib.Tolerance | str" = "top_k") -> CheckResult:
  """Identical top-k class indices per row (order included).

  A difference is accepted only where the expected scores of the swapped
  classes tie within `atol` (a tie has no defined order).
  """
  tol = _tolerance(tolerance)
  a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  result = CheckResult(name=name, passed=False, rtol=tol.rtol, atol=tol.atol)
  if a.shape != e.shape or a.ndim != 2:
    result.detail = f"shape {list(a.shape)} vs expected {list(e.shape)}"
    return result
  k = min(k, e.shape[1])
  bad_rows = []
  for row in range(e.shape[0]):
    ia = np.argsort(-a[row], kind="stable")[:k]
    ie = np.argsort(-e[row], kind="stable")[:k]
    if np.array_equal(ia, ie):
      continue
    # Accept only if every differing position is a tie in the expected scores.
    tied = all(abs(e[row, x] - e[row, y]) <= tol.atol
               for x, y in zip(ia, ie) if x != y)
    if not tied:
      bad_rows.append((row, ia.tolist(), ie.tolist()))
  result.max_abs_err = float(len(bad_rows))
  result.passed = not bad_rows
  if bad_rows:
    row, ia, ie = bad_rows[0]
    result.detail = (f"{len(bad_rows)} of {e.shape[0]} rows differ; row {row}: "
                     f"top-{k} {ia} vs expected {ie}")
  else:
    result.detail = f"top-{k} identical in {e.shape[0]} rows"
  return result
