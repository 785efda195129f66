"""Jitted train and eval steps with explicit in/out shardings, for any task's loss / eval sums."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_jax.parallel import sharding
from moe_jax.train.state import ModelDefs, TrainState

Batch = dict[str, jax.Array]


def make_train_step(defs: ModelDefs, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: jax.sharding.Mesh, shardings: TrainState,
                    task_loss: Callable[[nnx.Module, Batch], tuple[jax.Array, dict]]) -> Callable:
  """`step(state, batch) -> (state, metrics)`, jitted with the state donated.
  `task_loss(model, batch) -> (loss, metrics)` (a `Task.loss`). `metrics["train/finite"]` is 1
  when the loss, the gradient norm and every float array of the updated state are finite."""

  def step(state: TrainState, batch: Batch):
    def loss_fn(params):
      model = nnx.merge(defs.train, params, state.rest, copy=True)
      loss, metrics = task_loss(model, batch)
      rest = nnx.split(model, nnx.Param, ...)[2]
      return loss, (rest, metrics)

    (loss, (rest, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
    metrics["train/learning_rate"] = schedule(state.step)
    metrics["train/grad_norm"] = optax.tree.norm(grads)
    metrics["train/finite"] = all_finite((loss, metrics["train/grad_norm"], new))
    return new, metrics

  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def all_finite(tree) -> jax.Array:
  """float32 1 when every float array in `tree` is finite, else 0 (one per-leaf reduction)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all().astype(jnp.float32)


def make_eval_step(defs: ModelDefs, mesh: jax.sharding.Mesh, shardings: TrainState,
                   eval_sums: Callable[[nnx.Module, Batch], Any]) -> Callable:
  """`eval_step(params, rest, batch) -> sums`: `eval_sums(model, batch)` (a `Task.eval_sums`)
  of the eval-mode model, replicated."""

  def eval_step(params: nnx.State, rest: nnx.State, batch: Batch):
    return eval_sums(nnx.merge(defs.eval, params, rest, copy=True), batch)

  return jax.jit(eval_step,
                 in_shardings=(shardings.params, shardings.rest, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
