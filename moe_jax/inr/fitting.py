"""Fitting INR models to the chunks of a volume, a batch of chunks at a time.

Each chunk has its own model (same config, own parameters); the parameters of a batch of B
chunks are stacked on a leading axis and one step (`jax.vmap` of the single-model step: MSE on
intensities in [-1, 1] + router aux losses, Adam with cosine decay) trains all B at once. The
points of a step are drawn on the device from the batch's cells (`sampling.CellSampler`: the
targets live on the device, the host sends only the point indices), and one jitted call runs
`train.steps_per_call` steps (`lax.scan`), so the host dispatches once per call, not per step.
The compiled call is cached on (model structure, schedule, cell block, shapes): every seed and
every file with the same widths reuses it.
"""
from __future__ import annotations

import functools
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


def _optimizer(learning_rate: float, steps: int, final_lr_fraction: float
               ) -> optax.GradientTransformation:
  return optax.adam(optax.cosine_decay_schedule(learning_rate, steps, final_lr_fraction))


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3, 4, 5))
def _train_steps(graphdef: nnx.GraphDef, schedule: tuple[float, int, float],
                 block: tuple[int, ...], params: nnx.State, rest: nnx.State,
                 opt_state: optax.OptState, values: jax.Array, extent: jax.Array,
                 indices: jax.Array, run: jax.Array):
  """Up to K training steps of B stacked chunk models: targets `values [B, G, S]`, cell
  `extent [B, G, d]`, point indices `indices [K, b]`; step k runs where `run [K]` (bool) is
  true and is skipped otherwise (a short last call). -> (params, rest, opt_state, mse [K, B];
  0 for skipped steps)."""
  tx = _optimizer(*schedule)

  def step(params, rest, opt_state, coords, target):
    def loss_fn(params):
      m = nnx.merge(graphdef, params, rest)
      pred, aux = moe.capture_aux(m)(coords)
      mse = jnp.mean((pred - target) ** 2)
      return mse + aux.total_loss, (mse, nnx.state(m, nnx.Not(nnx.Param)))
    grads, (mse, new_rest) = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_rest, opt_state, mse

  def body(carry, xs):
    j, ok = xs

    def train(carry):
      coords = sampling.cell_coords(j, block, extent)  # [B, G, b, d]
      *carry, mse = jax.vmap(step)(*carry, coords, values[:, :, j])
      return tuple(carry), mse

    return jax.lax.cond(ok, train, lambda carry: (carry, jnp.zeros(values.shape[:1])), carry)

  (params, rest, opt_state), mse = jax.lax.scan(body, (params, rest, opt_state), (indices, run))
  return params, rest, opt_state, mse


class ChunkFitter:
  """Trains batches of chunk models of config `c` (widths solved) on `ndim`-d coordinates.

  `fit(chunks [B], sampler)` -> stacked parameters (leading axis B, the `nnx.Param` state of the
  model) and the per-chunk mean MSE of the last 10 steps.
  """

  def __init__(self, c: ml_collections.ConfigDict, ndim: int, tc: ml_collections.ConfigDict):
    if tc.steps_per_call < 1:
      raise ValueError(f"train.steps_per_call={tc.steps_per_call} must be >= 1 (training steps "
                       "per jitted call)")
    self.tc = tc
    abstract = nnx.eval_shape(lambda: model_lib.build(c, ndim, rngs=nnx.Rngs(0)))
    abstract.train()
    self.graphdef = nnx.split(abstract, nnx.Param, ...)[0]
    self.schedule = (float(tc.learning_rate), int(tc.steps), float(tc.final_lr_fraction))

    def init(key):
      m = model_lib.build(c, ndim, rngs=nnx.Rngs(key))
      m.train()
      return nnx.split(m, nnx.Param, ...)[1:]

    self._init_one, self._init_opt = init, jax.vmap(_optimizer(*self.schedule).init)

  def _init(self, chunks: np.ndarray) -> tuple[nnx.State, nnx.State]:
    """Stacked (params, rest) of chunks `[B]`, chunk k from key `fold_in(key(seed), k)` (so its
    init does not depend on its batch). Built eagerly, one model at a time: compiling the init
    (vmapped or not) costs more than B small eager builds."""
    states = [self._init_one(jax.random.fold_in(jax.random.key(self.tc.seed), int(k)))
              for k in chunks]
    return jax.tree.map(lambda *x: jnp.stack(x), *states)

  def fit(self, chunks: np.ndarray, sampler: sampling.CellSampler,
          on_call: Callable[[int, int, np.ndarray], None] | None = None
          ) -> tuple[nnx.State, np.ndarray]:
    """Trains chunks `[B]` for `tc.steps` steps of `sampler`'s points (its cells: those of the
    chunks); `on_call(steps done, steps in this call, mse [B] of its last step)` after each
    jitted call."""
    params, rest = self._init(chunks)
    opt_state = self._init_opt(params)
    values, extent = jnp.asarray(sampler.values), jnp.asarray(sampler.extent)
    steps, K = self.tc.steps, min(self.tc.steps_per_call, self.tc.steps)
    recent = []
    for first in range(0, steps, K):
      count = min(K, steps - first)
      params, rest, opt_state, mse = _train_steps(
          self.graphdef, self.schedule, sampler.block, params, rest, opt_state, values, extent,
          np.pad(sampler.indices(first, count), ((0, K - count), (0, 0))), np.arange(K) < count)
      mse = np.asarray(mse[:count])
      recent = (recent + list(mse))[-10:]
      if on_call is not None:
        on_call(first + count, count, mse[-1])
    return params, np.mean(np.stack(recent), axis=0)


def sampler_for(layout: sampling.GridLayout, cells: np.ndarray, data: np.ndarray, lo: float,
                hi: float, tc: ml_collections.ConfigDict, seed: int) -> sampling.CellSampler:
  """The `sampling.CellSampler` of `cells [B, G]` with `tc.batch_size` points per chunk and
  step (split evenly over the chunk's G cells)."""
  per_group = max(tc.batch_size // cells.shape[1], 1)
  return sampling.CellSampler(layout, data, lo, hi, per_group, seed, cells)
