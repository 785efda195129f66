"""Fitting INR models to the chunks of a volume, a batch of chunks at a time.

Each chunk has its own model (same config, own parameters); the parameters of a batch of B
chunks are stacked on a leading axis and one jitted step (`jax.vmap` of the single-model step:
MSE on intensities in [-1, 1] + router aux losses, Adam with cosine decay) trains all B at once.
Coordinates and targets come from `sampling.batches`, per step, for the batch's chunks only.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from moe_jax import moe
from moe_jax.inr import model as model_lib, sampling


def denormalise(values: np.ndarray, lo: float, hi: float, dtype: np.dtype) -> np.ndarray:
  """Inverse of `sampling.to_unit`, rounded and clipped into `dtype` for integer volumes."""
  scale = hi - lo if hi > lo else 1.0
  out = (values.astype(np.float64) + 1.0) * 0.5 * scale + lo
  if np.dtype(dtype).kind in "iu":
    info = np.iinfo(dtype)
    out = np.clip(np.rint(out), info.min, info.max)
  return out.astype(dtype)


class ChunkFitter:
  """Trains batches of chunk models of config `c` (widths solved) on `ndim`-d coordinates.

  `fit(chunks [B], batches)` -> stacked parameters (leading axis B, the `nnx.Param` state of the
  model) and the per-chunk mean MSE of the last 10 steps. Built once per volume: the init and the
  step compile once for every batch of B chunks.
  """

  def __init__(self, c: ml_collections.ConfigDict, ndim: int, tc: ml_collections.ConfigDict):
    self.tc = tc
    abstract = nnx.eval_shape(lambda: model_lib.build(c, ndim, rngs=nnx.Rngs(0)))
    abstract.train()
    self.graphdef = nnx.split(abstract, nnx.Param, ...)[0]
    tx = optax.adam(optax.cosine_decay_schedule(tc.learning_rate, tc.steps,
                                                tc.final_lr_fraction))

    def init(key):
      m = model_lib.build(c, ndim, rngs=nnx.Rngs(key))
      m.train()
      return nnx.split(m, nnx.Param, ...)[1:]

    def step(params, rest, opt_state, coords, target):
      def loss_fn(params):
        m = nnx.merge(self.graphdef, params, rest)
        pred, aux = moe.capture_aux(m)(coords)
        mse = jnp.mean((pred - target) ** 2)
        return mse + aux.total_loss, (mse, nnx.state(m, nnx.Not(nnx.Param)))
      grads, (mse, new_rest) = jax.grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), new_rest, opt_state, mse

    self._init_one, self._init_opt = init, jax.vmap(tx.init)
    self._step = jax.jit(jax.vmap(step), donate_argnums=(0, 1, 2))

  def _init(self, chunks: np.ndarray) -> tuple[nnx.State, nnx.State]:
    """Stacked (params, rest) of chunks `[B]`, chunk k from key `fold_in(key(seed), k)` (so its
    init does not depend on its batch). Built eagerly, one model at a time: compiling the init
    (vmapped or not) costs more than B small eager builds."""
    states = [self._init_one(jax.random.fold_in(jax.random.key(self.tc.seed), int(k)))
              for k in chunks]
    return jax.tree.map(lambda *x: jnp.stack(x), *states)

  def fit(self, chunks: np.ndarray, batches, on_step: Callable[[int, float], None] | None = None
          ) -> tuple[nnx.State, np.ndarray]:
    """Trains chunks `[B]` for `tc.steps` steps of `batches` (`{'coords' [B, G, b, d],
    'values' [B, G, b]}`); `on_step(step, mean mse over the batch)` after each step."""
    params, rest = self._init(chunks)
    opt_state = self._init_opt(params)
    data, recent = iter(batches), []
    for i in range(self.tc.steps):
      batch = next(data)
      params, rest, opt_state, mse = self._step(params, rest, opt_state, batch["coords"],
                                                batch["values"])
      if i >= self.tc.steps - 10:
        recent.append(mse)
      if on_step is not None:
        on_step(i + 1, mse)
    return params, np.mean(np.stack([np.asarray(m) for m in recent]), axis=0)


def training_batches(layout: sampling.GridLayout, cells: np.ndarray, data: np.ndarray,
                     lo: float, hi: float, tc: ml_collections.ConfigDict, seed: int):
  """`sampling.batches` of `tc.batch_size` points per chunk and step (split evenly over the
  chunk's `cells [B, G]`)."""
  per_group = max(tc.batch_size // cells.shape[1], 1)
  return sampling.batches(layout, data, lo, hi, per_group, seed, cells, tc.prefetch_threads)
