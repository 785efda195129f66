"""Jitted train and eval steps with explicit in/out shardings."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_jax import moe
from moe_jax.parallel import sharding
from moe_jax.train.state import ModelDefs, TrainState


def moe_scalars(aux: moe.AuxOutputs, prefix: str) -> dict[str, jax.Array]:
  """Aux losses and routing metrics of every MoE layer as scalars (`{prefix}/moe/<layer>/<name>`).

  Vector metrics (load histograms) are summarised by their coefficient of variation.
  """
  out = {}
  for layer, a in aux.layers.items():
    for name, value in {**a.losses, **a.metrics}.items():
      value = jnp.asarray(value, jnp.float32)
      if value.ndim:
        value, name = jnp.std(value) / (jnp.mean(value) + 1e-9), f"{name}_cv"
      out[f"{prefix}/moe/{layer}/{name}"] = value
  if aux.layers:
    out[f"{prefix}/aux_loss"] = aux.total_loss
  return out


def classification_loss(model: nnx.Module, batch: dict[str, jax.Array]):
  """(loss, metrics): cross-entropy of `model(batch["image"])` vs `batch["label"]` + MoE aux."""
  logits, aux = moe.capture_aux(model)(batch["image"])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  metrics = {"train/loss": ce + aux.total_loss, "train/ce_loss": ce,
             "train/accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
             **moe_scalars(aux, "train")}
  return ce + aux.total_loss, metrics


def make_train_step(defs: ModelDefs, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: jax.sharding.Mesh, shardings: TrainState,
                    task_loss: Callable = classification_loss) -> Callable:
  """`step(state, batch) -> (state, metrics)`, jitted with the state donated.
  `task_loss(model, batch) -> (loss, metrics)` (default: classification)."""

  def step(state: TrainState, batch: dict[str, jax.Array]):
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
                   num_classes: int) -> Callable:
  """`eval_step(state, batch) -> (sums, routing)`: sums of loss, top-1/top-5 hits and count;
  per MoE layer the routing metrics times the real-example count and the class x expert matrix
  `[num_classes, E]` of routing mass (padding examples masked out)."""

  def eval_step(state: TrainState, batch: dict[str, jax.Array]):
    model = nnx.merge(defs.eval, state.params, state.rest, copy=True)
    logits, aux = moe.capture_aux(model)(batch["image"])
    mask, labels = batch["mask"], batch["label"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    n = jnp.sum(mask)
    sums = {"loss": jnp.sum(ce * mask), "top1": jnp.sum((top5[:, 0] == labels) * mask),
            "top5": jnp.sum(jnp.any(top5 == labels[:, None], -1) * mask), "count": n}
    classes = jax.nn.one_hot(labels, num_classes) * mask[:, None]
    routing = {layer: {"metrics": {k: jnp.asarray(v, jnp.float32) * n for k, v in a.metrics.items()},
                       "class_expert": classes.T @ a.example_load}
               for layer, a in aux.layers.items()}
    return sums, routing

  return jax.jit(eval_step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
