"""ConvNeXt (Liu et al. 2022) in Flax NNX, numerically as HF `ConvNextModel` / the official code.

`ConvNeXt(config, rngs=...)` maps images `[B, H, W, C]` to logits `[B, num_classes]` (the pooled
features `[B, D]` when num_classes=0):

- stem: p x p conv with stride p (p = patch_size, 4), then LayerNorm;
- stages s = 0..n-1 of width `widths[s]`; stages after the first start by downsampling
  (LayerNorm, 2x2 conv with stride 2); each block is x + drop_path(ls * fc2(GELU(fc1(LN(
  dwconv7x7(x)))))) (depthwise conv, MLP 4x wide, exact erf GELU, LayerScale `ls`);
- `tokens(images)`: the last stage's map as tokens `[B, h*w, D]`, row-major, no norm (HF's
  `last_hidden_state`; MoCHA's ConvNeXt features); `features`: LN(mean of the tokens) `[B, D]`.

Every LayerNorm has epsilon `layer_norm_eps` (1e-6) except the final pooled one:
`head_norm_eps` (HF's `config.layer_norm_eps`, 1e-12 by default; 1e-6 in the official code).

`scan_layers=True` builds each stage's blocks once, stacked on a leading layer axis
(`stages/{s}/blocks/stacked/...` `[depths[s], ...]`), and runs them with one scan per stage
(`moe_jax.models.stacked`); it needs `stochastic_depth=0` (the blocks' drop rates differ).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moe_jax.models import stacked
from moe_jax.models.vit import DropPath, LayerScale, with_overrides
from moe_jax.parallel.grad_precision import Conv, Linear
from moe_jax.vlm.attention import shard_batch

# name -> (widths, depths), as in the paper (XXL: the LAION CLIP ConvNeXt-XXLarge).
SIZES = {
    "T": ((96, 192, 384, 768), (3, 3, 9, 3)), "S": ((96, 192, 384, 768), (3, 3, 27, 3)),
    "B": ((128, 256, 512, 1024), (3, 3, 27, 3)), "L": ((192, 384, 768, 1536), (3, 3, 27, 3)),
    "XL": ((256, 512, 1024, 2048), (3, 3, 27, 3)), "XXL": ((384, 768, 1536, 3072), (3, 4, 30, 3)),
}
# Fields a pretrained checkpoint fixes: a model config that differs from it computes another function.
CHECKPOINT_FIELDS = ("layer_norm_eps", "head_norm_eps", "gelu_approximate", "layer_scale")


def convnext_config(variant: str = "T", **overrides) -> ml_collections.ConfigDict:
  """Model config of a named ConvNeXt (T, S, B, L, XL, XXL); `overrides` replace any field."""
  if variant not in SIZES:
    raise ValueError(f"ConvNeXt variant {variant!r}: use one of {list(SIZES)}")
  widths, depths = SIZES[variant]
  c = ml_collections.ConfigDict(dict(
      name="convnext", widths=widths, depths=depths, patch_size=4, image_size=224, channels=3,
      num_classes=1000, stochastic_depth=0.0, dtype="float32",
      layer_norm_eps=1e-6, head_norm_eps=1e-6,
      gelu_approximate=False,  # exact erf GELU (the official code, HF)
      layer_scale=1e-6,  # LayerScale init value; 0 = no LayerScale
      head_zero_init=True,
      scan_layers=False))  # True: each stage's blocks stacked and scanned (moe_jax.models.stacked)
  return with_overrides(c, overrides, "convnext_config")


def _validate(c: ml_collections.ConfigDict) -> None:
  if not c.widths or len(c.widths) != len(c.depths) or min(c.depths) < 1:
    raise ValueError(f"model.widths={tuple(c.widths)} and model.depths={tuple(c.depths)} must "
                     "have one entry >= 1 per stage")
  side = c.image_size // c.patch_size // 2 ** (len(c.widths) - 1)
  if side < 1:
    raise ValueError(f"model.image_size={c.image_size} is too small for model.patch_size="
                     f"{c.patch_size} and {len(c.widths)} stages")
  if c.layer_scale < 0 or c.layer_norm_eps <= 0 or c.head_norm_eps <= 0:
    raise ValueError(f"model.layer_scale={c.layer_scale} must be >= 0, model.layer_norm_eps="
                     f"{c.layer_norm_eps} and model.head_norm_eps={c.head_norm_eps} > 0")
  if c.scan_layers and c.stochastic_depth:
    raise ValueError(f"model.scan_layers=True needs identical blocks, but model.stochastic_depth="
                     f"{c.stochastic_depth} gives each its own drop rate: set it to 0 or "
                     "model.scan_layers=False")


class ConvNeXtBlock(nnx.Module):
  """`[B, h, w, d] -> [B, h, w, d]`: x + drop_path(ls(fc2(GELU(fc1(LN(dwconv(x)))))))."""

  def __init__(self, c: ml_collections.ConfigDict, dim: int, drop_path: float, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(c.dtype)
    self.gelu_approximate = c.gelu_approximate
    self.dwconv = Conv(dim, dim, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=dim,
                       dtype=dtype, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, epsilon=c.layer_norm_eps, rngs=rngs)
    self.fc1 = Linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
    self.fc2 = Linear(4 * dim, dim, dtype=dtype, rngs=rngs)
    self.ls = LayerScale(dim, c.layer_scale) if c.layer_scale else None
    self.drop_path = DropPath(drop_path, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = shard_batch(self.fc1(self.norm(self.dwconv(x))))  # as `moe_jax.vlm.encoders.ConvBlock`
    y = self.fc2(nnx.gelu(h, self.gelu_approximate))
    return x + self.drop_path(y if self.ls is None else self.ls(y))


class Stage(nnx.Module):
  """Optional downsampling (LN + 2x2 stride-2 conv, `d_in -> d`), then blocks: `[B, h, w, d_in]
  -> [B, h', w', d]`."""

  def __init__(self, c: ml_collections.ConfigDict, d_in: int, dim: int, depth: int,
               downsample: bool, drop_paths: list[float], *, rngs: nnx.Rngs):
    self.downsample_norm = (nnx.LayerNorm(d_in, epsilon=c.layer_norm_eps, rngs=rngs)
                            if downsample else None)
    self.downsample = (Conv(d_in, dim, (2, 2), strides=(2, 2), padding="VALID",
                            dtype=jnp.dtype(c.dtype), rngs=rngs) if downsample else None)
    if c.scan_layers:
      self.blocks = stacked.Stacked(lambda r: ConvNeXtBlock(c, dim, 0.0, rngs=r), depth, rngs=rngs)
    else:
      self.blocks = nnx.List([ConvNeXtBlock(c, dim, drop_paths[j], rngs=rngs)
                              for j in range(depth)])

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.downsample is not None:
      x = self.downsample(self.downsample_norm(x))
    if isinstance(self.blocks, stacked.Stacked):
      return self.blocks.scan(lambda block, x, _: (block(x), None), x)[0]
    for block in self.blocks:
      x = block(x)
    return x


class ConvNeXt(nnx.Module):
  """`images [B, H, W, C] -> logits [B, num_classes]` (features `[B, D]` if num_classes=0)."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    _validate(config)
    c = config
    self.dtype = jnp.dtype(c.dtype)
    widths, p = tuple(c.widths), c.patch_size
    self.stem = Conv(c.channels, widths[0], (p, p), strides=(p, p), padding="VALID",
                     dtype=self.dtype, rngs=rngs)
    self.stem_norm = nnx.LayerNorm(widths[0], epsilon=c.layer_norm_eps, rngs=rngs)
    rates = np.split(np.linspace(0.0, c.stochastic_depth, sum(c.depths)),
                     np.cumsum(c.depths)[:-1])
    self.stages = nnx.List([
        Stage(c, widths[max(s - 1, 0)], widths[s], c.depths[s], s > 0, rates[s].tolist(),
              rngs=rngs) for s in range(len(widths))])
    self.norm = nnx.LayerNorm(widths[-1], epsilon=c.head_norm_eps, rngs=rngs)
    head_init = nnx.initializers.zeros_init() if c.head_zero_init else nnx.initializers.xavier_uniform()
    self.head = (nnx.Linear(widths[-1], c.num_classes, kernel_init=head_init, rngs=rngs)
                 if c.num_classes else None)

  def tokens(self, images: jax.Array) -> jax.Array:
    """The last stage's feature map as tokens `[B, h*w, D]` (row-major), without a norm."""
    x = self.stem_norm(self.stem(images.astype(self.dtype)))
    for stage in self.stages:
      x = stage(x)
    return x.reshape(x.shape[0], -1, x.shape[-1])

  def features(self, images: jax.Array) -> jax.Array:
    """Pooled representation `[B, D]`: LayerNorm of the mean token."""
    return self.norm(jnp.mean(self.tokens(images), axis=1))

  def __call__(self, images: jax.Array) -> jax.Array:
    """Logits `[B, num_classes]`; the features `[B, D]` when num_classes=0 (no head)."""
    features = self.features(images)
    return features if self.head is None else self.head(features.astype(jnp.float32))
