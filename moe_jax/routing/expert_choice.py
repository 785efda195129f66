"""Expert-choice router (Zhou et al. 2022): every expert takes its top-C tokens of the group."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moe_jax.routing import losses, ops
from moe_jax.routing.base import Router
from moe_jax.routing.plan import RoutingPlan


def expert_choice_capacity(group_size: int, num_experts: int, capacity_factor: float) -> int:
  """`C = round(capacity_factor * S / E)`, clipped to [1, S]."""
  return min(max(round(capacity_factor * group_size / num_experts), 1), group_size)


def experts_per_token(token_index: jax.Array, group_size: int, num_experts: int) -> jax.Array:
  """Fraction of tokens taken by 0, 1, ..., E experts: `[G, E, C] -> [E + 1]`."""
  G = token_index.shape[0]
  counts = jnp.zeros((G, group_size), jnp.int32).at[
      jnp.arange(G)[:, None, None], token_index].add(1)
  return jnp.zeros((num_experts + 1,), jnp.float32).at[counts.reshape(-1)].add(1.0) / counts.size


class ExpertChoiceRouter(Router):
  """`x [G, S, D] -> plan`: S = softmax(x W) `[G, S, E]`; expert e takes top-C tokens of S[:, e].

  No auxiliary loss is needed (loads are equal by construction); z-loss is reported and can be
  weighted through `router.loss_weights.z_loss`. C comes from the layer's `capacity_factor`.
  """

  plan_kind = "expert_choice"
  loss_weights = dict(z_loss=0.0)

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(init_std=0.02))  # Router kernel init (normal).

  def __init__(self, dim: int, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.num_experts = config.num_experts
    self.capacity_factor = config.capacity_factor
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (dim, self.num_experts),
                                              jnp.float32) * config.router.init_std)
    self.deterministic = False

  def __call__(self, x: jax.Array) -> RoutingPlan:
    E, S = self.num_experts, x.shape[1]
    logits = jnp.einsum("gsd,de->gse", x.astype(jnp.float32), self.kernel[...])
    probs = jax.nn.softmax(logits, axis=-1)
    C = expert_choice_capacity(S, E, self.capacity_factor)
    weights, token_index = ops.top_k(jnp.swapaxes(probs, 1, 2), C)  # [G, E, C]
    return RoutingPlan(
        kind="expert_choice", num_experts=E, token_index=token_index.astype(jnp.int32),
        combine_weights=weights, aux_losses={"z_loss": losses.z_loss(logits)},
        metrics={"load": jnp.full((E,), 1.0 / E), "router_entropy": losses.router_entropy(probs),
                 "experts_per_token": experts_per_token(token_index, S, E)})
