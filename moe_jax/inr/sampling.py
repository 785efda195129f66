"""Coordinates of a volume split by a grid, and a grain pipeline of random coordinate batches.

A `GridLayout` cuts a volume of shape `[n_1, ..., n_d]` into `G = prod(grid)` cells of
`ceil(n_i / grid_i)` voxels per axis (cells at the far edges are smaller: their out-of-range
local indices are clipped onto their last voxel, which then just counts twice). Point j of every
cell has a flat voxel index and coordinates in [-1, 1] local to its cell. Grid all ones = the
whole volume in global coordinates (MoEC, single INR). Coordinates are computed per batch of
points, never for the whole volume at once.
"""
from __future__ import annotations

import math
import sys
from typing import Sequence

import grain
import numpy as np


def to_unit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """Intensities -> float32 in [-1, 1]: `2 (v - lo) / (hi - lo) - 1` (hi == lo: scale 1)."""
  scale = hi - lo if hi > lo else 1.0
  return (2.0 * (values.astype(np.float32) - lo) / scale - 1.0).astype(np.float32)


class GridLayout:
  """Points of each cell: `points(j [n]) -> (voxel index [G, n] int64, coords [G, n, d])`."""

  def __init__(self, shape: Sequence[int], grid: Sequence[int]):
    shape, grid = np.asarray(shape), np.asarray(grid)
    if shape.shape != grid.shape or np.any(grid < 1):
      raise ValueError(f"grid {tuple(grid)} needs one positive entry per axis of shape "
                       f"{tuple(shape)}")
    self.shape, self.grid, self.block = shape, grid, -(-shape // grid)
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
    """Points per cell (the largest cell's voxel count)."""
    return int(math.prod(self.block))

  def points(self, j: np.ndarray, cells: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """`j [n]` indices into each of `cells` (int array `[...]`, default every cell `[G]`) ->
    voxel index `[..., n]` int64, coords float32 `[..., n, d]`."""
    cells = np.arange(self.num_groups) if cells is None else np.asarray(cells)
    origin, extent = self.origin[cells][..., None, :], self.extent[cells][..., None, :]
    local = np.stack(np.unravel_index(j, tuple(self.block)), -1)  # [n, d]
    local = np.minimum(local, extent - 1)  # [..., n, d]
    voxel = np.ravel_multi_index(tuple(np.moveaxis(origin + local, -1, 0)), tuple(self.shape))
    span = np.maximum(extent - 1, 1)
    coords = np.where(extent > 1, 2.0 * local / span - 1.0, 0.0)
    return voxel, coords.astype(np.float32)


class CoordinateBatches:
  """Batch number -> `{'coords': [..., b, d], 'values': [..., b]}` for `cells [...]`: epoch e is
  a permutation of a cell's points seeded by (seed, e), cut into `group_size // b` batches.
  `data` is the volume in its stored dtype; each batch's values are scaled by `to_unit`."""

  def __init__(self, layout: GridLayout, data: np.ndarray, lo: float, hi: float,
               points_per_group: int, seed: int, cells: np.ndarray | None = None):
    self.layout, self.data, self.range, self.seed = layout, data.reshape(-1), (lo, hi), seed
    self.cells = cells
    self.batch = min(points_per_group, layout.group_size)
    self.steps_per_epoch = layout.group_size // self.batch
    self._order = (-1, None)  # (epoch, its permutation); the last one is kept

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, i = divmod(step, self.steps_per_epoch)
    if self._order[0] != epoch:
      perm = np.random.default_rng([self.seed, epoch]).permutation(self.layout.group_size)
      self._order = (epoch, perm)
    voxel, coords = self.layout.points(self._order[1][i * self.batch:(i + 1) * self.batch],
                                       self.cells)
    return {"coords": coords, "values": to_unit(self.data[voxel], *self.range)}


def batches(layout: GridLayout, data: np.ndarray, lo: float, hi: float, points_per_group: int,
            seed: int, cells: np.ndarray | None = None,
            prefetch_threads: int = 1) -> grain.IterDataset:
  """Endless grain pipeline of `CoordinateBatches` (`points_per_group` points of each of
  `cells` per step)."""
  return grain.MapDataset.range(sys.maxsize).map(
      CoordinateBatches(layout, data, lo, hi, points_per_group, seed, cells)).to_iter_dataset(
          grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=2))
