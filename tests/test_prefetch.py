"""Prefetch to device (`moe_jax.train.prefetch`): the same batches in the same order at any depth,
on the batch sharding, copied ahead, and a saved state resumes at the next unused batch."""
from __future__ import annotations

import grain
import jax
import ml_collections
import numpy as np
import pytest

from moe_jax import data
from moe_jax.parallel import mesh as mesh_lib, sharding
from moe_jax.train import loop, prefetch


class Built:
  """Host batch `i`: {'image': [16, 2] random with seed i, 'label': [16] = i}; counts the builds."""

  def __init__(self):
    self.count = 0

  def __call__(self, i):
    self.count += 1
    return {"image": np.random.default_rng(i).normal(size=(16, 2)).astype(np.float32),
            "label": np.full((16,), i, np.int32)}


def host_iterator(build=None):
  """A grain iterator like the trainer's (resumable with get_state / set_state), no read-ahead."""
  ds = grain.MapDataset.range(10_000).map(build or Built())
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


@pytest.fixture(scope="module")
def batch_sharding():
  c = mesh_lib.default_config()
  c.data, c.expert = 4, 2
  return sharding.batch_sharding(mesh_lib.build_mesh(c, num_experts=2, global_batch=16))


def host(i):
  return Built()(i)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_batches_in_order_on_the_batch_sharding(batch_sharding, depth):
  it = prefetch.DevicePrefetch(host_iterator(), batch_sharding, depth)
  for i in range(6):
    batch = next(it)
    for k, want in host(i).items():
      assert isinstance(batch[k], jax.Array) and batch[k].sharding == batch_sharding
      np.testing.assert_array_equal(np.asarray(batch[k]), want, err_msg=f"batch {i} {k}")


def test_depth_batches_are_copied_ahead(batch_sharding):
  build = Built()
  it = prefetch.DevicePrefetch(host_iterator(build), batch_sharding, 3)
  assert build.count == 0  # nothing read before the first step asks
  next(it)
  assert build.count == 1 + 3  # the returned batch and 3 queued on the devices
  next(it)
  assert build.count == 2 + 3
  assert len(it._queue) == 3 and all(
      b["label"].sharding == batch_sharding for b, _ in it._queue)


@pytest.mark.parametrize("depth, resumed_depth", [(3, 0), (0, 2)])
def test_saved_state_resumes_at_the_next_unused_batch(batch_sharding, depth, resumed_depth):
  it = prefetch.DevicePrefetch(host_iterator(), batch_sharding, depth)
  for _ in range(5):
    next(it)
  state = it.get_state()  # 5 batches used, `depth` more already read from the host iterator
  next(it)  # consuming more does not change a state already taken
  resumed = prefetch.DevicePrefetch(host_iterator(), batch_sharding, resumed_depth)
  resumed.set_state(state)
  for i in range(5, 9):
    np.testing.assert_array_equal(np.asarray(next(resumed)["label"]), host(i)["label"])
  it.set_state(state)  # set_state drops the queued batches
  np.testing.assert_array_equal(np.asarray(next(it)["label"]), host(5)["label"])


@pytest.mark.parametrize("depth", [-1, 1.5])
def test_bad_depth_is_a_one_line_error(batch_sharding, depth):
  with pytest.raises(ValueError, match=r"^data.device_prefetch=.* must be an integer >= 0 "
                                       r"\(0 = no prefetch to device\)$"):
    prefetch.DevicePrefetch(host_iterator(), batch_sharding, depth)


def test_data_node_validates_the_depth_and_the_trainer_needs_the_field():
  c = data.default_config()
  assert c.device_prefetch == 2
  c.device_prefetch = -1
  with pytest.raises(ValueError, match=r"^data.device_prefetch=-1 must be >= 0$"):
    data.config.validate(c)
  config = ml_collections.ConfigDict(dict(
      seed=0, batch_size=8, total_steps=1, log_every_steps=1, evals={},
      checkpoint_every_steps=0, model={}, data={"name": "x"}, optimizer={}, mesh={}))
  with pytest.raises(ValueError, match=r"^config.data.device_prefetch is missing: add it"):
    loop.validate_config(config)
