"""The one channel through which MoE aux losses and routing metrics leave a model.

Every `MoELayer` records a `LayerAux` when run under `capture_aux`; nothing is stored otherwise.

    forward = moe_jax.moe.capture_aux(model)          # or capture_aux(fn) with fn(model, ...)
    logits, aux = forward(images)
    loss = task_loss + aux.total_loss                  # weighted by each layer's config
    aux.layers["blocks/3/mlp"].metrics["dropped_fraction"]
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct


class MoEAux(nnx.Intermediate):
  """Variable type of the values MoE layers sow."""


@struct.dataclass
class LayerAux:
  losses: dict[str, jax.Array]  # unweighted aux losses of the layer
  weighted_loss: jax.Array  # sum of losses times config.router.loss_weights
  metrics: dict[str, jax.Array]  # routing statistics (scalars, load histograms, ...)
  example_load: jax.Array  # [B, E]: share of each example's routing mass per expert
  # [B, E + 1]: an example's tokens (images, per-image routing) by main expert (column E: no
  # expert); `RoutingPlan.primary_expert`.
  example_tokens: jax.Array | None = None


@struct.dataclass
class AuxOutputs:
  total_loss: jax.Array  # sum of every layer's weighted_loss (0 without MoE layers)
  layers: dict[str, LayerAux]  # by module path, e.g. "blocks/3/mlp"


def record(module: nnx.Module, value: LayerAux) -> None:
  """Sows `value` on `module` when an enclosing `capture_aux` is collecting; else does nothing."""
  if hasattr(module, "__captures__"):
    module.sow(MoEAux, "moe_aux", value)


def _collect(state: nnx.State) -> AuxOutputs:
  layers: dict[str, LayerAux] = {}
  for path, value in nnx.to_flat_state(state):
    calls = value.get_value() if isinstance(value, nnx.Variable) else value
    prefix = "/".join(str(p) for p in path[:-1])
    for i, layer_aux in enumerate(calls):  # a layer called several times sows several values
      layers[prefix if len(calls) == 1 else f"{prefix}#{i}"] = layer_aux
  total = sum((a.weighted_loss for a in layers.values()), jnp.zeros((), jnp.float32))
  return AuxOutputs(total_loss=total, layers=layers)


def capture_aux(fn: nnx.Module | Callable[..., Any]) -> Callable[..., tuple[Any, AuxOutputs]]:
  """Wraps a module (or `fn(module, *args)`) so calls return `(output, AuxOutputs)`."""
  captured = nnx.capture(fn, MoEAux)

  def wrapped(*args, **kwargs):
    out, state = captured(*args, **kwargs)
    return out, _collect(state)

  return wrapped
