"""Fitting an INR model to a volume (MSE on intensities in [-1, 1] + router aux losses, Adam with
cosine decay, one jitted step) and rendering it back onto the voxel grid."""
from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from moe_jax import moe
from moe_jax.inr import sampling


def normalise(data: np.ndarray) -> tuple[np.ndarray, float, float]:
  """Volume -> (float32 values in [-1, 1], lo, hi)."""
  lo, hi = float(np.min(data)), float(np.max(data))
  scale = hi - lo if hi > lo else 1.0
  return (2.0 * (data.astype(np.float32) - lo) / scale - 1.0).astype(np.float32), lo, hi


def denormalise(values: np.ndarray, lo: float, hi: float, dtype: np.dtype) -> np.ndarray:
  """Inverse of `normalise`, rounded and clipped into `dtype` for integer volumes."""
  scale = hi - lo if hi > lo else 1.0
  out = (values.astype(np.float64) + 1.0) * 0.5 * scale + lo
  if np.dtype(dtype).kind in "iu":
    info = np.iinfo(dtype)
    out = np.clip(np.rint(out), info.min, info.max)
  return out.astype(dtype)


def fit(model: nnx.Module, layout: sampling.GridLayout, values: np.ndarray,
        tc: ml_collections.ConfigDict, log: Callable[[str], None] | None = None) -> dict:
  """Trains `model` in place on `values` (normalised volume) for `tc.steps` steps of
  `tc.batch_size` points. Returns {'train_s', 'final_mse' (mean of the last 10 steps)}."""
  model.train()
  schedule = optax.cosine_decay_schedule(tc.learning_rate, tc.steps, tc.final_lr_fraction)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(schedule)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, rest, opt_state, coords, target):
    def loss_fn(params):
      m = nnx.merge(graphdef, params, rest)
      pred, aux = moe.capture_aux(m)(coords)
      mse = jnp.mean((pred - target) ** 2)
      return mse + aux.total_loss, (mse, nnx.state(m, nnx.Not(nnx.Param)))
    grads, (mse, new_rest) = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_rest, opt_state, mse

  data = iter(sampling.batches(layout, values, tc.batch_size, tc.seed, tc.prefetch_threads))
  start, recent = time.perf_counter(), []
  for i in range(tc.steps):
    batch = next(data)
    params, rest, opt_state, mse = step(params, rest, opt_state, batch["coords"], batch["values"])
    if i >= tc.steps - 10:
      recent.append(mse)
    if log is not None and tc.log_every and (i + 1) % tc.log_every == 0:
      log(f"step {i + 1}/{tc.steps}  mse {float(mse):.3e}")
  recent = [float(m) for m in recent]
  nnx.update(model, params, rest)
  model.eval()
  return {"train_s": time.perf_counter() - start, "final_mse": float(np.mean(recent))}


def render(fn: Callable[[jax.Array], jax.Array], layout: sampling.GridLayout, chunk: int,
           dtype: np.dtype = np.float32) -> np.ndarray:
  """Evaluates `fn(coords [G, n, d]) -> [G, n]` at every voxel, `chunk` points per call in total:
  the volume of `layout.shape`, in `dtype`."""
  n = max(chunk // layout.num_groups, 1)
  jitted = jax.jit(fn)
  out = np.zeros(int(np.prod(layout.shape)), dtype)
  for start in range(0, layout.group_size, n):
    j = np.minimum(np.arange(start, start + n), layout.group_size - 1)  # fixed shape: one compile
    voxel, coords = layout.points(j)
    out[voxel] = np.asarray(jitted(coords))
  return out.reshape(tuple(layout.shape))
