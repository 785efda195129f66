"""grain input pipelines: per-process shards, seeded per-epoch shuffling and augmentation, resumable.

Train batches: `{'image': float32 [B, H, W, C] normalised by data.normalization (default [-1, 1]),
'label': int32 [B]}`, endless. Eval
batches add `'mask': float32 [B]` (1 = real example): one pass, the last batch padded, so that
every example counts exactly once. `B` is the per-process batch size.

Each pipeline is a `grain.MapDataset` over batch numbers whose map builds a whole batch with a
few numpy calls: shuffling and batching element by element in grain cost ~4 ms per batch of 128
(measured), more than everything else together. Batch `i` is a pure function of (config, seed,
process, i), so the iterator's grain state (`get_state()` / `set_state()`, the next batch
number) resumes exactly, with or without read-ahead threads or worker processes.
"""
from __future__ import annotations

import sys

import grain
from absl import flags
import ml_collections
import numpy as np

from moe_jax.data import config as config_lib
from moe_jax.data import readers, sources, transforms


class TrainBatches:
  """Batch number -> augmented batch of this process's shard. Epoch `e` is a permutation of the
  shard seeded by (seed, e), cut into `len(shard) // B` batches (the remainder is dropped that
  epoch); crop offsets are seeded by (seed, process_index, batch number)."""

  def __init__(self, reader: readers.ArrayReader | readers.StreamReader, shard: np.ndarray,
               batch_size: int, seed: int, process_index: int, crop_padding: int | None,
               stats: tuple[np.ndarray, np.ndarray]):
    self.reader, self.shard, self.batch_size, self.stats = reader, shard, batch_size, stats
    self.seed, self.process_index, self.crop_padding = seed, process_index, crop_padding
    self.steps_per_epoch = len(shard) // batch_size
    self._order = (-1, shard)  # (epoch, its permutation of the shard); the last one is kept

  def _permutation(self, epoch: int) -> np.ndarray:
    order = self._order
    if order[0] != epoch:
      order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.shard))
      self._order = order
    return order[1]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, j = divmod(step, self.steps_per_epoch)
    B = self.batch_size
    images, labels = self.reader.read(self._permutation(epoch)[j * B:(j + 1) * B])
    if self.crop_padding is not None:
      rng = np.random.default_rng([self.seed, self.process_index, step])
      images = transforms.random_crop(images, self.crop_padding, rng)
    return {"image": transforms.normalise(images, *self.stats), "label": labels}


class EvalBatches:
  """Batch number -> batch of this process's shard in order; positions past its end repeat the
  last example with mask 0."""

  def __init__(self, reader: readers.ArrayReader | readers.StreamReader, shard: np.ndarray,
               batch_size: int, stats: tuple[np.ndarray, np.ndarray]):
    self.reader, self.shard, self.batch_size, self.stats = reader, shard, batch_size, stats

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    positions = b * self.batch_size + np.arange(self.batch_size)
    images, labels = self.reader.read(self.shard[np.minimum(positions, len(self.shard) - 1)])
    mask = (positions < len(self.shard)).astype(np.float32)
    return {"image": transforms.normalise(images, *self.stats), "label": labels, "mask": mask}


def _reader(config: ml_collections.ConfigDict, split: str):
  """Checks the dataset against the config, then a reader of `split` at the config's size."""
  builder = sources.prepared_builder(config.name, config.data_dir)
  shape = tuple(builder.info.features["image"].shape)
  num_classes = builder.info.features["label"].num_classes
  if shape[-1] != config.channels:
    raise ValueError(f"data.channels={config.channels}, but {config.name} images have "
                     f"{shape[-1]} channels")
  if num_classes != config.num_classes:
    raise ValueError(f"data.num_classes={config.num_classes}, but {config.name} has "
                     f"{num_classes} classes")
  return readers.make_reader(builder.as_data_source(split=split), config.image_size, shape,
                             config.cache)


def _shard(n: int, process_index: int, process_count: int) -> np.ndarray:
  """Example indices of one process: a disjoint stride of `range(n)`."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  return np.arange(n)[process_index::process_count]


def make_dataset(config: ml_collections.ConfigDict, split: str, *, batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1,
                 train: bool) -> grain.DatasetIterator | grain.IterDataset:
  """Numpy batches of `split` for this process (see the module docstring).

  train=True: an endless iterator, reshuffled every epoch, augmented (`data.augment`), full
  batches. train=False: a re-iterable dataset (each `iter()` is one pass, in order; readers are
  built once), no augmentation, padded last batch with `mask`; `seed` unused.
  Every process gets the same number of eval batches. Save `it.get_state()` in a checkpoint and
  call `set_state` on a fresh iterator built the same way to continue with the same batches.
  """
  config_lib.validate(config)
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  reader = _reader(config, split)
  shard = _shard(len(reader), process_index, process_count)
  stats = transforms.normalization_stats(config.normalization, config.channels)
  if train:
    if batch_size > len(shard):
      raise ValueError(f"batch_size={batch_size} (per process) exceeds the {len(shard)} examples "
                       f"of this process's shard of {config.name}:{split}")
    padding = config.crop_padding if config.augment == "crop" else None
    batches = grain.MapDataset.range(sys.maxsize).map(
        TrainBatches(reader, shard, batch_size, seed, process_index, padding, stats))
  else:
    per_process = -(-len(reader) // process_count)  # the largest shard sets the batch count
    batches = grain.MapDataset.range(-(-per_process // batch_size)).map(
        EvalBatches(reader, shard, batch_size, stats))
  ds = batches.to_iter_dataset(grain.ReadOptions(num_threads=config.prefetch_threads,
                                                 prefetch_buffer_size=config.prefetch_buffer))
  if config.num_workers:
    if not flags.FLAGS.is_parsed():  # outside an absl app; grain's workers read absl flags
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
  return iter(ds) if train else ds


def train_dataset(config: ml_collections.ConfigDict, *, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """`make_dataset` on `data.train_split`, train=True."""
  return make_dataset(config, config.train_split, batch_size=batch_size, seed=seed,
                      process_index=process_index, process_count=process_count, train=True)


def eval_dataset(config: ml_collections.ConfigDict, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """`make_dataset` on `data.eval_split`, train=False (re-iterable)."""
  return make_dataset(config, config.eval_split, batch_size=batch_size,
                      process_index=process_index, process_count=process_count, train=False)
