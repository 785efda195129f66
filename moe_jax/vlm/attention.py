"""Causal self-attention for the decoder LMs: rotary embeddings, grouped-query attention and a
preallocated KV cache.

Shapes: B batch, T query tokens, S cache slots, H query heads, Hkv key/value heads (H a multiple
of Hkv: grouped-query attention), Dh head width, R rotary dims (even, <= Dh).

Cache layout: a row's token at position p sits in cache slot p, and a query at position p attends
to the slots <= p. Rows may stand at different positions (prompts of different lengths): a row
writes its next token at its own slot, and slots it has not written yet (padding after a short
prompt, still to be overwritten) are never attended because they lie after the query.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moe_jax.parallel.grad_precision import Linear
from moe_jax.parallel.mesh import batch_axes, batch_shards
from moe_jax.routing.ops import current_mesh


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
  """Keys and values of one attention layer, `[B, S, Hkv, Dh]` each."""
  keys: jax.Array
  values: jax.Array


def init_cache(num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int,
               dtype) -> list[LayerCache]:
  """Zero caches of `length` slots for `num_layers` layers, the batch sharded over the mesh's
  batch axes (when a mesh is set with `jax.set_mesh` and its batch shards divide `batch`)."""
  zeros = lambda: shard_batch(jnp.zeros((batch, length, kv_heads, head_dim), dtype))
  return [LayerCache(zeros(), zeros()) for _ in range(num_layers)]


def shard_batch(x: jax.Array) -> jax.Array:
  """`x [B, ...]` constrained to be sharded over the batch axes of the current mesh."""
  mesh = current_mesh()
  if mesh is None or x.shape[0] % batch_shards(mesh):
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(batch_axes(mesh)))


def map_batch_shards(fn: Callable[..., Any], *args: jax.Array) -> Any:
  """`fn(*args)` run by each device on its own batch shard: `jax.shard_map` over the batch axes
  of the current mesh, every arg and output `[B, ...]` split along B only. For per-example code
  that XLA's SPMD partitioner would otherwise run on the whole batch (a scatter whose batch is an
  index, `lax.top_k`: all-gathered inputs, all-reduced results). `fn` must treat the examples
  independently; the result is then the same as `fn(*args)`, which is what runs without a mesh or
  when the batch shards do not divide B."""
  mesh = current_mesh()
  if mesh is None or any(a.shape[0] % batch_shards(mesh) for a in args):
    return fn(*args)
  spec = jax.sharding.PartitionSpec(batch_axes(mesh))
  return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec)(*args)


def rope(x: jax.Array, positions: jax.Array, rotary_dims: int, theta: float) -> jax.Array:
  """Rotary embedding (Su et al. 2021) on the first `rotary_dims` of `x [B, T, H, Dh]` at
  `positions [B, T]`, HF's "rotate half" layout: dims (i, i + R/2) form a pair rotated by
  `positions * theta^(-2i/R)`; the other Dh - R dims pass (Phi's partial rotary)."""
  if rotary_dims == 0:
    return x
  inv_freq = 1.0 / theta ** (jnp.arange(0, rotary_dims, 2, dtype=jnp.float32) / rotary_dims)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None].astype(x.dtype)
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None].astype(x.dtype)
  rot, rest = x[..., :rotary_dims], x[..., rotary_dims:]
  first, second = jnp.split(rot, 2, axis=-1)
  rotated = rot * cos + jnp.concatenate([-second, first], -1) * sin
  return jnp.concatenate([rotated, rest], -1)


def write(cache: LayerCache, keys: jax.Array, values: jax.Array, start: jax.Array) -> LayerCache:
  """`cache` with `keys` / `values [B, T, Hkv, Dh]` written at slots `start[b] ..` of each row."""
  put = jax.vmap(lambda c, new, s: jax.lax.dynamic_update_slice_in_dim(c, new, s, axis=0))
  return LayerCache(shard_batch(put(cache.keys, keys.astype(cache.keys.dtype), start)),
                    shard_batch(put(cache.values, values.astype(cache.values.dtype), start)))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
           cache: LayerCache | None) -> tuple[jax.Array, LayerCache | None]:
  """Causal attention `[B, T, H, Dh]` of `q` over `k`, `v [B, T, Hkv, Dh]` at `positions [B, T]`
  (increasing along T); with a `cache`, k / v are first written at slots `positions[:, 0] ..`
  and `q` attends over the whole cache. `jax.nn.dot_product_attention`: scores and softmax in
  float32, scale `Dh^-0.5`."""
  B, T, H, Dh = q.shape
  if cache is None:
    key_positions = positions
  else:
    cache = write(cache, k, v, positions[:, 0])
    k, v = cache.keys, cache.values
    key_positions = jnp.broadcast_to(jnp.arange(k.shape[1]), (B, k.shape[1]))
  visible = key_positions[:, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, S]
  out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=visible,
                                     scale=Dh ** -0.5)
  return out, cache


class SelfAttention(nnx.Module):
  """Projections + rotary + `attend`: `[B, T, D] -> [B, T, D]` (HF Phi / LLaMA attention).

  `c` fields: width, num_heads, num_kv_heads, head_dim, rotary_dims, rope_theta, dtype,
  param_dtype. Parameters `query`, `key`, `value` (`[D, H*Dh]`, `[D, Hkv*Dh]`) and `out`
  (`[H*Dh, D]`), biases when `bias`.
  """

  def __init__(self, c: ml_collections.ConfigDict, *, bias: bool, rngs: nnx.Rngs):
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
    self.rotary_dims, self.rope_theta = c.rotary_dims, c.rope_theta
    linear = lambda n_in, n_out: Linear(n_in, n_out, use_bias=bias, dtype=jnp.dtype(c.dtype),
                                        param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)
    self.query = linear(c.width, c.num_heads * c.head_dim)
    self.key = linear(c.width, c.num_kv_heads * c.head_dim)
    self.value = linear(c.width, c.num_kv_heads * c.head_dim)
    self.out = linear(c.num_heads * c.head_dim, c.width)

  def __call__(self, x: jax.Array, positions: jax.Array,
               cache: LayerCache | None) -> tuple[jax.Array, LayerCache | None]:
    B, T, _ = x.shape
    q = self.query(x).reshape(B, T, self.num_heads, self.head_dim)
    k = self.key(x).reshape(B, T, self.num_kv_heads, self.head_dim)
    v = self.value(x).reshape(B, T, self.num_kv_heads, self.head_dim)
    q = rope(q, positions, self.rotary_dims, self.rope_theta)
    k = rope(k, positions, self.rotary_dims, self.rope_theta)
    out, cache = attend(q, k, v, positions, cache)
    return self.out(out.reshape(B, T, -1)), cache
