"""Width solver: the largest network whose parameters fit a byte budget.

Budget in parameters = (original bytes / ratio - header bytes) / bytes per parameter. The count
is quadratic in the width H, so H alone moves it in steps of about 2·(layers)·H; the width T of
the last sine layer (count linear in T) fills the rest. The solver searches every (H, T).
"""
from __future__ import annotations

import ml_collections
import numpy as np

from moe_jax.inr.model import num_params


def param_budget(original_bytes: int, ratio: float, bytes_per_param: int,
                 header_bytes: int) -> int:
  """Parameters that fit `original_bytes / ratio` bytes after the file header."""
  if not ratio > 1:
    raise ValueError(f"--ratio={ratio} must be > 1 (original bytes / compressed bytes)")
  return int((original_bytes / ratio - header_bytes) // bytes_per_param)


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
  bottleneck), maximising the parameter count under `budget` (ties: larger H)."""
  a, b, c1, d, e = _count_polynomial(c, in_dim)
  smallest = a + b + c1 + d + e
  if smallest > budget:
    raise ValueError(
        f"the smallest {c.kind} model has {smallest} parameters but the ratio leaves room for "
        f"{max(budget, 0)}: lower --ratio (or use fewer experts / blocks / depth)")
  widths = np.arange(1, int(np.sqrt(max(budget, 1) / max(a, 1))) + 2)
  w, t = np.meshgrid(widths, np.arange(1, 2 * widths[-1] + 1), indexing="ij")
  counts = a * w * w + b * w * t + c1 * w + d * t + e
  ok = (counts <= budget) & (2 * t >= w) & (t <= 2 * w)
  if not ok.any():
    ok = (counts <= budget) & (t == 1)
  score = np.where(ok, counts * (w.size + 1) + w, -1)  # most params, then widest
  i = np.unravel_index(np.argmax(score), score.shape)
  out = _with_widths(c, int(w[i]), int(t[i]))
  if num_params(out, in_dim) != counts[i]:
    raise RuntimeError(f"width solver: parameter count of {c.kind} is not the fitted polynomial")
  return out
