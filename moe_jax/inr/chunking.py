"""Tiling a volume into independently coded chunks, and rendering chunks onto an output grid.

Chunks: `chunk_shape` is the largest chunk. An axis of n voxels is cut into g = ceil(n / c)
chunks of ceil(n / g) voxels (balanced: every chunk gets nearly the same voxel count for the
same parameter budget; no overlap), numbered in C order of the chunk grid. Every chunk is coded
by its own model of the same config, with its own decoder: a shared decoder would couple the
chunks' gradients, so chunks could no longer be trained batch by batch, nor decoded alone.
With several chunks the model's own block grid (BlockINR `model.grid`) must be all ones (a grid
of blocks is itself a chunking); with one chunk (`chunk_shape` = the volume) it splits the chunk.

Cells: the finest split, i.e. the chunk grid (several chunks) or the model grid (one chunk). A
cell is one coordinate group `G` of a model; cell coordinates are local, in [-1, 1].

Output grid (`OutputGrid`): decoding at `scale` renders `m = max(1, round(n * scale))` voxels per
axis; output voxel k sits at source position x = k (n - 1) / (m - 1) (corners aligned; scale 1 is
the voxel grid itself, with exactly the training coordinates). It is evaluated by the cell that
holds voxel round(x), in that cell's coordinates (between two chunks up to half a voxel is
extrapolated). A region of interest is a tuple of slices of the output grid; only the chunks it
touches are evaluated.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import numpy as np

from moe_jax.inr import sampling


def chunk_grid(shape: Sequence[int], chunk_shape: Sequence[int]) -> tuple[int, ...]:
  """Chunks per axis: ceil(n / c) (`chunk_shape` () = one chunk)."""
  chunk_shape = tuple(chunk_shape) or tuple(shape)
  if len(chunk_shape) != len(shape) or min(chunk_shape) < 1:
    raise ValueError(f"chunk_shape={chunk_shape} needs one positive size per axis of the "
                     f"volume {tuple(shape)} (or () for one chunk)")
  return tuple(-(-int(n) // min(int(c), int(n))) for n, c in zip(shape, chunk_shape))


class Tiling:
  """Chunks of a volume of `shape` and the cells (model groups) of each chunk."""

  def __init__(self, shape: Sequence[int], chunk_shape: Sequence[int], model_grid: Sequence[int]):
    self.shape = tuple(int(n) for n in shape)
    self.chunk_grid = chunk_grid(self.shape, chunk_shape)
    self.num_chunks = math.prod(self.chunk_grid)
    if self.num_chunks > 1 and any(g != 1 for g in model_grid):
      raise ValueError(f"model.grid={tuple(model_grid)} with chunk_shape={chunk_shape}: chunks "
                       "are already independent blocks; set model.grid to ones or chunk_shape=()")
    self.cells = sampling.GridLayout(self.shape,
                                     self.chunk_grid if self.num_chunks > 1 else model_grid)
    self.groups = 1 if self.num_chunks > 1 else self.cells.num_groups
    self.chunk_block = tuple(int(b) for b in sampling.GridLayout(self.shape,
                                                                 self.chunk_grid).block)

  def cells_of(self, chunks: np.ndarray) -> np.ndarray:
    """Chunk ids `[B]` -> their cells `[B, G]` (cell ids of `self.cells`)."""
    chunks = np.asarray(chunks)
    if self.num_chunks > 1:
      return chunks[:, None]
    return np.broadcast_to(np.arange(self.groups), (len(chunks), self.groups))

  def chunk_of_cell(self, cells: np.ndarray) -> np.ndarray:
    """Cell ids -> the chunk holding each (inverse of `cells_of`)."""
    return np.asarray(cells) if self.num_chunks > 1 else np.zeros_like(cells)


def output_shape(shape: Sequence[int], scale: float) -> tuple[int, ...]:
  if not scale > 0:
    raise ValueError(f"--scale={scale} must be > 0 (1 = the original resolution)")
  return tuple(max(1, int(round(n * scale))) for n in shape)


class OutputGrid:
  """The voxels to render: the `roi` (slices, default all) of the volume at `scale`.

  Per axis a: `index[a]` output voxels, `cell[a]` the cell column that evaluates each, and
  `local[a]` its coordinate in that cell.
  """

  def __init__(self, tiling: Tiling, scale: float = 1.0, roi: Sequence[slice] | None = None):
    self.full_shape = output_shape(tiling.shape, scale)
    roi = tuple(roi) if roi is not None else ()
    if len(roi) > len(self.full_shape):
      raise ValueError(f"--roi has {len(roi)} slices for a {len(self.full_shape)}-d volume")
    roi = roi + (slice(None),) * (len(self.full_shape) - len(roi))
    self.index, self.cell, self.local = [], [], []
    layout = tiling.cells
    for a, (n, m, s) in enumerate(zip(tiling.shape, self.full_shape, roi)):
      k = np.arange(*s.indices(m))
      if k.size == 0:
        raise ValueError(f"--roi slice {s} of axis {a} is empty for an output of {m} voxels")
      x = k * (n - 1) / (m - 1) if m > 1 else np.zeros(k.size)
      block, grid = int(layout.block[a]), int(layout.grid[a])
      column = np.minimum(np.floor(x + 0.5).astype(np.int64) // block, grid - 1)
      origin = column * block
      extent = np.minimum(block, n - origin)
      self.index.append(k)
      self.cell.append(column)
      self.local.append(np.where(extent > 1, 2.0 * (x - origin) / np.maximum(extent - 1, 1) - 1.0,
                                 0.0))
    self.shape = tuple(len(k) for k in self.index)
    self.tiling = tiling

  def touched_cells(self) -> np.ndarray:
    """Cell ids (C order of the cell grid) that evaluate some output voxel."""
    columns = [np.unique(c) for c in self.cell]
    grid = tuple(int(g) for g in self.tiling.cells.grid)
    return np.asarray([np.ravel_multi_index(c, grid) for c in itertools.product(*columns)],
                      np.int64)

  def touched_chunks(self) -> np.ndarray:
    return np.unique(self.tiling.chunk_of_cell(self.touched_cells()))

  def cell_points(self, cell: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per axis: output positions (into the ROI) and local coordinates of `cell`'s voxels."""
    column = np.unravel_index(cell, tuple(int(g) for g in self.tiling.cells.grid))
    pos = [np.flatnonzero(c == k) for c, k in zip(self.cell, column)]
    return pos, [u[p] for u, p in zip(self.local, pos)]


def render(evaluate: Callable[[np.ndarray, np.ndarray], np.ndarray], grid: OutputGrid,
           chunk_batch: int, points_per_call: int, convert: Callable[[np.ndarray], np.ndarray],
           dtype: np.dtype, on_chunks: Callable[[int], None] | None = None) -> np.ndarray:
  """The output grid's voxels: `convert(evaluate(chunks [B], coords [B, G, n, d]) -> [B, G, n])`.

  Every call has the same shape (B = `chunk_batch` chunks, n = points_per_call / (B G) points of
  each cell; short batches repeat a chunk, short cells their last point), so with the same B and
  points_per_call a voxel's value does not depend on the ROI it is rendered in. `on_chunks(k)`
  after k chunks are done.
  """
  tiling = grid.tiling
  chunks = grid.touched_chunks()
  B = chunk_batch
  n = max(points_per_call // (B * tiling.groups), 1)
  out = np.zeros(grid.shape, dtype)
  touched = set(grid.touched_cells().tolist())
  for first in range(0, len(chunks), B):
    ids = chunks[np.minimum(np.arange(first, first + B), len(chunks) - 1)]
    cells = tiling.cells_of(ids)  # [B, G]
    points = [[grid.cell_points(int(c)) if int(c) in touched else None for c in row]
              for row in cells]
    counts = np.asarray([[0 if p is None else math.prod(len(q) for q in p[0]) for p in row]
                         for row in points])
    real = min(B, len(chunks) - first)
    for start in range(0, int(counts[:real].max()), n):
      coords = np.zeros((B, tiling.groups, n, len(grid.shape)), np.float32)
      targets = []
      for b in range(B):
        for g in range(tiling.groups):
          if counts[b, g] == 0:
            continue
          j = np.arange(start, start + n)
          valid = j < counts[b, g]
          pos, local = points[b][g]
          sub = np.unravel_index(np.minimum(j, counts[b, g] - 1), tuple(len(p) for p in pos))
          coords[b, g] = np.stack([u[s] for u, s in zip(local, sub)], -1)
          if b < real:
            targets.append((b, g, valid, tuple(p[s][valid] for p, s in zip(pos, sub))))
      values = convert(np.asarray(evaluate(ids, coords)))
      for b, g, valid, where in targets:
        out[where] = values[b, g][valid]
    if on_chunks is not None:
      on_chunks(real)
  return out
