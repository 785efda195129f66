"""Dispatch paths: move routed tokens to expert rows, run the experts, combine the outputs.

Dispatch never computes gates: it only reads a `RoutingPlan`. Token-choice plans go through
*row assignment* — each (token, choice) pair gets a row of an expert buffer, or none (dropped) —
then through gathers (`permute.gather_rows`) whose backward passes are gathers too:

- ``capacity``: rows laid out `[E, G, C]`; a pair whose rank within its expert (in BPR order)
  reaches C is dropped. Memory is linear in tokens: no `T x E x C` one-hot tensor.
- ``dropless``: pairs sorted by expert, each expert's rows padded to a multiple of the block
  size, computed by a grouped matmul. Nothing is dropped.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from moe_jax.moe import permute
from moe_jax.moe.experts import ExpertBank
from moe_jax.routing.plan import RoutingPlan


def capacity(k: int, group_size: int, num_experts: int, capacity_factor: float,
             min_capacity: int = 1) -> int:
  """Token-choice capacity per expert and group `C = ceil(k * S * capacity_factor / E)`."""
  return max(math.ceil(k * group_size * capacity_factor / num_experts), min_capacity, 1)


def _rank_within_expert(expert: jax.Array, num_experts: int) -> jax.Array:
  """`[..., N]` expert ids in fill order -> rank of each among earlier ones with the same id."""
  one_hot = jax.nn.one_hot(expert, num_experts, dtype=jnp.int32)
  seen = jnp.cumsum(one_hot, axis=-2)
  return jnp.take_along_axis(seen, expert[..., None], axis=-1)[..., 0] - 1


def capacity_rows(plan: RoutingPlan, capacity_per_expert: int) -> jax.Array:
  """Row of each (token, choice) in the `[E, G, C]` buffer, `E*G*C` when dropped: `[G, S, K]`.

  Fill order: every token's 1st choice before any 2nd choice; within a choice, tokens by
  descending priority (BPR, stable) or in token order.
  """
  G, S, K = plan.expert_index.shape
  E, C = plan.num_experts, capacity_per_expert
  expert = plan.expert_index
  if plan.priority is not None:
    order = jnp.argsort(-plan.priority, axis=-1, stable=True)  # [G, S]
    expert = jnp.take_along_axis(expert, order[..., None], axis=1)
  fill = expert.transpose(0, 2, 1).reshape(G, K * S)  # choice-major fill order
  rank = _rank_within_expert(fill, E).reshape(G, K, S).transpose(0, 2, 1)
  if plan.priority is not None:  # back to token order
    rank = jnp.take_along_axis(rank, jnp.argsort(order, axis=-1)[..., None], axis=1)
  g = jnp.arange(G, dtype=jnp.int32)[:, None, None]
  rows = (plan.expert_index * G + g) * C + rank
  return jnp.where(rank < C, rows, E * G * C).astype(jnp.int32)


def dropless_rows(plan: RoutingPlan, block_size: int) -> tuple[jax.Array, jax.Array, int]:
  """Expert-sorted, block-padded rows for every (token, choice).

  Returns rows `[G, S, K]`, the padded group sizes `[E]` (multiples of block_size) and the
  static row count `P >= sum(group sizes)`.
  """
  E, b = plan.num_experts, block_size
  expert = plan.expert_index.reshape(-1)
  rank = _rank_within_expert(expert, E)
  counts = jnp.zeros((E,), jnp.int32).at[expert].add(1)
  padded = (counts + b - 1) // b * b
  offsets = jnp.cumsum(padded) - padded
  rows = (offsets[expert] + rank).reshape(plan.expert_index.shape)
  num_rows = -(-(expert.size + E * (b - 1)) // b) * b
  return rows.astype(jnp.int32), padded, num_rows


def _route_rows(x: jax.Array, rows: jax.Array, weights: jax.Array, num_rows: int,
                experts_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
  """Tokens `x [N, D]` -> expert rows -> `experts_fn` -> sum back: `[N, D_out]`.

  rows / weights: `[N, K]`; a row >= num_rows means the pair is dropped (contributes zero).
  `experts_fn(rows [num_rows, D], row weights [num_rows])` returns each row's expert output
  times its combine weight (0 for an empty row), so a token's output is the sum of its rows.
  """
  N, K = rows.shape
  pair_of_row = jnp.full((num_rows,), N * K, jnp.int32).at[rows.reshape(-1)].set(
      jnp.arange(N * K, dtype=jnp.int32), mode="drop")
  token_of_row = jnp.where(pair_of_row < N * K, pair_of_row // K, N)
  expert_in = permute.gather_rows(x, token_of_row, rows)  # [num_rows, D]
  row_weights = permute.gather_rows(weights.reshape(N * K, 1).astype(x.dtype), pair_of_row,
                                    rows.reshape(N * K, 1))[:, 0]
  expert_out = experts_fn(expert_in, row_weights)
  per_pair = permute.gather_rows(expert_out, rows.reshape(-1), pair_of_row[:, None])
  return jnp.sum(per_pair.reshape(N, K, -1), axis=1)


def token_choice(plan: RoutingPlan, x: jax.Array, experts: ExpertBank, *, mode: str,
                 capacity_factor: float, min_capacity: int, block_size: int,
                 backend: str, tokens_per_row: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Token-choice dispatch. `x [G, S, R*D]` -> `[G, S, R*D_out]` and dispatch metrics.

  The plan routes rows; each row carries `R = tokens_per_row` tokens of width D that all go to
  the row's experts (per-image routing: a row is an image, R = T). Capacity C counts rows; the
  experts see `[E, C*R, D]` (capacity) or `R` token rows per routed row (dropless).
  """
  G, S, W = x.shape
  K, E, R = plan.k, plan.num_experts, tokens_per_row
  D = W // R
  if mode == "capacity":
    C = capacity(K, S, E, capacity_factor, min_capacity)
    rows, num_rows = capacity_rows(plan, C), E * G * C
    experts_fn = lambda r, w: experts(r.reshape(E, G * C * R, D), jnp.repeat(w, R).reshape(
        E, G * C * R)).reshape(E * G * C, -1)
  else:
    rows, group_sizes, num_rows = dropless_rows(plan, block_size)
    experts_fn = lambda r, w: experts.grouped(r.reshape(num_rows * R, D), group_sizes * R,
                                              backend, block_size, jnp.repeat(w, R)).reshape(
                                                  num_rows, -1)
  kept = rows < num_rows
  y = _route_rows(x.reshape(G * S, W).astype(experts.dtype), rows.reshape(G * S, K),
                  plan.combine_weights.reshape(G * S, K), num_rows, experts_fn)
  expert_of_kept = jnp.where(kept, plan.expert_index, E).reshape(-1)
  kept_load = jnp.zeros((E + 1,), jnp.float32).at[expert_of_kept].add(1.0)[:E] / kept.size
  # The mean of the dropped pairs (not 1 - mean of the kept: that rounds to -5e-8 when none is).
  metrics = {"dropped_fraction": jnp.mean((~kept).astype(jnp.float32)),
             "kept_load": kept_load}
  return y.reshape(G, S, -1), metrics


def expert_choice(plan: RoutingPlan, x: jax.Array, experts: ExpertBank, *,
                  capacity_factor: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Expert-choice dispatch: expert e processes the tokens `token_index [G, E, C]` it chose;
  outputs are scatter-added back weighted by `combine_weights`. `x [G, S, D] -> [G, S, D_out]`."""
  del capacity_factor  # already applied by the router
  G, S, D = x.shape
  E, C = plan.num_experts, plan.token_index.shape[-1]
  rows = (jnp.arange(G, dtype=jnp.int32)[:, None, None] * S + plan.token_index)
  rows = rows.transpose(1, 0, 2).reshape(-1)  # [E*G*C], expert-major
  tokens = x.reshape(G * S, D).astype(experts.dtype)
  weights = plan.combine_weights.transpose(1, 0, 2).reshape(E, G * C)
  out = experts(jnp.take(tokens, rows, axis=0).reshape(E, G * C, D), weights)
  out = out.reshape(E * G * C, -1)
  y = jnp.zeros((G * S, out.shape[-1]), out.dtype).at[rows].add(out)
  chosen = jnp.zeros((G * S,), jnp.float32).at[rows].add(1.0)
  return y.reshape(G, S, -1), {"dropped_fraction": jnp.mean((chosen == 0).astype(jnp.float32))}


def soft(plan: RoutingPlan, x: jax.Array, experts: ExpertBank, *,
         capacity_factor: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Soft MoE dispatch: slots = dispatch^T x `[E, G*P, D]`, y = combine . experts(slots)."""
  del capacity_factor
  G, S, D = x.shape
  _, _, E, P = plan.dispatch_weights.shape
  dt = experts.dtype
  slots = jnp.einsum("gsep,gsd->egpd", plan.dispatch_weights.astype(dt), x.astype(dt))
  out = experts(slots.reshape(E, G * P, D)).reshape(E, G, P, -1)
  y = jnp.einsum("gsep,egpd->gsd", plan.combine_weights.astype(dt), out)
  return y, {"dropped_fraction": jnp.zeros((), jnp.float32)}
