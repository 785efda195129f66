"""Width solver and the searches that make a file meet a byte budget or a PSNR target.

Budget in parameters = (original bytes / ratio - overhead bytes) / bytes per parameter. The count
is quadratic in the width H, so H alone moves it in steps of about 2·(layers)·H; the width T of
the last sine layer (count linear in T) fills the rest. The solver searches every (H, T).

The coded size of trained, quantised, entropy-coded weights is known only after training, so
`fit_to_budget` solves with an upper bound of the bytes per parameter (packed codes: the coder
never stores more), then re-solves with the measured bytes per parameter and keeps the best file
that fits. Each attempt's encoder fills the bytes its widths leave (rate control of the code
levels, `codec.encode_to_budget`), so one training already lands within a few bytes of the
budget; a re-solve trades those finer codes for more parameters. `search_psnr` bisects the ratio (log scale) for the smallest file reaching a PSNR.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, TypeVar

import ml_collections
import numpy as np

from moe_jax.inr.model import num_params

Trial = TypeVar("Trial", bound=tuple)  # what an attempt returns: (file bytes, report, ...)


def param_budget(original_bytes: int, ratio: float, bytes_per_param: float,
                 overhead_bytes: int) -> int:
  """Parameters that fit `original_bytes / ratio` bytes after `overhead_bytes`."""
  if not ratio > 1:
    raise ValueError(f"--ratio={ratio} must be > 1 (original bytes / compressed bytes)")
  return int((original_bytes / ratio - overhead_bytes) // bytes_per_param)


def _with_widths(c: ml_collections.ConfigDict, width: int, tail: int) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(c.to_dict())
  out.width, out.tail_width = width, tail
  return out


def _count_polynomial(c: ml_collections.ConfigDict, in_dim: int) -> np.ndarray:
  """Integer coefficients of count(H, T) = a H^2 + b H T + c H + d T + e (exact: every kernel
  and bias is H x H, H x T, H, T or fixed), fitted to 6 abstract builds."""
  points = [(1, 1), (2, 1), (1, 2), (2, 2), (3, 1), (3, 3)]
  basis = np.array([[w * w, w * t, w, t, 1] for w, t in points], np.float64)
  counts = np.array([num_params(_with_widths(c, w, t), in_dim) for w, t in points], np.float64)
  return np.rint(np.linalg.lstsq(basis, counts, rcond=None)[0]).astype(np.int64)


def solve_widths(c: ml_collections.ConfigDict, in_dim: int,
                 budget: int) -> ml_collections.ConfigDict:
  """A copy of model config `c` with (width H, tail_width T), T in [H/2, 2H] (no narrow
  bottleneck), maximising the parameter count under `budget` (ties: larger H). A budget below
  the smallest model (H = T = 1) gives the smallest model: the caller warns that the ratio is
  not met (`fit_to_budget`)."""
  a, b, c1, d, e = _count_polynomial(c, in_dim)
  widths = np.arange(1, int(np.sqrt(max(budget, 1) / max(a, 1))) + 2)
  w, t = np.meshgrid(widths, np.arange(1, 2 * widths[-1] + 1), indexing="ij")
  counts = a * w * w + b * w * t + c1 * w + d * t + e
  ok = (counts <= budget) & (2 * t >= w) & (t <= 2 * w)
  if not ok.any():
    ok = ((counts <= budget) & (t == 1)) if (counts <= budget).any() else (w == 1) & (t == 1)
  score = np.where(ok, counts * (w.size + 1) + w, -1)  # most params, then widest
  i = np.unravel_index(np.argmax(score), score.shape)
  out = _with_widths(c, int(w[i]), int(t[i]))
  if num_params(out, in_dim) != counts[i]:
    raise RuntimeError(f"width solver: parameter count of {c.kind} is not the fitted polynomial")
  return out


def fit_to_budget(attempt: Callable[[float], Trial], max_bytes: float, bytes_per_param: float,
                  trials: int, log: Callable[[str], None] | None = None) -> Trial:
  """The best file of at most `max_bytes` from up to `trials` attempts.

  `attempt(bytes_per_param)` solves the widths for that many bytes per parameter, trains and
  codes; its report holds `psnr`, `num_params` and `base_param_bytes` (coded parameter bytes at
  the bits the widths were solved for, before rate control). The first attempt uses
  `bytes_per_param` (an upper bound), each next one the bytes per parameter the previous file
  measured at those bits. Best = highest PSNR among the files that fit. When none fits (the
  smallest model is over the budget) it warns with the ratio reached and returns the smallest.
  """
  if trials < 1:
    raise ValueError(f"budget_trials={trials} must be >= 1")
  results, bpp = [], bytes_per_param
  for i in range(trials):
    results.append(attempt(bpp))
    blob, report = results[-1][:2]
    measured = report["base_param_bytes"] / max(report["num_params"], 1)
    if log is not None:
      log(f"budget trial {i + 1}/{trials}: {len(blob)} bytes (budget {int(max_bytes)}), "
          f"{report['num_params']} params at {measured:.3f} B/param, psnr {report['psnr']:.2f}")
    if math.isclose(measured, bpp, rel_tol=1e-3) and len(blob) <= max_bytes:
      break  # re-solving would give the same widths
    if len(blob) > max_bytes and report["width"] == report["tail_width"] == 1:
      break  # already the smallest model
    bpp = measured if len(blob) <= max_bytes else measured * len(blob) / max_bytes
  fitting = [r for r in results if len(r[0]) <= max_bytes]
  if fitting:
    best = max(fitting, key=lambda r: r[1]["psnr"])
  else:
    best = min(results, key=lambda r: len(r[0]))
    smallest = best[1]["width"] == best[1]["tail_width"] == 1
    warnings.warn(
        f"the target ratio cannot be met: the smallest file is {len(best[0])} bytes, over the "
        f"{int(max_bytes)}-byte budget (ratio {best[1]['ratio_actual']:.1f} instead of "
        f"{best[1]['ratio_target']:g}; "
        + ("the widths cannot fall below H = T = 1: lower the ratio or use a smaller model)"
           if smallest else f"after {len(results)} trials: raise budget_trials)"), stacklevel=2)
  best[1]["budget_trials"] = len(results)
  return best


def search_psnr(attempt: Callable[[float], Trial], target_db: float, min_ratio: float,
                max_ratio: float, trials: int, log: Callable[[str], None] | None = None) -> Trial:
  """The smallest file reaching `target_db` PSNR from `trials` attempts at ratios bisected in log
  scale between `min_ratio` and `max_ratio` (`attempt(ratio)` compresses at that ratio). When no
  attempt reaches the target it warns and returns the highest-PSNR file."""
  if not 1 < min_ratio < max_ratio or trials < 1:
    raise ValueError(f"psnr_search: need 1 < min_ratio ({min_ratio}) < max_ratio ({max_ratio}) "
                     f"and trials ({trials}) >= 1")
  lo, hi, results = math.log(min_ratio), math.log(max_ratio), []
  for i in range(trials):
    ratio = math.exp((lo + hi) / 2)
    results.append(attempt(ratio))
    blob, report = results[-1][:2]
    reached = report["psnr"] >= target_db
    if log is not None:
      log(f"psnr trial {i + 1}/{trials}: ratio {ratio:.4g} -> {len(blob)} bytes, psnr "
          f"{report['psnr']:.2f} dB ({'meets' if reached else 'below'} {target_db:g})")
    lo, hi = (math.log(ratio), hi) if reached else (lo, math.log(ratio))
  meeting = [r for r in results if r[1]["psnr"] >= target_db]
  if meeting:
    best = min(meeting, key=lambda r: len(r[0]))
  else:
    best = max(results, key=lambda r: r[1]["psnr"])
    warnings.warn(f"PSNR target {target_db:g} dB not reached in {trials} trials between ratios "
                  f"{min_ratio:g} and {max_ratio:g}: the best file reaches {best[1]['psnr']:.2f} "
                  f"dB at ratio {best[1]['ratio_actual']:.1f} (lower psnr_search.min_ratio or "
                  "train longer)", stacklevel=2)
  best[1].update(psnr_target=target_db, psnr_trials=len(results))
  return best
