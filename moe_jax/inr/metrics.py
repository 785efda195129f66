"""Reconstruction quality: PSNR and SSIM over the original's value range (any ndim).

Both run over slabs of the first axis (`slab` planes at a time, float64 only per slab), so
their memory is bounded by a slab, not the volume; the results are those of the whole volume
at once (SSIM slabs carry a halo of the Gaussian window's radius).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

SLAB = 16  # planes of the first axis per step


def value_range(original: np.ndarray) -> float:
  """Peak-to-peak of the original (1 for a constant volume)."""
  span = float(np.max(original)) - float(np.min(original))
  return span if span > 0 else 1.0


def psnr(original: np.ndarray, decoded: np.ndarray, slab: int = SLAB) -> float:
  """`10 log10(range^2 / MSE)` in dB, range = max - min of the original; inf when identical."""
  sse = sum(float(np.sum((original[i:i + slab].astype(np.float64)
                          - decoded[i:i + slab].astype(np.float64)) ** 2))
            for i in range(0, original.shape[0], slab))
  mse = sse / original.size
  return float("inf") if mse == 0 else float(10 * np.log10(value_range(original) ** 2 / mse))


def ssim(original: np.ndarray, decoded: np.ndarray, sigma: float = 1.5, slab: int = SLAB
         ) -> float:
  """Mean SSIM (Wang et al. 2004) with a Gaussian window (sigma 1.5, truncated at 3.5 sigma, as
  the reference 11-tap window), K1 = 0.01, K2 = 0.03, over every axis of the volume (reflected
  at its borders)."""
  truncate = 3.5
  halo = int(truncate * sigma + 0.5)  # scipy's window radius
  c1, c2 = (0.01 * value_range(original)) ** 2, (0.03 * value_range(original)) ** 2
  blur = lambda a: ndimage.gaussian_filter(a, sigma, truncate=truncate, mode="reflect")
  total, n = 0.0, original.shape[0]
  for i in range(0, n, slab):
    lo, hi = max(i - halo, 0), min(i + slab + halo, n)  # at the volume's ends: its true border
    x, y = original[lo:hi].astype(np.float64), decoded[lo:hi].astype(np.float64)
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    total += float(np.sum(s[i - lo:i - lo + min(slab, n - i)]))
  return total / original.size
