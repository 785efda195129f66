"""The decoder LM: a causal transformer over the visual prefix followed by text tokens.

Call signature (any NNX module with it can replace this one, see `model.decoder.name`):
`decoder(prefix [B, P, H], tokens [B, L]) -> logits [B, L, V]`, where the logits at text position
i predict token i + 1. Blocks are `moe_jax.models.vit.Block`s under a causal mask; the MLPs of
the blocks named by `moe_layers` are `moe_jax.moe.MoELayer`s.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moe_jax import moe
from moe_jax.models import vimoe, vit


def decoder_config(width: int = 2560, depth: int = 32, mlp_dim: int = 10240, num_heads: int = 32,
                   vocab_size: int = 51200, max_len: int = 2048,
                   moe_layers: str = "") -> ml_collections.ConfigDict:
  """Decoder node (defaults: Phi-2 sized). `moe_layers` as in ViMoE ('' = all dense).

  MoE MLPs default to dropless dispatch: with capacity drops, whether a token is dropped depends
  on the tokens after it, which breaks causality (and makes generation differ from training).
  Their `moe.dtype` follows `dtype` until it is set itself.
  """
  c = ml_collections.ConfigDict(dict(
      name="transformer",  # or "package.module:Class" of a decoder with the same call signature
      width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads, vocab_size=vocab_size,
      max_len=max_len, dropout_rate=0.0, attention_dropout_rate=0.0, dtype="float32",
      moe_layers=moe_layers, **vit.BLOCK_VARIANTS))
  c.moe = moe.default_config("top_k")
  c.moe.hidden_dim = mlp_dim
  c.moe.dispatch = "dropless"
  c.moe.dtype = c.get_ref("dtype").identity()
  return c


class Decoder(nnx.Module):
  """Causal transformer LM (pre-LN blocks, learned positions, untied output head)."""

  def __init__(self, c: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    if c.width % c.num_heads:
      raise ValueError(f"model.decoder.width={c.width} must be divisible by "
                       f"model.decoder.num_heads={c.num_heads}")
    ids = vimoe.moe_layer_indices(c.moe_layers, c.depth) if c.moe_layers else []
    self.max_len = c.max_len
    self.embed = nnx.Embed(c.vocab_size, c.width, rngs=rngs)
    self.posemb = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, c.max_len, c.width)))
    self.blocks = nnx.List([
        vit.Block(c, 0.0, moe.MoELayer(c.width, c.moe, rngs=rngs) if i in ids else None, rngs=rngs)
        for i in range(c.depth)])
    self.norm = nnx.LayerNorm(c.width, rngs=rngs)
    self.head = nnx.Linear(c.width, c.vocab_size, rngs=rngs)

  def __call__(self, prefix: jax.Array, tokens: jax.Array) -> jax.Array:
    P, L = prefix.shape[1], tokens.shape[1]
    if P + L > self.max_len:
      raise ValueError(f"model.decoder.max_len={self.max_len} < {P} visual + {L} text tokens")
    x = jnp.concatenate([prefix.astype(jnp.float32), self.embed(tokens)], axis=1)
    x = x + self.posemb[:, :P + L]
    mask = jnp.asarray(np.tril(np.ones((P + L, P + L), bool)))[None, None]
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.norm(x[:, P:]).astype(jnp.float32))
