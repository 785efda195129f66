"""Jitted train and eval steps with explicit in/out shardings, for any task's loss / eval sums."""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from moe_jax.parallel import distributed, grad_precision, sharding
from moe_jax.train.state import ModelDefs, TrainState

Batch = dict[str, jax.Array]


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's part of the batch -> global arrays sharded over the batch axes."""
  return distributed.global_batch(local, sharding.batch_sharding(mesh))


def check_batch_size(mesh: jax.sharding.Mesh, size: int, field: str) -> None:
  """ValueError naming `field` unless a global batch of `size` splits over the mesh's batch
  axes and the processes."""
  axes = sharding.batch_sharding(mesh).spec[0]
  shards = math.prod(mesh.shape[a] for a in axes)
  if size < 1 or size % shards or size % jax.process_count():
    raise ValueError(f"{field}={size} must be a positive multiple of the {shards} batch shards "
                     f"(mesh axes {'*'.join(axes)} = {'*'.join(str(mesh.shape[a]) for a in axes)})"
                     f" and of the {jax.process_count()} processes")


def make_train_step(defs: ModelDefs, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: jax.sharding.Mesh, shardings: TrainState,
                    task_loss: Callable[[nnx.Module, Batch], tuple[jax.Array, dict]], *,
                    grad_accum_steps: int = 1, ema_decay: float = 0.0,
                    grad_reduce_dtype: str = "float32") -> Callable:
  """`step(state, batch) -> (state, metrics)`, jitted with the state donated.
  `task_loss(model, batch) -> (loss, metrics)` (a `Task.loss`). `metrics["train/finite"]` is 1
  when the loss, the gradient norm and every float array of the updated state are finite.

  `grad_accum_steps` = A > 1: the batch `[B, ...]` is cut into A micro-batches `[B / A, ...]`
  (micro-batch j = examples j, A + j, 2A + j, ..., so each stays spread over the same batch
  shards without moving data) run one after another by a `lax.scan`; the gradient and every
  metric are the means over the micro-batches, which for a per-example-mean loss is the big
  batch's gradient (up to float rounding). The model's other state (RNG streams, router step
  counters) advances once per micro-batch. For MoE models the routing differs from the big
  batch: routing groups, expert capacity and the aux losses are per micro-batch, so the result
  equals the big batch's only when nothing is dropped and the aux losses are linear in the
  batch (mean over groups).

  `ema_decay` = d > 0: `state.ema = d * state.ema + (1 - d) * params` after the update.

  `grad_reduce_dtype` (`mesh.grad_reduce_dtype`): the dtype the gradients of a low-precision
  model are summed over the batch shards in, "float32" or "bfloat16"
  (`moe_jax.parallel.grad_precision`)."""
  grad_precision.check(grad_reduce_dtype)
  def grads_of(params: nnx.State, rest: nnx.State, batch: Batch):
    def loss_fn(params):
      model = nnx.merge(defs.train, params, rest, copy=True)
      loss, metrics = task_loss(model, batch)
      return loss, (nnx.split(model, nnx.Param, ...)[2], metrics)

    with grad_precision.reduce_in(grad_reduce_dtype):
      (loss, (rest, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, rest, metrics

  def accumulated(params: nnx.State, rest: nnx.State, batch: Batch):
    micro = {k: micro_batches(x, grad_accum_steps, mesh) for k, x in batch.items()}

    def body(carry, batch_j):
      grad_sum, rest = carry
      loss, grads, rest, metrics = grads_of(params, rest, batch_j)
      return (jax.tree.map(jnp.add, grad_sum, grads), rest), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grad_sum, rest), (losses, metrics) = jax.lax.scan(body, (zeros, rest), micro)
    return (jnp.mean(losses), jax.tree.map(lambda g: g / grad_accum_steps, grad_sum), rest,
            jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics))

  def step(state: TrainState, batch: Batch):
    loss, grads, rest, metrics = (accumulated if grad_accum_steps > 1 else grads_of)(
        state.params, state.rest, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema_decay:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
    new = TrainState(step=state.step + 1, params=params, rest=rest, opt_state=opt_state, ema=ema)
    metrics["train/learning_rate"] = schedule(state.step)
    metrics["train/grad_norm"] = optax.tree.norm(grads)
    metrics["train/finite"] = all_finite((loss, metrics["train/grad_norm"], new))
    return new, metrics

  if bool(ema_decay) != (shardings.ema is not None):
    raise ValueError(f"optimizer.ema_decay={ema_decay} but the train state "
                     f"{'has no' if shardings.ema is None else 'has an'} EMA: build the state "
                     "from the same optimizer config")
  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def options(optimizer: ml_collections.ConfigDict) -> dict:
  """The `make_train_step` keyword arguments that the `optimizer` config node sets."""
  return dict(grad_accum_steps=optimizer.grad_accum_steps, ema_decay=optimizer.ema_decay)


def micro_batches(x: jax.Array, count: int, mesh: jax.sharding.Mesh) -> jax.Array:
  """`[B, ...]` -> `[count, B / count, ...]`, micro-batch j = rows j, count + j, 2 count + j, ...
  (each micro-batch keeps the batch sharding of its rows: no data moves)."""
  if x.shape[0] % count:
    raise ValueError(f"batch of {x.shape[0]} does not split into optimizer.grad_accum_steps="
                     f"{count} micro-batches")
  x = jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
  spec = jax.sharding.PartitionSpec(None, sharding.batch_axes(mesh))
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


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


def make_features_step(defs: ModelDefs, mesh: jax.sharding.Mesh,
                       shardings: TrainState) -> Callable:
  """`features_step(params, rest, batch) -> (features float32 [B, D], label [B], mask [B])`:
  the eval-mode model's pre-logits representation (`model.features`: ViT / ViMoE pooled tokens,
  ConvNeXt pooled map) of `batch["image"]`, with the batch's labels and mask, replicated."""

  def features_step(params: nnx.State, rest: nnx.State, batch: Batch):
    model = nnx.merge(defs.eval, params, rest, copy=True)
    return (model.features(batch["image"]).astype(jnp.float32), batch["label"], batch["mask"])

  return jax.jit(features_step,
                 in_shardings=(shardings.params, shardings.rest, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
