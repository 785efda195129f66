"""What every decoder LM shares: the config node of the pretrained families (Phi, LLaMA), the
MoE node of their optional MoE MLPs, and the `CausalLM` base class (the interface of
`moe_jax.vlm.generation` and MoCHA).

`decoder(prefix [B, P, D], tokens [B, L]) -> logits [B, L, V]` (float32): the visual prefix, then
the text, under a causal mask; the logits at text position i predict token i + 1.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moe_jax import moe
from moe_jax.models import remat, vimoe
from moe_jax.vlm import attention

DTYPES = ("float32", "bfloat16")


def moe_node(mlp_dim: int, dtype_ref) -> ml_collections.ConfigDict:
  """The `moe` node of a decoder's MoE MLPs (`moe_layers`): dropless, since with capacity drops
  whether a token is dropped depends on the tokens after it, which breaks causality (and makes
  generation differ from training). `moe.dtype` follows the decoder's `dtype` until set."""
  c = moe.default_config("top_k")
  c.hidden_dim = mlp_dim
  c.dispatch = "dropless"
  c.dtype = dtype_ref.identity()
  return c


def lm_config(name: str, *, width: int, depth: int, mlp_dim: int, num_heads: int,
              num_kv_heads: int, vocab_size: int, max_len: int, rotary_fraction: float,
              rope_theta: float, norm_eps: float, tie_embeddings: bool, head_dim: int = 0,
              moe_layers: str = "", checkpoint: str = "") -> ml_collections.ConfigDict:
  """The decoder node of a pretrained-LM family `name` ('phi', 'llama').

  `checkpoint`: an HF directory whose weights a fresh MoCHA run loads (`moe_jax.vlm.pretrained`;
  "" = random init);
  `head_dim` 0 = width / num_heads; `rotary_fraction` of each head's dims carry the rotary
  embedding (HF `partial_rotary_factor`); `max_len` = HF `max_position_embeddings`;
  `dtype` computes, `param_dtype` stores the weights ('float32' or 'bfloat16');
  `remat_policy` rematerialises each block in training (`moe_jax.models.remat.POLICIES`; 'full'
  keeps only the blocks' inputs, as HF's `gradient_checkpointing`).
  """
  c = ml_collections.ConfigDict(dict(
      name=name, width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
      num_kv_heads=num_kv_heads, head_dim=head_dim, vocab_size=vocab_size, max_len=max_len,
      rotary_fraction=rotary_fraction, rope_theta=rope_theta, norm_eps=norm_eps,
      tie_embeddings=tie_embeddings, dtype="float32", param_dtype="float32",
      remat_policy="none", moe_layers=moe_layers, checkpoint=checkpoint))
  c.moe = moe_node(mlp_dim, c.get_ref("dtype"))
  return c


def resolved(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`c` checked (ValueError naming the field) with `head_dim` and `rotary_dims` filled in."""
  f = "model.decoder."
  head_dim = c.head_dim or c.width // max(c.num_heads, 1)
  if not c.head_dim and c.width % c.num_heads:
    raise ValueError(f"{f}width={c.width} must be divisible by {f}num_heads={c.num_heads} "
                     f"(or set {f}head_dim)")
  if c.num_kv_heads < 1 or c.num_heads % c.num_kv_heads:
    raise ValueError(f"{f}num_heads={c.num_heads} must be a multiple of "
                     f"{f}num_kv_heads={c.num_kv_heads}")
  rotary_dims = int(head_dim * c.rotary_fraction)
  if not 0.0 <= c.rotary_fraction <= 1.0 or rotary_dims % 2:
    raise ValueError(f"{f}rotary_fraction={c.rotary_fraction} must be in [0, 1] and give an "
                     f"even number of the head's {head_dim} dims (got {rotary_dims})")
  for field in ("dtype", "param_dtype"):
    if c[field] not in DTYPES:
      raise ValueError(f"{f}{field}={c[field]!r}: use one of {DTYPES}")
  remat.validate(c.remat_policy, f"{f}remat_policy")
  out = ml_collections.ConfigDict(c.to_dict())
  out.head_dim, out.rotary_dims = head_dim, rotary_dims
  return out


def moe_mlps(c: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> list[nnx.Module | None]:
  """Per block: a `moe.MoELayer` where `c.moe_layers` says so, else None (the dense MLP)."""
  ids = vimoe.moe_layer_indices(c.moe_layers, c.depth) if c.moe_layers else []
  return [moe.MoELayer(c.width, c.moe, rngs=rngs) if i in ids else None for i in range(c.depth)]


def run_blocks(blocks, x: jax.Array, positions: jax.Array,
               cache: list[attention.LayerCache] | None, final_norm: nnx.Module,
               remat_policy: str = "none", block_fn: Callable[..., Any] = remat.call_module
               ) -> tuple[jax.Array, list[attention.LayerCache] | None]:
  """`final_norm` of `x [B, T, D]` through `blocks` (`block_fn(block, x, positions,
  layer_cache) -> (x, layer_cache)`, default `block(x, positions, layer_cache)`), each
  rematerialised under `remat_policy`, and the new cache (None without one). Each block's input
  is constrained to the batch sharding of the current mesh (`attention.shard_batch`): FSDP
  all-gathers the weights to the batch-sharded tokens instead of spreading the tokens over the
  weights' shards and reducing the partial products."""
  new_cache = []
  for i, block in enumerate(blocks):
    x, layer_cache = remat.call(block, remat_policy, attention.shard_batch(x), positions,
                                None if cache is None else cache[i], fn=block_fn)
    new_cache.append(layer_cache)
  return final_norm(attention.shard_batch(x)), None if cache is None else new_cache


class CausalLM(nnx.Module):
  """Base of the decoders. Subclasses set `embed` (an `nnx.Embed`), `blocks`, `norm`,
  `max_len`, `dtype`, `num_kv_heads`, `head_dim`, `remat_policy` (`init_trunk` does all but
  `norm` for blocks built `block(c, mlp, rngs=...)`) and define `logits`."""

  def init_trunk(self, c: ml_collections.ConfigDict, block: type[nnx.Module], *,
                 rngs: nnx.Rngs) -> ml_collections.ConfigDict:
    """Sets the embedding, the blocks and the sizes from `c`; returns `resolved(c)`."""
    c = resolved(c)
    self.max_len, self.dtype = c.max_len, jnp.dtype(c.dtype)
    self.num_kv_heads, self.head_dim = c.num_kv_heads, c.head_dim
    self.remat_policy = c.remat_policy
    self.embed = nnx.Embed(c.vocab_size, c.width, dtype=self.dtype,
                           param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)
    self.blocks = nnx.List([block(c, mlp, rngs=rngs) for mlp in moe_mlps(c, rngs=rngs)])
    return c

  def forward(self, x: jax.Array, positions: jax.Array, cache: list[attention.LayerCache] | None
              ) -> tuple[jax.Array, list[attention.LayerCache] | None]:
    """Final hidden states `[B, T, D]` of the embedded tokens `x [B, T, D]` at `positions
    [B, T]`, and the cache with their keys / values written (see `moe_jax.vlm.attention`)."""
    return run_blocks(self.blocks, x, positions, cache, self.norm, self.remat_policy)

  def logits(self, h: jax.Array) -> jax.Array:
    """float32 next-token logits `[..., V]` of final hidden states `h [..., D]`."""
    raise NotImplementedError

  def init_cache(self, batch: int, length: int) -> list[attention.LayerCache]:
    """An empty KV cache of `length` slots (positions 0 .. length - 1)."""
    if length > self.max_len:
      raise ValueError(f"model.decoder.max_len={self.max_len} < {length} positions to cache")
    return attention.init_cache(len(self.blocks), batch, length, self.num_kv_heads,
                                self.head_dim, self.dtype)

  def __call__(self, prefix: jax.Array, tokens: jax.Array) -> jax.Array:
    P, L = prefix.shape[1], tokens.shape[1]
    if P + L > self.max_len:
      raise ValueError(f"model.decoder.max_len={self.max_len} < {P} visual + {L} text tokens")
    # Batch-sharded embeddings and logits (`attention.shard_batch`): with the vocabulary-sharded
    # table and head of the FSDP rules, XLA otherwise gathers the whole batch there and
    # all-reduces [B, L, D] embeddings and [B, L, V] logit-sized tensors on every device.
    embedded = attention.shard_batch(self.embed(tokens))
    x = jnp.concatenate([prefix.astype(self.dtype), embedded], axis=1)
    positions = jnp.broadcast_to(jnp.arange(P + L), (tokens.shape[0], P + L))
    return attention.shard_batch(self.logits(self.forward(x, positions, None)[0][:, P:]))
