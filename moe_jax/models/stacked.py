"""Scan over layers (`scan_layers` of the ViT, ConvNeXt and decoder configs): `depth` identical
blocks built once with their parameters stacked on a leading layer axis and run by one
`jax.lax.scan`, so XLA compiles the block once instead of `depth` times (MaxText's
`scan_layers`; the blocks are built with Flax NNX's `nnx.split_rngs` + `nnx.vmap` pattern).

`Stacked(make, depth, rngs=...)` holds the stacked block as `stacked`: its variables' paths are
`.../stacked/<the block's path>`, each `[depth, *per-layer shape]`, where an `nnx.List` of the
same blocks holds `.../<i>/<the block's path>` (`moe_jax.checkpoints.layout` converts between
the two; `moe_jax.parallel.sharding` never shards the layer axis). `stacked.scan(fn, x)` runs
`fn` once per layer, in order, on the first `length` layers (all by default), each call
rematerialised under a `moe_jax.models.remat` policy, each layer's input (the carry `[B, ...]`)
constrained to the batch sharding of the current mesh (`attention.shard_batch`): without it XLA
may shard a scanned carry over the weights' FSDP dimension and all-reduce whole-batch partial
products in every layer (measured on the paper config's scanned encoders: `f32[128, 16, 577,
577]` attention scores all-reduced over 16 chips, bench/RESULTS.md).

Only for blocks whose forward pass changes no state: the scanned body's updates to a block's
non-parameter variables (dropout RNG counters) are not written back, so the callers refuse
dropout and stochastic depth with scan on (and per-block differences such as MoE MLPs).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from moe_jax.models import remat
from moe_jax.parallel.sharding import STACKED
from moe_jax.vlm.attention import shard_batch

# fn(block, carry, per-layer slice of xs or None) -> (carry, per-layer output or None)
LayerFn = Callable[[nnx.Module, Any, Any], tuple[Any, Any]]


class Stacked(nnx.Module):
  """`depth` blocks `make(rngs)` with their variables stacked on a leading axis (attribute
  `STACKED`); each layer initialised from its own split of `rngs`."""

  def __init__(self, make: Callable[[nnx.Rngs], nnx.Module], depth: int, *, rngs: nnx.Rngs):
    if depth < 1:
      raise ValueError(f"Stacked: depth={depth} must be >= 1")

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=depth)
    def build(layer_rngs: nnx.Rngs) -> nnx.Module:
      return make(layer_rngs)

    self.depth = depth
    setattr(self, STACKED, build(rngs))

  def __len__(self) -> int:
    return self.depth

  def scan(self, fn: LayerFn, x: Any, xs: Any = None, *, length: int | None = None,
           policy: str = "none") -> tuple[Any, Any]:
    """(final carry, stacked per-layer outputs) of `fn` applied to layers 0 .. length - 1 in
    order, starting from carry `x [B, ...]` (batch-sharded at each layer's input); `xs`: a pytree with a leading `[depth]` axis (e.g. a KV
    cache), layer i's slice given to its call (None: None). `policy`: the remat policy of each
    layer's call (`remat.POLICIES`)."""
    n = self.depth if length is None else length
    if not 1 <= n <= self.depth:
      raise ValueError(f"Stacked.scan: length={n} must lie in [1, {self.depth}]")
    graphdef, state = nnx.split(getattr(self, STACKED))
    if n < self.depth:
      state, xs = jax.tree.map(lambda a: a[:n], (state, xs))

    def body(carry, layer):
      layer_state, layer_xs = layer
      return fn(nnx.merge(graphdef, layer_state), shard_batch(carry), layer_xs)

    if remat.POLICIES[policy] is not None:
      body = jax.checkpoint(body, policy=remat.POLICIES[policy], prevent_cse=False)
    return jax.lax.scan(body, x, (state, xs))
