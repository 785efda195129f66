"""Rematerialisation of transformer blocks (`model.remat_policy`, `model.decoder.remat_policy`):
which activations a block keeps for the backward pass, the rest recomputed (jax.checkpoint via
`nnx.remat`)."""
from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

# remat_policy -> jax.checkpoint policy (None: no remat, every activation is kept).
POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the block's input
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def validate(policy: str, field: str = "model.remat_policy") -> None:
  if policy not in POLICIES:
    raise ValueError(f"{field}={policy!r} must be one of {list(POLICIES)}")


def call_module(module: nnx.Module, *args: Any) -> Any:
  return module(*args)


def call(block: nnx.Module, policy: str, *args: Any,
         fn: Callable[..., Any] = call_module) -> Any:
  """`fn(block, *args)` (default `block(*args)`), rematerialised under `policy` (same values
  and gradients)."""
  if POLICIES[policy] is None:
    return fn(block, *args)
  return nnx.remat(fn, policy=POLICIES[policy])(block, *args)
