"""Coordinates of a volume split by a grid, and a grain pipeline of random coordinate batches.

A `GridLayout` cuts a volume of shape `[n_1, ..., n_d]` into `G = prod(grid)` blocks of
`ceil(n_i / grid_i)` voxels per axis (blocks at the far edges are smaller: their out-of-range
local indices are clipped onto their last voxel, which then just counts twice). Point j of every
block has a flat voxel index and coordinates in [-1, 1] local to its block. Grid all ones = the
whole volume in global coordinates (MoEC, single INR).
"""
from __future__ import annotations

import math
import sys
from typing import Sequence

import grain
import numpy as np


class GridLayout:
  """Points of each block: `points(j [n]) -> (voxel index [G, n] int64, coords [G, n, d])`."""

  def __init__(self, shape: Sequence[int], grid: Sequence[int]):
    shape, grid = np.asarray(shape), np.asarray(grid)
    if shape.shape != grid.shape or np.any(grid < 1):
      raise ValueError(f"grid {tuple(grid)} needs one positive entry per axis of shape "
                       f"{tuple(shape)}")
    self.shape, self.block = shape, -(-shape // grid)
    if np.any((grid - 1) * self.block >= shape):
      raise ValueError(f"grid {tuple(grid)} is too fine for shape {tuple(shape)}: the last "
                       "block of some axis would be empty; use fewer blocks on that axis")
    blocks = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1)
    self.origin = blocks.reshape(-1, len(grid)) * self.block  # [G, d]
    self.extent = np.minimum(self.block, shape - self.origin)  # [G, d]

  @property
  def num_groups(self) -> int:
    return self.origin.shape[0]

  @property
  def group_size(self) -> int:
    """Points per block (the largest block's voxel count)."""
    return int(math.prod(self.block))

  def points(self, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`j [n]` indices into each block -> voxel index `[G, n]`, coords float32 `[G, n, d]`."""
    local = np.stack(np.unravel_index(j, tuple(self.block)), -1)  # [n, d]
    local = np.minimum(local[None], self.extent[:, None] - 1)  # [G, n, d]
    voxel = np.ravel_multi_index(tuple(np.moveaxis(self.origin[:, None] + local, -1, 0)),
                                 tuple(self.shape))
    span = np.maximum(self.extent[:, None] - 1, 1)
    coords = np.where(self.extent[:, None] > 1, 2.0 * local / span - 1.0, 0.0)
    return voxel, coords.astype(np.float32)


class CoordinateBatches:
  """Batch number -> `{'coords': [G, b, d], 'values': [G, b]}`. Epoch e is a permutation of
  each block's points seeded by (seed, e), cut into `group_size // b` batches."""

  def __init__(self, layout: GridLayout, values: np.ndarray, points_per_group: int, seed: int):
    self.layout, self.values, self.seed = layout, values.reshape(-1), seed
    self.batch = min(points_per_group, layout.group_size)
    self.steps_per_epoch = layout.group_size // self.batch
    self._order = (-1, None)  # (epoch, its permutation); the last one is kept

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, i = divmod(step, self.steps_per_epoch)
    if self._order[0] != epoch:
      perm = np.random.default_rng([self.seed, epoch]).permutation(self.layout.group_size)
      self._order = (epoch, perm)
    voxel, coords = self.layout.points(self._order[1][i * self.batch:(i + 1) * self.batch])
    return {"coords": coords, "values": self.values[voxel]}


def batches(layout: GridLayout, values: np.ndarray, batch_size: int, seed: int,
            prefetch_threads: int = 1) -> grain.IterDataset:
  """Endless grain pipeline of coordinate batches, `batch_size` points per step in total
  (split evenly over the layout's blocks). `values`: the normalised volume, flat or shaped."""
  per_group = max(batch_size // layout.num_groups, 1)
  return grain.MapDataset.range(sys.maxsize).map(
      CoordinateBatches(layout, values, per_group, seed)).to_iter_dataset(
          grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=2))
