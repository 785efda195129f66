"""Uniform (asymmetric) quantisation of parameter tensors to `bits`-bit codes, as a codec stores
weights: `x ≈ lo + code * step`, `code` in [0, levels], one (lo, step) pair per group. `levels`
is `2^bits - 1` unless the encoder's rate control (`codec`) picks fewer to fit a byte budget; the
decoder needs only `bits` (codes are `< 2^bits`), so `levels` is not stored.

Groups (`granularity`):
- "tensor": one (lo, step) per tensor.
- "channel": one per output channel of each kernel (every index but the input axis -2 of a
  tensor with ndim >= 3, e.g. `[E, in, out]` -> E * out groups); tensors with ndim <= 2 (biases)
  stay per tensor.
Measured on anatomical.nii (bench/RESULTS.md, MoEC section): per-tensor is the default.

`lo` and `step` are stored as float16. They are rounded outward (lo down, step up) so that every
element lies inside `[lo, lo + (2^bits - 1) step]`: the dequantised value is within `step / 2` of
the original (the round-trip bound `tests/test_inr_format.py` checks).
"""
from __future__ import annotations

import dataclasses

import numpy as np

GRANULARITIES = ("tensor", "channel")
BITS = tuple(range(2, 17))  # codes: uint8 up to 8 bits, uint16 above (the file packs or codes them)
_F16_MAX = float(np.finfo(np.float16).max)


@dataclasses.dataclass
class Quantised:
  codes: np.ndarray  # code_dtype(bits), the tensor's shape
  lo: np.ndarray  # float16 [groups]: value of code 0
  step: np.ndarray  # float16 [groups]: value of one code step (>= 0)


def check(bits: int, granularity: str) -> None:
  """ValueError naming the config field for an unsupported setting."""
  if bits not in BITS:
    raise ValueError(f"quant_bits={bits!r}: use one of {BITS} (or 0 for float parameters)")
  if granularity not in GRANULARITIES:
    raise ValueError(f"quant_granularity={granularity!r}: use one of {GRANULARITIES}")


def code_dtype(bits: int) -> np.dtype:
  """uint8 codes up to 8 bits, uint16 above."""
  return np.dtype(np.uint8 if bits <= 8 else np.uint16)


def group_shape(shape: tuple[int, ...], granularity: str) -> tuple[int, ...]:
  """Shape of the (lo, step) arrays of a tensor, broadcastable against it (size 1 = reduced)."""
  if granularity == "channel" and len(shape) >= 3:
    return shape[:-2] + (1,) + shape[-1:]
  return (1,) * len(shape)


def num_groups(shape: tuple[int, ...], granularity: str) -> int:
  return int(np.prod(group_shape(shape, granularity)))


def _outward_f16(x: np.ndarray, up: bool) -> np.ndarray:
  """float16 nearest to `x`, moved one ulp outward where rounding went the wrong way."""
  y = x.astype(np.float16)
  wrong = (y.astype(np.float64) < x) if up else (y.astype(np.float64) > x)
  return np.where(wrong, np.nextafter(y, np.float16(np.inf if up else -np.inf)), y)


def quantise(x: np.ndarray, bits: int, granularity: str, levels: int = 0) -> Quantised:
  """Codes in [0, levels] of `x` (any shape, finite, |x| < 65504) with their float16 (lo, step)
  groups; `levels` in [1, 2^bits - 1], 0 = 2^bits - 1."""
  check(bits, granularity)
  if not 0 <= levels < 1 << bits:
    raise ValueError(f"levels={levels} must be in [1, 2^{bits} - 1] (0 = 2^bits - 1)")
  x = np.asarray(x, np.float64)
  if not np.all(np.isfinite(x)) or (x.size and np.max(np.abs(x)) >= _F16_MAX / 2):
    raise ValueError(f"a parameter tensor holds non-finite values or values beyond float16's "
                     f"range (max |x| {np.max(np.abs(x)):.3g}): set quant_bits=0")
  axes = tuple(i for i, n in enumerate(group_shape(x.shape, granularity)) if n == 1)
  levels = levels or (1 << bits) - 1
  lo = _outward_f16(np.min(x, axis=axes, keepdims=True), up=False)
  step = _outward_f16((np.max(x, axis=axes, keepdims=True) - lo.astype(np.float64)) / levels,
                      up=True)
  safe = np.where(step > 0, step.astype(np.float64), 1.0)
  codes = np.clip(np.rint((x - lo.astype(np.float64)) / safe), 0, levels).astype(
      code_dtype(bits))
  return Quantised(codes, lo.reshape(-1), step.reshape(-1))


def dequantise(q: Quantised, granularity: str) -> np.ndarray:
  """float32 values `lo + code * step` of the tensor's shape."""
  shape = group_shape(q.codes.shape, granularity)
  lo = q.lo.astype(np.float32).reshape(shape)
  step = q.step.astype(np.float32).reshape(shape)
  return (lo + q.codes.astype(np.float32) * step).astype(np.float32)
