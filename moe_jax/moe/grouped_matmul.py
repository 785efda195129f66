"""Grouped matrix multiply over expert-sorted rows (the dropless path's compute)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def row_groups(group_sizes: jax.Array, num_rows: int) -> jax.Array:
  """The group of every row: `[E] -> [P]` int32, E (out of range) for rows past the total."""
  ends = jnp.cumsum(group_sizes)
  return jnp.searchsorted(ends, jnp.arange(num_rows), side="right").astype(jnp.int32)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, backend: str = "auto",
        block_size: int = 128) -> jax.Array:
  """`lhs [P, K]` rows sorted by group, `rhs [E, K, N]`, `group_sizes [E]` -> `[P, N]`.

  Row r of group e gives `lhs[r] @ rhs[e]`; rows past `sum(group_sizes)` give zeros.
  """
  del block_size
  if backend not in ("auto", "ragged_dot", "blocked"):
    raise ValueError(f"gmm backend={backend!r}: use 'auto', 'blocked' or 'ragged_dot'")
  return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))
