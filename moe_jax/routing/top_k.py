"""Token-choice top-k router (V-MoE noisy gating, Switch/GShard), with Batch Prioritized Routing."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moe_jax.routing import losses, ops
from moe_jax.routing.base import TokenChoiceRouter, fail
from moe_jax.routing.plan import RoutingPlan


def token_choice_plan(gates: jax.Array, logits: jax.Array, k: int, renormalize: bool,
                      bpr: bool) -> RoutingPlan:
  """Top-k of `gates [G, S, E]` as a token-choice plan, with routing metrics.

  BPR priority is the token's largest raw gate `max_e gates` (V-MoE), taken before any
  renormalisation of the k weights; without BPR tokens are served in order.
  """
  weights, index = ops.top_k(gates, k)
  priority = weights[..., 0] if bpr else None
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  E = gates.shape[-1]
  return RoutingPlan(
      kind="token_choice", num_experts=E, expert_index=index.astype(jnp.int32),
      combine_weights=weights, priority=priority,
      metrics={"load": losses.assignment_load(index, E),
               "router_entropy": losses.router_entropy(gates)})


def token_choice_plan_config() -> ml_collections.ConfigDict:
  """`router.k`, `router.renormalize`, `router.bpr`: the knobs of `token_choice_plan`."""
  c = TokenChoiceRouter.default_config()
  c.renormalize = False  # Renormalise the k selected weights to sum to 1.
  c.bpr = True  # Batch Prioritized Routing: serve tokens by max gate, 1st choices first.
  return c


class TopKRouter(TokenChoiceRouter):
  """`x [G, S, D] -> RoutingPlan`: gates = softmax(x W + eps), eps ~ N(0, (noise_std/E)^2) in train."""

  loss_weights = dict(importance=0.005, load=0.005, balance=0.0, z_loss=0.0)  # V-MoE

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    c = token_choice_plan_config()
    c.noise_std = 1.0  # V-MoE: eps ~ N(0, (noise_std / E)^2), train only.
    c.init_std = 0.02  # Router kernel init (normal).
    return c

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict) -> None:
    super().validate(config)
    if config.router.noise_std < 0:
      fail("router.noise_std", f"={config.router.noise_std} must be >= 0")

  def __init__(self, dim: int, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    r = config.router
    self.num_experts = config.num_experts
    self.k, self.noise_std = r.k, r.noise_std
    self.renormalize, self.bpr = r.renormalize, r.bpr
    self.kernel = nnx.Param(
        jax.random.normal(rngs.params(), (dim, self.num_experts), jnp.float32) * r.init_std)
    self.rngs = rngs.fork()
    self.deterministic = False

  def __call__(self, x: jax.Array) -> RoutingPlan:
    logits = jnp.einsum("gsd,de->gse", x.astype(jnp.float32), self.kernel[...])
    noise_std = 0.0 if self.deterministic else self.noise_std / self.num_experts
    noisy = logits
    if noise_std > 0:
      noisy = logits + noise_std * jax.random.normal(self.rngs.router(), logits.shape)
    gates = jax.nn.softmax(noisy, axis=-1)
    plan = token_choice_plan(gates, logits, self.k, self.renormalize, self.bpr)
    return plan.replace(aux_losses={
        "importance": losses.importance_loss(gates),
        "load": losses.load_loss(logits, noisy, noise_std, self.k),
        "balance": losses.balance_loss(gates, plan.expert_index),
        "z_loss": losses.z_loss(logits),
    })
