"""Vision Transformer (Dosovitskiy et al. 2021) in Flax NNX, big_vision style; dense baseline.

`ViT(config, rngs=..., mlp_factory=...)` maps images `[B, H, W, C]` to logits `[B, classes]`.
`mlp_factory(block_index, dim, rngs)` may return a module to use as a block's MLP (ViMoE plugs
its MoE layers in this way) or None for the dense `Mlp`. `hidden_states(images, layer)` gives the
tokens after any block (HF's `hidden_states[layer]`; CLIP features for MoCHA are layer -2).

Knobs that pretrained checkpoints need (`BLOCK_VARIANTS`, `EMBED_VARIANTS`, `pool="map"`) cover
HF ViT, DINOv2 (LayerScale, registers), CLIP (pre-LN, QuickGELU, no patch bias) and SigLIP /
big_vision (no class token, MAP head); `moe_jax.checkpoints` sets them from the checkpoint.

`scan_layers=True` builds the blocks once, stacked on a leading layer axis (`blocks/stacked/...`
`[depth, ...]`), and runs them with one scan (`moe_jax.models.stacked`); `hidden_states(images,
layer)` then scans only the blocks before `layer` (CLIP's penultimate layer runs depth - 1).
Identical deterministic blocks only: refused with an `mlp_factory` (ViMoE's MoE blocks), dropout
or stochastic depth (one-line ValueError naming the field).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moe_jax.models import remat, stacked
from moe_jax.parallel import grad_precision
from moe_jax.parallel.grad_precision import broadcast_cast

# name -> (width, depth, mlp_dim, heads), as in big_vision.
SIZES = {
    "Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16), "H": (1280, 32, 5120, 16),
}
# The `Block` knobs that pretrained checkpoints need (moe_jax.checkpoints); defaults = big_vision.
BLOCK_VARIANTS = dict(
    gelu_approximate=True,  # tanh GELU; False = exact erf GELU (HF ViT, DINOv2)
    layer_norm_eps=1e-6,
    layer_scale=0.0,  # > 0: LayerScale on both residual branches, initialised to this (DINOv2)
    quick_gelu=False)  # x * sigmoid(1.702 x) in the MLPs (OpenAI CLIP); then gelu_approximate unused
# The embedding knobs that pretrained checkpoints need; defaults = big_vision.
EMBED_VARIANTS = dict(
    patch_bias=True,  # False: the patch projection has no bias (CLIP)
    pre_norm=False,  # True: LayerNorm on the embedded tokens before the first block (CLIP)
    num_registers=0)  # register tokens after the CLS token (DINOv2 with registers)
# Fields a pretrained checkpoint fixes: a model config that differs from it computes another function.
CHECKPOINT_FIELDS = (*BLOCK_VARIANTS, *EMBED_VARIANTS)
POOLS = ("cls", "gap", "map")
MlpFactory = Callable[[int, int, nnx.Rngs], nnx.Module | None]


def vit_config(variant: str = "S/16", **overrides) -> ml_collections.ConfigDict:
  """Model config of a named ViT (e.g. "B/16"); `overrides` replace any field (tiny models)."""
  size, _, patch = variant.partition("/")
  if size not in SIZES or not patch.isdigit():
    raise ValueError(f"ViT variant {variant!r}: use <size>/<patch> with size in {list(SIZES)}")
  width, depth, mlp_dim, heads = SIZES[size]
  c = ml_collections.ConfigDict(dict(
      name="vit", width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
      patch_size=int(patch), image_size=224, channels=3, num_classes=1000,
      pool="cls",  # 'cls' token, 'gap' (global average pooling) or 'map' (attention-pooling head)
      posemb="learned",  # 'learned' or 'sincos2d'
      dropout_rate=0.0, attention_dropout_rate=0.0, stochastic_depth=0.0,
      dtype="float32",  # compute dtype; params stay float32
      head_zero_init=True,
      head_bias_init=0.0,  # the head's initial bias (vmoe: -log(num_classes), with sigmoid loss)
      # > 0: a pre-logits layer, dense width -> representation_size + tanh, between the pooled
      # features and the head (big_vision / vmoe `representation_size`); 0 = none.
      representation_size=0,
      **BLOCK_VARIANTS, **EMBED_VARIANTS,
      remat_policy="none",  # per block: moe_jax.models.remat.POLICIES (e.g. 'dots_saveable')
      scan_layers=False))  # True: blocks stacked and scanned (moe_jax.models.stacked)
  return with_overrides(c, overrides, "vit_config")


def with_overrides(c: ml_collections.ConfigDict, overrides: dict,
                   maker: str) -> ml_collections.ConfigDict:
  """`c` with `overrides` set; ValueError naming an override that is not a field of `c`."""
  for key, value in overrides.items():
    if key not in c:
      raise ValueError(f"{maker}: unknown field {key!r}; known: {sorted(c)}")
    c[key] = value
  return c


def _validate(c: ml_collections.ConfigDict) -> None:
  if c.image_size % c.patch_size:
    raise ValueError(f"model.image_size={c.image_size} must be divisible by "
                     f"model.patch_size={c.patch_size}")
  if c.width % c.num_heads:
    raise ValueError(f"model.width={c.width} must be divisible by model.num_heads={c.num_heads}")
  if c.representation_size < 0:
    raise ValueError(f"model.representation_size={c.representation_size} must be >= 0 "
                     "(0 = no pre-logits layer)")
  if c.pool not in POOLS:
    raise ValueError(f"model.pool={c.pool!r} must be one of {POOLS}")
  if c.posemb not in ("learned", "sincos2d"):
    raise ValueError(f"model.posemb={c.posemb!r} must be 'learned' or 'sincos2d'")
  remat.validate(c.remat_policy)
  if c.layer_scale < 0 or c.num_registers < 0 or c.layer_norm_eps <= 0:
    raise ValueError(f"model.layer_scale={c.layer_scale} and model.num_registers="
                     f"{c.num_registers} must be >= 0, model.layer_norm_eps={c.layer_norm_eps} > 0")
  random = {f: c[f] for f in ("dropout_rate", "attention_dropout_rate", "stochastic_depth") if c[f]}
  if c.scan_layers and random:
    field, value = next(iter(random.items()))
    raise ValueError(f"model.scan_layers=True runs deterministic blocks only, but model.{field}="
                     f"{value}: set it to 0 or model.scan_layers=False")


def sincos_2d(grid: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding `[grid*grid, width]` (MoCo v3 / big_vision)."""
  if width % 4:
    raise ValueError(f"model.width={width} must be divisible by 4 for posemb='sincos2d'")
  y, x = np.mgrid[:grid, :grid]
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class Mlp(nnx.Module):
  """Dense block MLP `[..., D] -> [..., D]`: fc1 (D -> F), GELU, dropout, fc2 (F -> D)."""

  def __init__(self, dim: int, hidden: int, *, dropout_rate: float, dtype, rngs: nnx.Rngs,
               gelu_approximate: bool = True, quick_gelu: bool = False):
    self.gelu_approximate, self.quick_gelu = gelu_approximate, quick_gelu
    init = dict(kernel_init=nnx.initializers.xavier_uniform(),
                bias_init=nnx.initializers.normal(1e-6))
    self.fc1 = grad_precision.Linear(dim, hidden, dtype=dtype, rngs=rngs, **init)
    self.fc2 = grad_precision.Linear(hidden, dim, dtype=dtype, rngs=rngs, **init)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.fc1(x)
    h = h * jax.nn.sigmoid(1.702 * h) if self.quick_gelu else nnx.gelu(h, self.gelu_approximate)
    return self.fc2(self.dropout(h))


class DropPath(nnx.Module):
  """Stochastic depth: drops the whole residual branch per example with probability `rate`."""

  def __init__(self, rate: float, *, rngs: nnx.Rngs):
    self.rate, self.rngs, self.deterministic = rate, rngs.fork(), False

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic or self.rate == 0.0:
      return x
    keep = jax.random.bernoulli(self.rngs.dropout(), 1.0 - self.rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)


class LayerScale(nnx.Module):
  """Learned per-channel scale of a residual branch (Touvron et al. 2021): `[..., D] -> [..., D]`."""

  def __init__(self, dim: int, init: float):
    self.scale = nnx.Param(jnp.full((dim,), init, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * broadcast_cast(self.scale[...], x.shape, x.dtype)


class Block(nnx.Module):
  """Pre-LN encoder block: x + attn(LN(x)); x + mlp(LN(x)), each branch optionally LayerScaled.
  `[B, T, D] -> [B, T, D]`."""

  def __init__(self, c: ml_collections.ConfigDict, drop_path: float, mlp: nnx.Module | None, *,
               rngs: nnx.Rngs):
    dtype = jnp.dtype(c.dtype)
    self.norm1 = nnx.LayerNorm(c.width, epsilon=c.layer_norm_eps, rngs=rngs)
    self.attn = grad_precision.MultiHeadAttention(
        c.num_heads, c.width, dtype=dtype, dropout_rate=c.attention_dropout_rate,
        kernel_init=nnx.initializers.xavier_uniform(), decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(c.width, epsilon=c.layer_norm_eps, rngs=rngs)
    self.mlp = mlp if mlp is not None else Mlp(c.width, c.mlp_dim, dropout_rate=c.dropout_rate,
                                               dtype=dtype, rngs=rngs,
                                               gelu_approximate=c.gelu_approximate,
                                               quick_gelu=c.quick_gelu)
    self.ls1, self.ls2 = ((LayerScale(c.width, c.layer_scale), LayerScale(c.width, c.layer_scale))
                          if c.layer_scale else (None, None))
    self.dropout = nnx.Dropout(c.dropout_rate, rngs=rngs)
    self.drop_path = DropPath(drop_path, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """`mask`: optional attention mask broadcastable to `[B, heads, T, T]` (True = attend)."""
    x = x + self.drop_path(self.dropout(_scaled(self.ls1, self.attn(self.norm1(x), mask=mask))))
    return x + self.drop_path(self.dropout(_scaled(self.ls2, self.mlp(self.norm2(x)))))


def _scaled(layer_scale: LayerScale | None, x: jax.Array) -> jax.Array:
  return x if layer_scale is None else layer_scale(x)


class MAPHead(nnx.Module):
  """Multi-head attention pooling (big_vision `MAPHead`, HF SigLIP's pooling head): a learned
  probe attends over the tokens, then + MLP(LN(.)). `[B, T, D] -> [B, D]`."""

  def __init__(self, c: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(c.dtype)
    self.probe = nnx.Param(nnx.initializers.xavier_uniform()(rngs.params(), (1, 1, c.width)))
    self.attn = grad_precision.MultiHeadAttention(
        c.num_heads, c.width, dtype=dtype, decode=False,
        kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs)
    self.norm = nnx.LayerNorm(c.width, epsilon=c.layer_norm_eps, rngs=rngs)
    self.mlp = Mlp(c.width, c.mlp_dim, dropout_rate=0.0, dtype=dtype, rngs=rngs,
                   gelu_approximate=c.gelu_approximate, quick_gelu=c.quick_gelu)

  def __call__(self, x: jax.Array) -> jax.Array:
    probe = broadcast_cast(self.probe[...], (x.shape[0], 1, x.shape[-1]), x.dtype)
    y = self.attn(probe, x, x)
    return (y + self.mlp(self.norm(y)))[:, 0]


class ViT(nnx.Module):
  """`images [B, H, W, C] -> logits [B, num_classes]` (features `[B, D]` if num_classes=0)."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               mlp_factory: MlpFactory | None = None):
    _validate(config)
    c = config
    self.dtype = jnp.dtype(c.dtype)
    self.pool = c.pool
    self.remat_policy = c.remat_policy
    p, D = c.patch_size, c.width
    grid = c.image_size // p
    self.patch_embed = grad_precision.Conv(c.channels, D, (p, p), strides=(p, p), padding="VALID",
                                           use_bias=c.patch_bias, dtype=self.dtype, rngs=rngs)
    if c.posemb == "learned":
      self.posemb = nnx.Param(nnx.initializers.normal(1 / np.sqrt(D))(rngs.params(),
                                                                     (1, grid * grid, D)))
    else:
      self.posemb = nnx.Variable(jnp.asarray(sincos_2d(grid, D))[None])
    self.cls = nnx.Param(jnp.zeros((1, 1, D))) if c.pool == "cls" else None
    self.registers = (nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, c.num_registers, D)))
                      if c.num_registers else None)
    self.dropout = nnx.Dropout(c.dropout_rate, rngs=rngs)
    self.pre_norm = nnx.LayerNorm(D, epsilon=c.layer_norm_eps, rngs=rngs) if c.pre_norm else None
    if c.scan_layers and mlp_factory is not None:
      raise ValueError("model.scan_layers=True needs identical blocks, but this model builds its "
                       "own MLPs per block (ViMoE's MoE layers): set model.scan_layers=False")
    if c.scan_layers:
      self.blocks = stacked.Stacked(lambda r: Block(c, 0.0, None, rngs=r), c.depth, rngs=rngs)
    else:
      rates = np.linspace(0.0, c.stochastic_depth, c.depth)
      factory = mlp_factory or (lambda i, d, r: None)
      self.blocks = nnx.List([Block(c, float(rates[i]), factory(i, D, rngs), rngs=rngs)
                              for i in range(c.depth)])
    self.norm = nnx.LayerNorm(D, epsilon=c.layer_norm_eps, rngs=rngs)
    self.map_head = MAPHead(c, rngs=rngs) if c.pool == "map" else None
    R = c.representation_size
    self.pre_logits = nnx.Linear(D, R, rngs=rngs) if R else None
    head_init = nnx.initializers.zeros_init() if c.head_zero_init else nnx.initializers.xavier_uniform()
    self.head = (nnx.Linear(R or D, c.num_classes, kernel_init=head_init,
                            bias_init=nnx.initializers.constant(c.head_bias_init), rngs=rngs)
                 if c.num_classes else None)

  def hidden_states(self, images: jax.Array, layer: int = -1) -> jax.Array:
    """Tokens `[B, T, D]` after `layer` blocks, without the final norm: HF's
    `hidden_states[layer]` (0 = the embedded tokens after any pre-norm, -1 = the last block's
    output, -2 = the penultimate block's, MoCHA's CLIP features). Token order: the CLS token
    (pool='cls'), the register tokens (no position embedding), then the grid*grid patches."""
    depth = len(self.blocks)
    if not -depth - 1 <= layer <= depth:
      raise ValueError(f"hidden_states: layer={layer} must lie in [{-depth - 1}, {depth}] "
                       f"(model.depth={depth})")
    x = self.patch_embed(images.astype(self.dtype))
    B = x.shape[0]
    x = x.reshape(B, -1, x.shape[-1])
    x = x + broadcast_cast(self.posemb[...], x.shape, self.dtype)
    prefix = [broadcast_cast(p[...], (B,) + p.shape[1:], self.dtype)
              for p in (self.cls, self.registers) if p is not None]
    x = jnp.concatenate(prefix + [x], 1) if prefix else x
    x = self.dropout(x)
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    n = layer % (depth + 1)
    if isinstance(self.blocks, stacked.Stacked):
      if n:
        x = self.blocks.scan(lambda block, x, _: (block(x), None), x, length=n,
                             policy=self.remat_policy)[0]
      return x
    for i in range(n):
      x = remat.call(self.blocks[i], self.remat_policy, x)
    return x

  def tokens(self, images: jax.Array) -> jax.Array:
    """Final-norm token representations `[B, T, D]` (order as in `hidden_states`)."""
    return self.norm(self.hidden_states(images))

  def features(self, images: jax.Array) -> jax.Array:
    """Pre-head representation `[B, D]` (`[B, representation_size]` with a pre-logits layer):
    the CLS token, the mean patch token or the MAP head's output, of the final-norm tokens,
    then `tanh(pre_logits(.))` when model.representation_size > 0."""
    x = self.tokens(images)
    if self.pool == "cls":
      x = x[:, 0]
    elif self.pool == "map":
      x = self.map_head(x)
    else:
      x = jnp.mean(x[:, 0 if self.registers is None else self.registers.shape[1]:], axis=1)
    return x if self.pre_logits is None else jnp.tanh(self.pre_logits(x.astype(jnp.float32)))

  def __call__(self, images: jax.Array) -> jax.Array:
    """Logits `[B, num_classes]`; the features `[B, D]` when num_classes=0 (no head)."""
    features = self.features(images)
    return features if self.head is None else self.head(features.astype(jnp.float32))
