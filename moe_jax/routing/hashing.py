"""Hash routing baseline (Roller et al. 2021, adapted to vision): a fixed expert per position."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moe_jax.routing import losses
from moe_jax.routing.base import TokenChoiceRouter
from moe_jax.routing.plan import RoutingPlan


def hash_experts(group_size: int, num_experts: int, k: int, seed: int) -> np.ndarray:
  """`[S, K]` distinct experts per token position (multiplicative hash of the position)."""
  pos = np.arange(group_size, dtype=np.uint64)
  first = ((pos * np.uint64(2654435761) + np.uint64(seed)) % np.uint64(2**32)) % num_experts
  return ((first[:, None] + np.arange(k)[None]) % num_experts).astype(np.int32)


def uniform_plan(expert_index: jax.Array, num_experts: int) -> RoutingPlan:
  """Token-choice plan with equal weights 1/K and no priority (baselines)."""
  K = expert_index.shape[-1]
  return RoutingPlan(kind="token_choice", num_experts=num_experts, expert_index=expert_index,
                     combine_weights=jnp.full(expert_index.shape, 1.0 / K, jnp.float32),
                     metrics={"load": losses.assignment_load(expert_index, num_experts)})


class HashRouter(TokenChoiceRouter):
  """No parameters: token at position s of its group goes to `hash(s) mod E` (+ next K-1)."""

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    c = super().default_config()
    c.seed = 0  # Offset of the position hash.
    return c

  def __init__(self, dim: int, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    del dim, rngs
    self.num_experts, self.k, self.seed = config.num_experts, config.router.k, config.router.seed
    self.deterministic = False

  def __call__(self, x: jax.Array) -> RoutingPlan:
    G, S, _ = x.shape
    index = jnp.broadcast_to(hash_experts(S, self.num_experts, self.k, self.seed), (G, S, self.k))
    return uniform_plan(index, self.num_experts)
