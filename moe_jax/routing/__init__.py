"""Routers: `x [G, S, D] -> RoutingPlan`. A new router is one module plus one `ROUTERS` line.

The module defines a `Router` subclass (`TokenChoiceRouter` for token-choice plans) that owns
its `plan_kind`, its `loss_weights` (every aux loss it returns -> paper weight), its
`default_config()` (the `config.router` knobs it reads) and its `validate(config)` (errors
through `fail(field, msg)`); then

    ROUTERS.register("mine", "my_pkg.my_router:MyRouter")   # or the class itself

and `moe.default_config("mine")` builds a layer config for it. A router instance can also be
handed to the layer: `MoELayer(dim, config, rngs=rngs, router=MyRouter(dim, config, rngs=rngs))`.
"""
from __future__ import annotations

import ml_collections
from flax import nnx

from moe_jax.registry import Registry
from moe_jax.routing.base import Router, TokenChoiceRouter, fail
from moe_jax.routing.plan import RoutingPlan

# router.name -> `Router` subclass, imported on first use.
ROUTERS = Registry("router.name", {
    "top_k": "moe_jax.routing.top_k:TopKRouter",
    "expert_choice": "moe_jax.routing.expert_choice:ExpertChoiceRouter",
    "soft": "moe_jax.routing.soft:SoftRouter",
    "clusters": "moe_jax.routing.clusters:ClusterRouter",
    "hash": "moe_jax.routing.hashing:HashRouter",
    "random": "moe_jax.routing.random:RandomRouter",
})


def build_router(dim: int, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> Router:
  """The router named by `config.router.name`, for inputs of width `dim`."""
  return ROUTERS.get(config.router.name)(dim, config, rngs=rngs)


__all__ = ["RoutingPlan", "Router", "TokenChoiceRouter", "fail", "build_router", "ROUTERS"]
