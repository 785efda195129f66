"""Routers: `x [G, S, D] -> RoutingPlan`. New router = one module + one entry in `ROUTER_CLASSES`."""
from __future__ import annotations

import importlib

import ml_collections
from flax import nnx

from moe_jax.routing.plan import RoutingPlan

# router.name -> "module:Class", imported on first use.
ROUTER_CLASSES = {
    "top_k": "moe_jax.routing.top_k:TopKRouter",
    "expert_choice": "moe_jax.routing.expert_choice:ExpertChoiceRouter",
    "soft": "moe_jax.routing.soft:SoftRouter",
    "clusters": "moe_jax.routing.clusters:ClusterRouter",
    "hash": "moe_jax.routing.hashing:HashRouter",
    "random": "moe_jax.routing.random:RandomRouter",
}


def build_router(dim: int, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
  """The router named by `config.router.name`, for inputs of width `dim`."""
  name = config.router.name
  if name not in ROUTER_CLASSES:
    raise ValueError(f"MoE config: router.name={name!r} is not implemented; available: "
                     f"{sorted(ROUTER_CLASSES)}")
  module, cls = ROUTER_CLASSES[name].split(":")
  return getattr(importlib.import_module(module), cls)(dim, config, rngs=rngs)


__all__ = ["RoutingPlan", "build_router", "ROUTER_CLASSES"]
