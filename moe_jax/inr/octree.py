"""Tree-structured partition of a volume (octree, after TINC: Yang et al., CVPR 2023).

A node is a box of voxels; splitting it halves every axis (`ceil(n / 2)` voxels to the first
half), giving `2^d` children. `partition` grows the tree greedily from the whole volume: it
splits the leaf with the largest sum of squared deviations from its mean (the signal energy a
leaf's network has to explain; a constant leaf is never split) while the leaf count stays within
`max_leaves` and the leaf has >= 2 voxels on every axis. Each leaf is then fitted by its own
SIREN (model.BlockINR), in the leaf's local coordinates.

The tree travels in the file as its split flags in depth-first pre-order, one character per node
('1' split, '0' leaf): `1 + 2^d * splits` characters, and the leaves are its '0's in that order.

Simplified from TINC: TINC shares parameters hierarchically (a leaf's MLP reuses layers held by
its ancestors) and allocates parameters by data complexity; here the leaves are independent
SIRENs of one solved width (the budget split evenly), so the octree adapts the partition, not the
parameters.
"""
from __future__ import annotations

import heapq
from typing import Sequence

import numpy as np


def _children(origin: np.ndarray, extent: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
  """The `2^d` octants of box (origin [d], extent [d]), in C order of their corners."""
  half = -(-extent // 2)
  out = []
  for corner in np.ndindex(*(2,) * len(extent)):
    c = np.asarray(corner)
    out.append((origin + c * half, np.where(c == 0, half, extent - half)))
  return out


def _energy(data: np.ndarray, origin: np.ndarray, extent: np.ndarray) -> float:
  box = data[tuple(slice(o, o + e) for o, e in zip(origin, extent))].astype(np.float64)
  return float(((box - box.mean()) ** 2).sum())


def partition(data: np.ndarray, max_leaves: int) -> str:
  """Split flags (pre-order '0'/'1' string) of the greedy octree of `data` with at most
  `max_leaves` leaves."""
  d = data.ndim
  if max_leaves < 1:
    raise ValueError(f"model.max_leaves={max_leaves} must be >= 1")
  root = (np.zeros(d, np.int64), np.asarray(data.shape, np.int64))
  split: set[tuple[int, ...]] = set()  # node ids: the path of child indices from the root
  heap = [(-_energy(data, *root), (), root)]
  leaves = 1
  while heap and leaves + 2 ** d - 1 <= max_leaves:
    energy, path, (origin, extent) = heapq.heappop(heap)
    if energy == 0:  # the largest energy left is 0: every leaf is already constant
      break
    if extent.min() < 2:
      continue
    split.add(path)
    leaves += 2 ** d - 1
    for i, child in enumerate(_children(origin, extent)):
      heapq.heappush(heap, (-_energy(data, *child), path + (i,), child))

  def flags(path: tuple[int, ...]) -> str:
    if path not in split:
      return "0"
    return "1" + "".join(flags(path + (i,)) for i in range(2 ** d))
  return flags(())


def num_leaves(tree: str, ndim: int) -> int:
  """Leaves of a split-flag string; ValueError if it is not a complete pre-order tree."""
  if not tree or set(tree) - {"0", "1"} or len(tree) != 1 + 2 ** ndim * tree.count("1"):
    raise ValueError(f"model.tree={tree[:40]!r} is not a pre-order octree of '0'/'1' split "
                     f"flags for {ndim}-D ({1 + 2 ** ndim} characters per split); leave it "
                     "empty to partition the volume")
  return tree.count("0")


def leaves(shape: Sequence[int], tree: str) -> tuple[np.ndarray, np.ndarray]:
  """The leaf boxes of `tree` over a volume of `shape`: origins and extents, int64 `[G, d]`."""
  num_leaves(tree, len(shape))
  out, pos = [], 0

  def walk(origin: np.ndarray, extent: np.ndarray) -> None:
    nonlocal pos
    flag, pos = tree[pos], pos + 1
    if flag == "0":
      out.append((origin, extent))
      return
    if extent.min() < 2:
      raise ValueError(f"model.tree splits a box of extent {tuple(extent)}: every axis needs "
                       ">= 2 voxels; the tree does not fit the volume's shape")
    for child in _children(origin, extent):
      walk(*child)
  walk(np.zeros(len(shape), np.int64), np.asarray(shape, np.int64))
  origins, extents = zip(*out)
  return np.stack(origins), np.stack(extents)


class OctreeLayout:
  """The leaves of an octree as coordinate groups (the `sampling.GridLayout` interface).

  Leaf g has `n_g` voxels; point j of leaf g is its voxel `j mod n_g` (C order), so every leaf
  is covered by `j < group_size = max n_g` and small leaves repeat their voxels.
  """

  def __init__(self, shape: Sequence[int], tree: str):
    self.shape = np.asarray(shape)
    self.origin, self.extent = leaves(shape, tree)

  @property
  def num_groups(self) -> int:
    return self.origin.shape[0]

  @property
  def group_size(self) -> int:
    return int(self.extent.prod(-1).max())

  def points(self, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`j [n]` -> voxel index `[G, n]` int64, coords float32 `[G, n, d]` local to each leaf."""
    rest = np.asarray(j)[None] % self.extent.prod(-1)[:, None]  # [G, n]
    local = np.zeros(rest.shape + (self.shape.size,), np.int64)
    for axis in range(self.shape.size - 1, -1, -1):
      local[..., axis] = rest % self.extent[:, axis, None]
      rest = rest // self.extent[:, axis, None]
    voxel = np.ravel_multi_index(tuple(np.moveaxis(self.origin[:, None] + local, -1, 0)),
                                 tuple(self.shape))
    span = np.maximum(self.extent[:, None] - 1, 1)
    coords = np.where(self.extent[:, None] > 1, 2.0 * local / span - 1.0, 0.0)
    return voxel, coords.astype(np.float32)
