"""Random routing baseline: K distinct uniformly random experts per token."""
from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from moe_jax.routing import ops
from moe_jax.routing.base import TokenChoiceRouter
from moe_jax.routing.hashing import uniform_plan
from moe_jax.routing.plan import RoutingPlan


class RandomRouter(TokenChoiceRouter):
  """Fresh random experts every train call (stream 'router'); a fixed draw from
  `router.seed` in eval mode, so evaluation is deterministic."""

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    c = super().default_config()
    c.seed = 0  # Key of the eval-mode draw.
    return c

  def __init__(self, dim: int, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    del dim
    self.num_experts, self.k, self.seed = config.num_experts, config.router.k, config.router.seed
    self.rngs = rngs.fork()
    self.deterministic = False

  def __call__(self, x: jax.Array) -> RoutingPlan:
    G, S, _ = x.shape
    key = jax.random.key(self.seed) if self.deterministic else self.rngs.router()
    scores = jax.random.uniform(key, (G, S, self.num_experts))
    return uniform_plan(ops.top_k(scores, self.k)[1], self.num_experts)
