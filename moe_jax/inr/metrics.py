"""Reconstruction quality: PSNR and SSIM over the original's value range (any ndim)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def value_range(original: np.ndarray) -> float:
  """Peak-to-peak of the original (1 for a constant volume)."""
  span = float(np.max(original)) - float(np.min(original))
  return span if span > 0 else 1.0


def psnr(original: np.ndarray, decoded: np.ndarray) -> float:
  """`10 log10(range^2 / MSE)` in dB, range = max - min of the original; inf when identical."""
  mse = np.mean((original.astype(np.float64) - decoded.astype(np.float64)) ** 2)
  return float("inf") if mse == 0 else float(10 * np.log10(value_range(original) ** 2 / mse))


def ssim(original: np.ndarray, decoded: np.ndarray, sigma: float = 1.5) -> float:
  """Mean SSIM (Wang et al. 2004) with a Gaussian window (sigma 1.5, truncated at 3.5 sigma, as
  the reference 11-tap window), K1 = 0.01, K2 = 0.03, over every axis of the volume."""
  x, y = original.astype(np.float64), decoded.astype(np.float64)
  c1, c2 = (0.01 * value_range(original)) ** 2, (0.03 * value_range(original)) ** 2
  blur = lambda a: ndimage.gaussian_filter(a, sigma, truncate=3.5, mode="reflect")
  mx, my = blur(x), blur(y)
  vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
  s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
  return float(np.mean(s))
