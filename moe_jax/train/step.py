"""Jitted train and eval steps with explicit in/out shardings, for any task's loss / eval sums."""
from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from flax import nnx

from moe_jax.parallel import sharding
from moe_jax.train.state import ModelDefs, TrainState

Batch = dict[str, jax.Array]


def make_train_step(defs: ModelDefs, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: jax.sharding.Mesh, shardings: TrainState,
                    task_loss: Callable[[nnx.Module, Batch], tuple[jax.Array, dict]]) -> Callable:
  """`step(state, batch) -> (state, metrics)`, jitted with the state donated.
  `task_loss(model, batch) -> (loss, metrics)` (a `Task.loss`)."""

  def step(state: TrainState, batch: Batch):
    def loss_fn(params):
      model = nnx.merge(defs.train, params, state.rest, copy=True)
      loss, metrics = task_loss(model, batch)
      rest = nnx.split(model, nnx.Param, ...)[2]
      return loss, (rest, metrics)

    (_, (rest, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["train/learning_rate"] = schedule(state.step)
    metrics["train/grad_norm"] = optax.tree.norm(grads)
    return TrainState(step=state.step + 1, params=params, rest=rest, opt_state=opt_state), metrics

  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(defs: ModelDefs, mesh: jax.sharding.Mesh, shardings: TrainState,
                   eval_sums: Callable[[nnx.Module, Batch], Any]) -> Callable:
  """`eval_step(state, batch) -> sums`: `eval_sums(model, batch)` (a `Task.eval_sums`) of the
  eval-mode model, replicated."""

  def eval_step(state: TrainState, batch: Batch):
    return eval_sums(nnx.merge(defs.eval, state.params, state.rest, copy=True), batch)

  return jax.jit(eval_step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
