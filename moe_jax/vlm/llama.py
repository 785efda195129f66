"""LLaMA / Vicuna (HF `LlamaForCausalLM`) as an NNX decoder: pre-RMSNorm blocks, SwiGLU MLP
(`down(silu(gate(x)) * up(x))`), rotary embeddings over the whole head (`rope_theta`; HF's
"default" rope type only), grouped-query attention (`num_kv_heads`), no biases, final RMSNorm,
untied or tied (`tie_embeddings`) LM head. Optional MoE MLPs (`moe_layers`) replace the SwiGLU.
Weights from HF safetensors: `moe_jax.checkpoints.hf_decoders`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moe_jax.parallel.grad_precision import Linear, broadcast_cast
from moe_jax.vlm import attention, lm


def llama_config(width: int = 4096, depth: int = 32, mlp_dim: int = 11008, num_heads: int = 32,
                 num_kv_heads: int = 32, vocab_size: int = 32000, max_len: int = 4096,
                 rope_theta: float = 10_000.0, norm_eps: float = 1e-5,
                 tie_embeddings: bool = False, moe_layers: str = "") -> ml_collections.ConfigDict:
  """Decoder node of a LLaMA model (defaults: lmsys/vicuna-7b-v1.5). Fields: `lm.lm_config`."""
  return lm.lm_config("llama", width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
                      num_kv_heads=num_kv_heads, vocab_size=vocab_size, max_len=max_len,
                      rotary_fraction=1.0, rope_theta=rope_theta, norm_eps=norm_eps,
                      tie_embeddings=tie_embeddings, moe_layers=moe_layers)


class RMSNorm(nnx.Module):
  """`scale * (x / rms(x))` over the last axis, normalised in float32 then cast back to `x`'s
  dtype before the scale (as HF `LlamaRMSNorm`). `[..., D] -> [..., D]`."""

  def __init__(self, c: ml_collections.ConfigDict):
    self.eps = c.norm_eps
    self.scale = nnx.Param(jnp.ones((c.width,), jnp.dtype(c.param_dtype)))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return broadcast_cast(self.scale[...], x.shape, x.dtype) * normed.astype(x.dtype)


class SwiGLU(nnx.Module):
  """`[..., D] -> [..., D]`: `down(silu(gate(x)) * up(x))`, gate / up D -> F, down F -> D."""

  def __init__(self, c: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    linear = lambda n_in, n_out: Linear(n_in, n_out, use_bias=False, dtype=jnp.dtype(c.dtype),
                                        param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)
    self.gate, self.up, self.down = (linear(c.width, c.mlp_dim), linear(c.width, c.mlp_dim),
                                     linear(c.mlp_dim, c.width))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nnx.Module):
  """`x + attn(norm1(x))`, then `+ mlp(norm2(x))`, `[B, T, D] -> [B, T, D]`."""

  def __init__(self, c: ml_collections.ConfigDict, mlp: nnx.Module | None, *, rngs: nnx.Rngs):
    self.norm1, self.norm2 = RMSNorm(c), RMSNorm(c)
    self.attn = attention.SelfAttention(c, bias=False, rngs=rngs)
    self.mlp = mlp if mlp is not None else SwiGLU(c, rngs=rngs)

  def __call__(self, x, positions, cache):
    a, cache = self.attn(self.norm1(x), positions, cache)
    x = x + a
    return x + self.mlp(self.norm2(x)), cache


class Llama(lm.CausalLM):
  """LLaMA causal LM; see the module docstring. Parameters: `embed`, `blocks/{i}/{norm1, attn,
  norm2, mlp}` (`blocks/stacked/...` `[depth, ...]` with `scan_layers`), `norm`, `head`
  (kernel; absent when tied: logits = h @ embed^T)."""

  def __init__(self, c: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    c = self.init_trunk(c, LlamaBlock, rngs=rngs)
    self.norm = RMSNorm(c)
    self.head = None if c.tie_embeddings else Linear(
        c.width, c.vocab_size, use_bias=False, dtype=self.dtype,
        param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)

  def logits(self, h):
    out = self.embed.attend(h) if self.head is None else self.head(h)
    return out.astype(jnp.float32)
