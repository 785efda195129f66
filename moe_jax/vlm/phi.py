"""Phi-2 (HF `PhiForCausalLM`) as an NNX decoder: each block adds attention and MLP, both of one
LayerNorm's output, to its input (parallel block); rotary embeddings on the first
`rotary_fraction` of each head's dims; dense q/k/v/out with biases; `gelu_new` (tanh GELU);
final LayerNorm; LM head with bias. Optional MoE MLPs (`moe_layers`) replace the dense MLP.
HF's `qk_layernorm=True` (off in Phi-2) is not supported (`moe_jax.checkpoints.hf_decoders`
refuses it). Weights from HF safetensors: `moe_jax.checkpoints.hf_decoders`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moe_jax.parallel.grad_precision import LayerNorm, Linear
from moe_jax.vlm import attention, lm


def phi_config(width: int = 2560, depth: int = 32, mlp_dim: int = 10240, num_heads: int = 32,
               num_kv_heads: int = 32, vocab_size: int = 51200, max_len: int = 2048,
               rotary_fraction: float = 0.4, rope_theta: float = 10_000.0,
               norm_eps: float = 1e-5, moe_layers: str = "") -> ml_collections.ConfigDict:
  """Decoder node of a Phi model (defaults: microsoft/phi-2). Fields: `lm.lm_config`."""
  return lm.lm_config("phi", width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
                      num_kv_heads=num_kv_heads, vocab_size=vocab_size, max_len=max_len,
                      rotary_fraction=rotary_fraction, rope_theta=rope_theta, norm_eps=norm_eps,
                      tie_embeddings=False, moe_layers=moe_layers)


class PhiMlp(nnx.Module):
  """`[..., D] -> [..., D]`: fc1 (D -> F), tanh GELU (`gelu_new`), fc2 (F -> D)."""

  def __init__(self, c: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)
    self.fc1 = Linear(c.width, c.mlp_dim, **kw)
    self.fc2 = Linear(c.mlp_dim, c.width, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class PhiBlock(nnx.Module):
  """`x + attn(LN(x)) + mlp(LN(x))`, `[B, T, D] -> [B, T, D]`."""

  def __init__(self, c: ml_collections.ConfigDict, mlp: nnx.Module | None, *, rngs: nnx.Rngs):
    self.norm = _layer_norm(c, rngs)
    self.attn = attention.SelfAttention(c, bias=True, rngs=rngs)
    self.mlp = mlp if mlp is not None else PhiMlp(c, rngs=rngs)

  def __call__(self, x, positions, cache):
    h = self.norm(x)
    a, cache = self.attn(h, positions, cache)
    return x + a + self.mlp(h), cache


def _layer_norm(c: ml_collections.ConfigDict, rngs: nnx.Rngs) -> LayerNorm:
  return LayerNorm(c.width, epsilon=c.norm_eps, dtype=jnp.dtype(c.dtype),
                   param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)


class Phi(lm.CausalLM):
  """Phi causal LM; see the module docstring. Parameters: `embed`, `blocks/{i}/{norm, attn,
  mlp}` (`blocks/stacked/...` `[depth, ...]` with `scan_layers`), `norm` (HF
  `final_layernorm`), `head` (kernel + bias)."""

  def __init__(self, c: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    c = self.init_trunk(c, PhiBlock, rngs=rngs)
    self.norm = _layer_norm(c, rngs)
    self.head = Linear(c.width, c.vocab_size, dtype=self.dtype,
                       param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)

  def logits(self, h):
    return self.head(h).astype(jnp.float32)
