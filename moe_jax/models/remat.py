"""Rematerialisation of transformer blocks (`model.remat_policy`): which activations a block
keeps for the backward pass, the rest recomputed (jax.checkpoint via `nnx.remat`)."""
from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

# model.remat_policy -> jax.checkpoint policy (None: no remat, every activation is kept).
POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the block's input
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def validate(policy: str) -> None:
  if policy not in POLICIES:
    raise ValueError(f"model.remat_policy={policy!r} must be one of {list(POLICIES)}")


def call(block: nnx.Module, policy: str, *args: Any) -> Any:
  """`block(*args)`, rematerialised under `policy` (same values and gradients)."""
  if POLICIES[policy] is None:
    return block(*args)
  return nnx.remat(lambda module, *a: module(*a), policy=POLICIES[policy])(block, *args)
