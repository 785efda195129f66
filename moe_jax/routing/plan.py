"""The one result type every router returns and every dispatch path consumes.

Routing happens per *routing group*: the layer reshapes its input to `[G, S, D]` (G groups of S
tokens) and a router sees one `[G, S, D]` array. A plan has one of three kinds:

- ``token_choice`` (top_k, clusters, hash, random): each token picks K experts.
  ``expert_index [G, S, K]`` int32, ``combine_weights [G, S, K]`` float32, optional
  ``priority [G, S]`` (higher is served first when capacity runs out: Batch Prioritized Routing;
  ``None`` = token order).
- ``expert_choice``: each expert picks C tokens. ``token_index [G, E, C]`` int32,
  ``combine_weights [G, E, C]`` float32.
- ``soft`` (Soft MoE): dense mixing. ``dispatch_weights [G, S, E, P]`` (softmax over S) and
  ``combine_weights [G, S, E, P]`` (softmax over E*P), P slots per expert.

``aux_losses`` holds unweighted scalar losses (names match ``config.router.loss_weights``);
``metrics`` holds routing statistics (scalars or small vectors such as the load histogram).
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

PlanKind = Literal["token_choice", "expert_choice", "soft"]


@struct.dataclass
class RoutingPlan:
  kind: PlanKind = struct.field(pytree_node=False)
  num_experts: int = struct.field(pytree_node=False)
  combine_weights: jax.Array
  expert_index: jax.Array | None = None
  token_index: jax.Array | None = None
  priority: jax.Array | None = None
  dispatch_weights: jax.Array | None = None
  aux_losses: dict[str, jax.Array] = struct.field(default_factory=dict)
  metrics: dict[str, jax.Array] = struct.field(default_factory=dict)

  def token_expert_mass(self, group_size: int) -> jax.Array:
    """How much of each token goes to each expert, `[G, S, E]` (before capacity drops):
    token choice: the share of its K choices; expert choice: how many experts took it; Soft MoE:
    its combine weights summed over each expert's slots."""
    E = self.num_experts
    if self.kind == "token_choice":
      return jnp.mean(jax.nn.one_hot(self.expert_index, E, dtype=jnp.float32), axis=-2)
    if self.kind == "soft":
      return jnp.sum(self.combine_weights, axis=-1)
    G = self.token_index.shape[0]
    g = jnp.arange(G)[:, None, None]
    e = jnp.arange(E)[None, :, None]
    return jnp.zeros((G, group_size, E), jnp.float32).at[g, self.token_index, e].add(1.0)

  def primary_expert(self, group_size: int) -> jax.Array:
    """Each token's main expert, `[G, S]` int32 (before capacity drops): token choice: its first
    choice; expert choice / Soft MoE: the expert with the largest combine weight on it; E for a
    token no expert took (expert choice)."""
    E = self.num_experts
    if self.kind == "token_choice":
      return self.expert_index[..., 0]
    if self.kind == "soft":
      weight = jnp.sum(self.combine_weights, axis=-1)
    else:
      G = self.token_index.shape[0]
      g = jnp.arange(G)[:, None, None]
      e = jnp.arange(E)[None, :, None]
      weight = jnp.zeros((G, group_size, E), jnp.float32).at[g, self.token_index, e].set(
          self.combine_weights)
    taken = jnp.sum(self.token_expert_mass(group_size), axis=-1) > 0
    return jnp.where(taken, jnp.argmax(weight, axis=-1), E).astype(jnp.int32)

  @property
  def k(self) -> int:
    """Experts per token (token_choice plans)."""
    assert self.expert_index is not None
    return self.expert_index.shape[-1]
