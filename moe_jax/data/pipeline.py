"""grain input pipelines: global batches that depend on (seed, step) only, resumable.

Train batches: `{'image': float32 [B, H, W, C], 'label': int32 [B]}` (+ `'soft_label'` float32
`[B, num_classes]` when data.pp_train has label ops), endless, made by `data.pp_train`
(`moe_jax.data.preprocess`). Eval batches (an `EvalSource`: the dataset, split and pp string
of one `config.evals` entry) add `'mask': float32 [B]`
(1 = real example): one pass, the last batch padded, so that every example counts exactly once.
`B` is the per-process batch size.

Process-count independence: global train batch `i` (`B * process_count` examples) is a pure
function of (config, seed, i). Epoch `e` is a permutation of the whole split seeded by
(seed, e), cut into global batches (the remainder is dropped that epoch); process `p` builds
rows `[p * B, (p + 1) * B)` of each, and the random ops of the example at global position `j`
draw from an rng seeded by (seed, i, j) (mixup / cutmix from one seeded by (seed, i)). So one
process and N processes see the same examples with the same augmentation (tested with real
processes in tests/test_multihost.py). The trainer's batch sharding must give process `p`
those rows (it does for meshes built by `moe_jax.parallel.mesh`: devices in process order).

Each pipeline is a `grain.MapDataset` over batch numbers whose map builds a whole batch:
shuffling and batching element by element in grain cost ~4 ms per batch of 128 (measured), more
than everything else for small images. The iterator's grain state (`get_state()` /
`set_state()`, the next batch number) resumes exactly, with or without read-ahead threads or
worker processes (`data.num_workers`: grain `mp_prefetch`, each worker builds whole batches).
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import grain
from absl import flags
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from moe_jax.data import config as config_lib
from moe_jax.data import preprocess, readers, sources

# Distinct rng streams under one seed.
_SHUFFLE, _EXAMPLE, _BATCH = 0, 1, 2


def philox(seed: int, stream: int, step: int, position: int) -> np.random.Generator:
  """The rng of (seed, stream, step, position): Philox keyed by (seed, stream), its counter
  starting at (0, 0, step, position), so streams never overlap (~15 us to make, vs ~40 us for
  `default_rng([...])`, measured)."""
  return np.random.Generator(np.random.Philox(counter=np.array([0, 0, step, position], np.uint64),
                                              key=np.array([seed, stream], np.uint64)))


class TrainBatches:
  """Step -> rows `[start, stop)` of global batch `step` (see the module docstring)."""

  def __init__(self, reader: readers.Reader, global_batch_size: int, rows: tuple[int, int],
               seed: int, pp: preprocess.Pipeline):
    self.reader, self.global_batch_size, self.rows, self.seed, self.pp = (
        reader, global_batch_size, rows, seed, pp)
    self.steps_per_epoch = len(reader) // global_batch_size
    self._order = (-1, None)  # (epoch, its permutation of the split); the last one is kept

  def _permutation(self, epoch: int) -> np.ndarray:
    order = self._order
    if order[0] != epoch:
      order = (epoch, np.random.default_rng([self.seed, _SHUFFLE, epoch]).permutation(
          len(self.reader)))
      self._order = order
    return order[1]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, j = divmod(step, self.steps_per_epoch)
    positions = np.arange(*self.rows)
    images, labels = self.reader.read(
        self._permutation(epoch)[j * self.global_batch_size + positions])
    if self.pp.random:
      rngs = [philox(self.seed, _EXAMPLE, step, p) for p in positions]
      batch_rng = philox(self.seed, _BATCH, step, 0)
    else:
      rngs, batch_rng = [None] * len(positions), None
    return self.pp.batch(images, labels, rngs, batch_rng)


class EvalBatches:
  """Batch number -> batch of this process's shard in order; positions past its end repeat the
  last example with mask 0."""

  def __init__(self, reader: readers.Reader, shard: np.ndarray, batch_size: int,
               pp: preprocess.Pipeline):
    self.reader, self.shard, self.batch_size, self.pp = reader, shard, batch_size, pp

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    positions = b * self.batch_size + np.arange(self.batch_size)
    images, labels = self.reader.read(self.shard[np.minimum(positions, len(self.shard) - 1)])
    batch = self.pp.batch(images, labels, [None] * self.batch_size, None)
    return {**batch, "mask": (positions < len(self.shard)).astype(np.float32)}


class EvalSource(NamedTuple):
  """What one evaluation reads: tfds `dataset` (e.g. `data.name`), its `split` (tfds split
  syntax, e.g. 'test[:200]'), the deterministic pp string `pp`, and `field`, the config node
  named in errors (e.g. 'evals.val'; the split is `field.split_key`). `num_classes`: the class
  count the dataset must have (the model's head), or None for any (few-shot probes read it from
  the dataset)."""
  dataset: str
  split: str
  pp: str
  field: str
  num_classes: int | None
  split_key: str = "split"


def _checked_builder(config: ml_collections.ConfigDict, dataset: str, split: str,
                     pp: preprocess.Pipeline, num_classes: int | None, field: str,
                     split_field: str):
  """(builder, encoded, stored (H, W) or None) of `dataset` after checking it against the data
  node `config` (channels; `num_classes` unless None), `split` and `pp`; `field` names the
  config node in errors, `split_field` the split's field."""
  builder = sources.prepared_builder(dataset, config.data_dir)
  feature = builder.info.features["image"]
  shape = tuple(feature.shape)
  classes = builder.info.features["label"].num_classes
  if shape[-1] != config.channels:
    raise ValueError(f"data.channels={config.channels}, but {dataset} ({field}) images have "
                     f"{shape[-1]} channels")
  if num_classes is not None and classes != num_classes:
    raise ValueError(f"data.num_classes={num_classes}, but {dataset} ({field}) has {classes} "
                     f"classes")
  sources.check_split(builder, split, split_field)
  encoded = isinstance(feature, tfds.features.Image)
  stored = None if None in shape[:2] else shape[:2]
  pp.check_source(stored, encoded, dataset)
  return builder, encoded, stored


def _reader(config: ml_collections.ConfigDict, dataset: str, split: str, pp: preprocess.Pipeline,
            num_classes: int | None, field: str, split_field: str) -> readers.Reader:
  """A reader of `split` of `dataset`, checked as by `_checked_builder`."""
  builder, encoded, stored = _checked_builder(config, dataset, split, pp, num_classes, field,
                                              split_field)
  if encoded:
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return readers.StreamReader(source)
  return readers.make_reader(builder.as_data_source(split=split), bool(config.cache and stored))


def check_eval_source(config: ml_collections.ConfigDict, source: EvalSource) -> None:
  """ValueError (DatasetNotPreparedError for a dataset that is not there) naming `source.field`
  unless `eval_dataset(config, source)` can read it; reads no example."""
  pp = preprocess.eval_pipeline(source.pp, f"{source.field}.pp", config)
  try:
    _checked_builder(config, source.dataset, source.split, pp, source.num_classes, source.field,
                     f"{source.field}.{source.split_key}")
  except sources.DatasetNotPreparedError as e:
    raise sources.DatasetNotPreparedError(
        f"{source.field}.dataset={source.dataset!r}: {e}") from None


def process_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Rows `[start, stop)` of process `process_index` in a global batch of `batch_size *
  process_count` (`batch_size` per process)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  return process_index * batch_size, (process_index + 1) * batch_size


def eval_shard(n: int, process_index: int, process_count: int) -> np.ndarray:
  """Eval example indices of one process: a disjoint stride of `range(n)`."""
  process_rows(1, process_index, process_count)
  return np.arange(n)[process_index::process_count]


def train_batches(reader: readers.Reader, pp: preprocess.Pipeline, *, batch_size: int,
                  seed: int, process_index: int, process_count: int, what: str) -> grain.MapDataset:
  """Endless train batches of this process (`TrainBatches`); `what` names the split."""
  rows = process_rows(batch_size, process_index, process_count)
  global_batch = batch_size * process_count
  if global_batch > len(reader):
    raise ValueError(f"batch_size={batch_size} per process x {process_count} processes exceeds "
                     f"the {len(reader)} examples of {what}")
  if pp.mixes_pairs and batch_size % 2:
    raise ValueError(f"data.pp_train={pp.spec!r} mixes pairs of examples: the per-process "
                     f"batch size {batch_size} must be even")
  return grain.MapDataset.range(sys.maxsize).map(
      TrainBatches(reader, global_batch, rows, seed, pp))


def eval_batches(reader: readers.Reader, pp: preprocess.Pipeline, *, batch_size: int,
                 process_index: int, process_count: int) -> grain.MapDataset:
  """One pass of eval batches of this process (`EvalBatches`); every process gets the same
  number of batches."""
  shard = eval_shard(len(reader), process_index, process_count)
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  per_process = -(-len(reader) // process_count)  # the largest shard sets the batch count
  return grain.MapDataset.range(-(-per_process // batch_size)).map(
      EvalBatches(reader, shard, batch_size, pp))


def read_ahead(batches: grain.MapDataset, config: ml_collections.ConfigDict) -> grain.IterDataset:
  """`batches` with `data.prefetch_threads` / `data.prefetch_buffer` read-ahead and
  `data.num_workers` worker processes."""
  ds = batches.to_iter_dataset(grain.ReadOptions(num_threads=config.prefetch_threads,
                                                 prefetch_buffer_size=config.prefetch_buffer))
  if config.num_workers:
    if not flags.FLAGS.is_parsed():  # outside an absl app; grain's workers read absl flags
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
  return ds


def make_dataset(config: ml_collections.ConfigDict, split: str, *, batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, train: bool,
                 eval_pp: str = "") -> grain.DatasetIterator | grain.IterDataset:
  """Numpy batches of `split` of `data.name` for this process (see the module docstring).

  train=True: an endless iterator, reshuffled every epoch, `data.pp_train`, full batches.
  train=False: `eval_dataset` of `split` preprocessed by `eval_pp` (required), `seed` unused.
  Save `it.get_state()` in a checkpoint and call `set_state` on a fresh iterator built the same
  way to continue with the same batches.
  """
  if not train:
    if not eval_pp:
      raise ValueError("make_dataset(train=False) needs eval_pp, the evaluation's pp string")
    return eval_dataset(config, EvalSource(config.name, split, eval_pp, "eval_pp",
                                           config.num_classes), batch_size=batch_size,
                        process_index=process_index, process_count=process_count)
  config_lib.validate(config)
  pp = preprocess.train_pipeline(config)
  reader = _reader(config, config.name, split, pp, config.num_classes, "data", "data.train_split")
  batches = train_batches(reader, pp, batch_size=batch_size, seed=seed,
                          process_index=process_index, process_count=process_count,
                          what=f"{config.name}:{split}")
  return iter(read_ahead(batches, config))


def train_dataset(config: ml_collections.ConfigDict, *, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """`make_dataset` on `data.train_split`, train=True."""
  return make_dataset(config, config.train_split, batch_size=batch_size, seed=seed,
                      process_index=process_index, process_count=process_count, train=True)


def eval_dataset(config: ml_collections.ConfigDict, source: EvalSource, *, batch_size: int,
                 process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """One evaluation's batches: a re-iterable dataset (each `iter()` is one pass in order;
  readers are built once) of `source`'s split preprocessed by its pp string, the last batch
  padded with `mask` 0. `config` (the data node) gives data_dir, channels, image size,
  normalization and read-ahead."""
  config_lib.validate(config)
  pp = preprocess.eval_pipeline(source.pp, f"{source.field}.pp", config)
  reader = _reader(config, source.dataset, source.split, pp, source.num_classes, source.field,
                   f"{source.field}.{source.split_key}")
  return read_ahead(eval_batches(reader, pp, batch_size=batch_size, process_index=process_index,
                                 process_count=process_count), config)


def extended_dataset(reader: readers.Reader, pp: preprocess.Pipeline,
                     config: ml_collections.ConfigDict, extend, *, train: bool, batch_size: int,
                     seed: int, process_index: int, process_count: int,
                     what: str) -> grain.DatasetIterator | grain.IterDataset:
  """`make_dataset`'s batches of `reader` through `pp` (train: an endless iterator; else a
  re-iterable pass with `mask`), each passed through `extend(batch) -> batch` (e.g. the VQA
  pipelines, whose `label` holds rows, add their text by row), with `data.*` read-ahead."""
  if train:
    batches = train_batches(reader, pp, batch_size=batch_size, seed=seed,
                            process_index=process_index, process_count=process_count, what=what)
  else:
    batches = eval_batches(reader, pp, batch_size=batch_size, process_index=process_index,
                           process_count=process_count)
  ds = read_ahead(batches.map(extend), config)
  return iter(ds) if train else ds
