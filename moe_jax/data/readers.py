"""Readers: the stored images of one split by example index, with int32 labels `[B]`.

`ArrayReader` holds a whole split of fixed-size images in host memory (read once), so a batch
is one numpy gather. `StreamReader` reads each example from its array_record file on demand, for
splits too big to hold, whose images vary in size or are stored encoded (JPEG bytes, read with
tfds `SkipDecoding` and decoded by the `decode` op).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class Reader(Protocol):
  def __len__(self) -> int: ...

  def read(self, indices: np.ndarray) -> tuple[Sequence, np.ndarray]:
    """(images: uint8 `[H, W, C]` arrays or encoded bytes, one per index; labels int32 `[B]`)."""


class ArrayReader:
  """A split in memory: images uint8 `[N, H, W, C]`, labels int32 `[N]`."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]


class StreamReader:
  """A tfds data source read example by example."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def read(self, indices: np.ndarray) -> tuple[list, np.ndarray]:
    examples = self.source.__getitems__([int(i) for i in indices])
    return ([e["image"] for e in examples], np.asarray([e["label"] for e in examples], np.int32))


def make_reader(source, cache: bool) -> ArrayReader | StreamReader:
  """An ArrayReader when `cache` (pass False for images of varying size), else a StreamReader."""
  if not cache:
    return StreamReader(source)
  images, labels = StreamReader(source).read(np.arange(len(source)))
  return ArrayReader(np.stack(images), labels)
