"""Prefetch to device: global batches placed on the devices `depth` steps ahead of the step.

`DevicePrefetch(iterator, sharding, depth)` wraps a host iterator of this process's numpy
batches (`moe_jax.data.make_dataset(..., train=True)`): each `next()` returns the global batch
(`jax.Array`s sharded by `sharding`, built from every process's rows with
`jax.make_array_from_process_local_data`, as `moe_jax.parallel.distributed.global_batch`)
and, before returning it, starts the host-to-device copies of the following `depth` batches, so
they run while the current step computes (JAX dispatches copies and steps asynchronously; as
`flax.jax_utils.prefetch_to_device` and vmoe's `prefetch_device`). `depth=0`: no read-ahead,
each batch is copied when it is asked for. Host-side read-ahead (decoding, augmentation) is the
grain pipeline's (`data.prefetch_threads`, `data.prefetch_buffer`, `data.num_workers`).

Resume: `get_state()` is the host iterator's state after the last batch *returned* (not after
the ones queued ahead), so a checkpoint taken between steps restarts at the next unused batch
whatever the depth; `set_state()` drops the queue and repositions the host iterator.
"""
from __future__ import annotations

import collections
import copy
from typing import Any, Iterator

import jax

from moe_jax.parallel import distributed


class DevicePrefetch:
  """Iterator of global device batches, `depth` (>= 0) of them copied ahead."""

  def __init__(self, iterator: Iterator[Any], sharding: jax.sharding.Sharding, depth: int):
    if not isinstance(depth, int) or depth < 0:
      raise ValueError(f"data.device_prefetch={depth!r} must be an integer >= 0 (0 = no "
                       "prefetch to device)")
    self._iterator, self._sharding, self._depth = iterator, sharding, depth
    self._queue: collections.deque = collections.deque()  # (global batch, host state after it)
    self._state = copy.deepcopy(iterator.get_state())

  def __iter__(self) -> "DevicePrefetch":
    return self

  def _put_next(self) -> None:
    local = next(self._iterator)
    self._queue.append((distributed.global_batch(local, self._sharding),
                        copy.deepcopy(self._iterator.get_state())))

  def __next__(self) -> Any:
    while len(self._queue) <= self._depth:  # the batch to return + `depth` ahead
      self._put_next()
    batch, self._state = self._queue.popleft()
    return batch

  def get_state(self) -> Any:
    """The host iterator's state after the last returned batch."""
    return copy.deepcopy(self._state)

  def set_state(self, state: Any) -> None:
    self._queue.clear()
    self._iterator.set_state(state)
    self._state = copy.deepcopy(state)
