"""The small from-scratch decoder LM ('transformer'): pre-LN `moe_jax.models.vit.Block`s with
learned positions, an untied output head, and a KV cache for generation.

`decoder(prefix [B, P, H], tokens [B, L]) -> logits [B, L, V]` as every `lm.CausalLM`; the MLPs
of the blocks named by `moe_layers` are `moe_jax.moe.MoELayer`s. The blocks' attention runs
through `moe_jax.vlm.attention.attend` on the parameters of their `nnx.MultiHeadAttention`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moe_jax.models import remat, vit
from moe_jax.vlm import attention, lm


def decoder_config(width: int = 2560, depth: int = 32, mlp_dim: int = 10240, num_heads: int = 32,
                   vocab_size: int = 51200, max_len: int = 2048,
                   moe_layers: str = "") -> ml_collections.ConfigDict:
  """Decoder node (defaults: Phi-2 sized). `moe_layers` as in ViMoE ('' = all dense); its MoE
  node is `lm.moe_node` (dropless, dtype following `dtype`)."""
  c = ml_collections.ConfigDict(dict(
      name="transformer",  # or "phi", "llama", "package.module:Class" (see model.DECODERS)
      width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads, vocab_size=vocab_size,
      max_len=max_len, dropout_rate=0.0,
      attention_dropout_rate=0.0,  # must stay 0: the cached attention has no dropout
      dtype="float32", moe_layers=moe_layers, remat_policy="none",  # as lm.lm_config's
      **vit.BLOCK_VARIANTS))
  c.moe = lm.moe_node(mlp_dim, c.get_ref("dtype"))
  return c


class Decoder(lm.CausalLM):
  """Causal transformer LM (pre-LN blocks, learned positions, untied output head).

  The residual stream and the cache are float32; `dtype` is the blocks' compute dtype.
  """

  def __init__(self, c: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    if c.width % c.num_heads:
      raise ValueError(f"model.decoder.width={c.width} must be divisible by "
                       f"model.decoder.num_heads={c.num_heads}")
    if c.attention_dropout_rate:
      raise ValueError(f"model.decoder.attention_dropout_rate={c.attention_dropout_rate} is not "
                       "supported by the cached attention; set it to 0.0")
    remat.validate(c.remat_policy, "model.decoder.remat_policy")
    self.max_len, self.dtype, self.remat_policy = c.max_len, jnp.float32, c.remat_policy
    self.num_kv_heads, self.head_dim = c.num_heads, c.width // c.num_heads
    self.embed = nnx.Embed(c.vocab_size, c.width, rngs=rngs)
    self.posemb = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, c.max_len, c.width)))
    self.blocks = nnx.List([vit.Block(c, 0.0, mlp, rngs=rngs)
                            for mlp in lm.moe_mlps(c, rngs=rngs)])
    self.norm = nnx.LayerNorm(c.width, rngs=rngs)
    self.head = nnx.Linear(c.width, c.vocab_size, rngs=rngs)

  def forward(self, x, positions, cache):
    return lm.run_blocks(self.blocks, x + self.posemb[0][positions], positions, cache, self.norm,
                         self.remat_policy, block_fn=_block)

  def logits(self, h):
    return self.head(h).astype(jnp.float32)


def _branch(block: vit.Block, scale: vit.LayerScale | None, y: jax.Array) -> jax.Array:
  return block.drop_path(block.dropout(y if scale is None else scale(y)))


def _block(block: vit.Block, x: jax.Array, positions: jax.Array,
           cache: attention.LayerCache | None) -> tuple[jax.Array, attention.LayerCache | None]:
  """`vit.Block.__call__` under the causal mask of `positions`, through the KV cache."""
  mha = block.attn
  h = block.norm1(x)
  out, cache = attention.attend(mha.query(h), mha.key(h), mha.value(h), positions, cache)
  x = x + _branch(block, block.ls1, mha.out(out))
  return x + _branch(block, block.ls2, block.mlp(block.norm2(x))), cache
