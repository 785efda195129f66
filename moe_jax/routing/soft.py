"""Soft MoE router (Puigcerver et al. 2023): every slot is a convex mix of the group's tokens."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moe_jax.routing import losses
from moe_jax.routing.base import Router, fail
from moe_jax.routing.plan import RoutingPlan


def _l2_normalize(x: jax.Array, axis: int) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + 1e-6)


class SoftRouter(Router):
  """`x [G, S, D] -> plan` with dispatch (softmax over tokens) and combine (softmax over slots)
  weights `[G, S, E, P]`; logits = scale * l2n(x) . l2n(Phi), Phi `[D, E*P]`. No aux loss."""

  plan_kind = "soft"

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(soft=dict(slots_per_expert=1)))  # P slots per expert

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict) -> None:
    slots = config.router.soft.slots_per_expert
    if slots < 1:
      fail("router.soft.slots_per_expert", f"={slots} must be >= 1")

  def __init__(self, dim: int, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.num_experts = config.num_experts
    self.slots = config.router.soft.slots_per_expert
    self.phi = nnx.Param(jax.random.normal(rngs.params(), (dim, self.num_experts * self.slots),
                                           jnp.float32) / jnp.sqrt(dim))
    self.scale = nnx.Param(jnp.ones((), jnp.float32))
    self.deterministic = False

  def __call__(self, x: jax.Array) -> RoutingPlan:
    G, S, _ = x.shape
    E, P = self.num_experts, self.slots
    logits = self.scale[...] * jnp.einsum("gsd,dm->gsm", _l2_normalize(x.astype(jnp.float32), -1),
                                          _l2_normalize(self.phi[...], 0))
    dispatch = jax.nn.softmax(logits, axis=1).reshape(G, S, E, P)
    combine = jax.nn.softmax(logits, axis=2)
    return RoutingPlan(
        kind="soft", num_experts=E, dispatch_weights=dispatch,
        combine_weights=combine.reshape(G, S, E, P),
        metrics={"load": jnp.full((E,), 1.0 / E), "router_entropy": losses.router_entropy(combine),
                 "dispatch_entropy": losses.router_entropy(jnp.swapaxes(dispatch.reshape(
                     G, S, E * P), 1, 2))})
