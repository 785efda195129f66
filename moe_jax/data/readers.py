"""Readers: batches of one split by example index, as uint8 `[B, size, size, C]` + int32 `[B]`.

`ArrayReader` holds a whole split in host memory (decoded and resized once), so a batch is one
numpy gather. `StreamReader` decodes each example from its array_record file on demand, for
splits too big to hold or whose images vary in size.
"""
from __future__ import annotations

import numpy as np

from moe_jax.data import transforms


class ArrayReader:
  """A split in memory: images uint8 `[N, size, size, C]`, labels int32 `[N]`."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]


class StreamReader:
  """A tfds data source read example by example, each resized to `size`."""

  def __init__(self, source, size: int):
    self.source, self.size = source, size

  def __len__(self) -> int:
    return len(self.source)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    examples = self.source.__getitems__([int(i) for i in indices])
    images = [transforms.resize_nearest(np.asarray(e["image"])[None], self.size)[0]
              for e in examples]
    return np.stack(images), np.asarray([e["label"] for e in examples], np.int32)


def make_reader(source, size: int, image_shape: tuple, cache: bool) -> ArrayReader | StreamReader:
  """An ArrayReader when `cache` and every image has the same stored `image_shape`."""
  if not cache or None in image_shape:
    return StreamReader(source, size)
  images, labels = StreamReader(source, image_shape[0]).read(np.arange(len(source)))
  return ArrayReader(transforms.resize_nearest(images, size), labels)
