"""Coordinates of a volume split by a grid, and the random training points of its cells.

A `GridLayout` cuts a volume of shape `[n_1, ..., n_d]` into `G = prod(grid)` cells of
`ceil(n_i / grid_i)` voxels per axis (cells at the far edges are smaller: their out-of-range
local indices are clipped onto their last voxel, which then just counts twice). Point j of every
cell has a flat voxel index and coordinates in [-1, 1] local to its cell. Grid all ones = the
whole volume in global coordinates (MoEC, single INR). Coordinates are computed per batch of
points, never for the whole volume at once (training: on the device, `CellSampler`).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
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


class CellSampler:
  """Random training points of `cells [B, G]` (cells of `layout`), drawn on the device.

  Host side, once: `values [B, G, S]`, every point's target of every cell (`to_unit` of `data`,
  the volume in its stored dtype; S = `group_size`, gathered in slabs: no coordinate grid is
  made), and per cell its `extent` `[B, G, d]` (voxels per axis). Per step: the point indices
  `j [b]`, the same for every cell; epoch e is a permutation of range(S) seeded by (seed, e),
  cut into `S // b` batches of b = min(points_per_group, S) points (`indices`). On the device,
  `cell_coords` turns `j` into the coordinates `layout.points(j, cells)` gives, bit for bit.
  """

  SLAB = 1 << 16  # points per cell gathered at a time when building `values` (host temporaries:
  # ~50 B per point and cell of the batch)

  def __init__(self, layout: GridLayout, data: np.ndarray, lo: float, hi: float,
               points_per_group: int, seed: int, cells: np.ndarray):
    self.block = tuple(int(b) for b in layout.block)
    self.batch = min(points_per_group, layout.group_size)
    self.steps_per_epoch = layout.group_size // self.batch
    self.seed, self.group_size = seed, layout.group_size
    cells, flat = np.asarray(cells), data.reshape(-1)
    self.extent = layout.extent[cells].astype(np.int32)
    self.values = np.empty(cells.shape + (layout.group_size,), np.float32)
    for first in range(0, layout.group_size, self.SLAB):
      j = np.arange(first, min(first + self.SLAB, layout.group_size))
      self.values[..., j] = to_unit(flat[layout.points(j, cells)[0]], lo, hi)
    self._order = (-1, None)  # (epoch, its permutation); the last one is kept

  def indices(self, first_step: int, count: int) -> np.ndarray:
    """Point indices of steps `first_step .. first_step + count - 1`: `[count, b]` int32."""
    out = np.empty((count, self.batch), np.int32)
    for k in range(count):
      epoch, i = divmod(first_step + k, self.steps_per_epoch)
      if self._order[0] != epoch:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.group_size)
        self._order = (epoch, perm)
      out[k] = self._order[1][i * self.batch:(i + 1) * self.batch]
    return out


def cell_coords(j: jax.Array, block: tuple[int, ...], extent: jax.Array) -> jax.Array:
  """Device twin of `GridLayout.points`' coordinates (local to each cell): point indices `j [b]`
  of cells with `extent [..., d]` (int32) of a layout with cells of `block` voxels ->
  `[..., b, d]` float32 in [-1, 1] (`(2 l - s) / s` for local index l and span s: exact
  integers, one rounding, the value the host's float64 formula rounds to)."""
  local = jnp.stack(jnp.unravel_index(j, block), -1)  # [b, d]
  extent = extent[..., None, :]
  local = jnp.minimum(local, extent - 1)  # [..., b, d]
  span = jnp.maximum(extent - 1, 1)
  coords = (2 * local - span).astype(jnp.float32) / span.astype(jnp.float32)
  return jnp.where(extent > 1, coords, 0.0)
