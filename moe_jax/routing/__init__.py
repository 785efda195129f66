"""Routers: `x [G, S, D] -> RoutingPlan`. New router = one module + one `ROUTERS` entry."""
from __future__ import annotations

import ml_collections
from flax import nnx

from moe_jax.registry import Registry
from moe_jax.routing.plan import RoutingPlan

# router.name -> router class, imported on first use.
ROUTERS = Registry("router.name", {
    "top_k": "moe_jax.routing.top_k:TopKRouter",
    "expert_choice": "moe_jax.routing.expert_choice:ExpertChoiceRouter",
    "soft": "moe_jax.routing.soft:SoftRouter",
    "clusters": "moe_jax.routing.clusters:ClusterRouter",
    "hash": "moe_jax.routing.hashing:HashRouter",
    "random": "moe_jax.routing.random:RandomRouter",
})


def build_router(dim: int, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
  """The router named by `config.router.name`, for inputs of width `dim`."""
  return ROUTERS.get(config.router.name)(dim, config, rngs=rngs)


__all__ = ["RoutingPlan", "build_router", "ROUTERS"]
