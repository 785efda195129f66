"""Batched numpy image ops (one call per batch, no per-example Python)."""
from __future__ import annotations

import numpy as np


def resize_nearest(images: np.ndarray, size: int) -> np.ndarray:
  """`[B, H, W, C] -> [B, size, size, C]`, nearest neighbour (a no-op at the right size)."""
  if images.shape[1:3] == (size, size):
    return images
  rows = np.arange(size) * images.shape[1] // size
  cols = np.arange(size) * images.shape[2] // size
  return images[:, rows][:, :, cols]


def random_crop(images: np.ndarray, padding: int, rng: np.random.Generator) -> np.ndarray:
  """Per-example random crop of `[B, H, W, C]` back to `[B, H, W, C]` after zero padding."""
  if padding == 0:
    return images
  B, H, W, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  windows = np.lib.stride_tricks.sliding_window_view(padded, (H, W), axis=(1, 2))
  dy, dx = rng.integers(0, 2 * padding + 1, size=(2, B))
  return windows[np.arange(B), dy, dx].transpose(0, 2, 3, 1)  # [B, C, H, W] -> [B, H, W, C]


def normalise(images: np.ndarray) -> np.ndarray:
  """uint8 `[B, H, W, C]` -> float32 in [-1, 1] (padding zeros map to -1, the background)."""
  return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
