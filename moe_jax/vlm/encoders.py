"""MoCHA's vision encoders: each maps the batch to visual tokens `[B, T_i, D_i]`.

Kinds (`encoder.kind`):
- `vit`: `moe_jax.models.vit.ViT` patch tokens (a stand-in for CLIP / SigLIP / DINOv2);
- `convnet`: a ConvNeXt-style network (stand-in for ConvNeXt); tokens = its final feature map;
- `features`: precomputed features `batch["features/<name>"]` of shape `[B, tokens, dim]`, for
  real encoders run elsewhere.

Every encoder may be frozen (`trainable=False`: its output is a `stop_gradient`, and the stage's
optimizer mask leaves its weights alone) and may pool channels (`pool_channels`: average adjacent
channels, ConvNeXt-XXL's 3072 -> 1024 in the paper).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moe_jax.models import vit

KINDS = ("vit", "convnet", "features")
# name -> (widths per stage, blocks per stage), as in ConvNeXt (Liu et al. 2022).
CONVNET_SIZES = {
    "T": ((96, 192, 384, 768), (3, 3, 9, 3)), "S": ((96, 192, 384, 768), (3, 3, 27, 3)),
    "B": ((128, 256, 512, 1024), (3, 3, 27, 3)), "L": ((192, 384, 768, 1536), (3, 3, 27, 3)),
    "XXL": ((384, 768, 1536, 3072), (3, 4, 30, 3)),
}


def convnet_config(size: str = "T", **overrides) -> ml_collections.ConfigDict:
  """ConvNet config of a named size; `overrides` replace fields (tiny models)."""
  if size not in CONVNET_SIZES:
    raise ValueError(f"convnet size={size!r} is unknown; use one of {list(CONVNET_SIZES)}")
  widths, depths = CONVNET_SIZES[size]
  c = ml_collections.ConfigDict(dict(widths=widths, depths=depths, stem_patch=4, kernel_size=7,
                                     mlp_ratio=4, dtype="float32"))
  for key, value in overrides.items():
    if key not in c:
      raise ValueError(f"convnet_config: unknown field {key!r}; known: {sorted(c)}")
    c[key] = value
  return c


def encoder_config(kind: str, *, trainable: bool = False, pool_channels: int = 0,
                   vit_variant: str = "L/14", convnet_size: str = "XXL", tokens: int = 0,
                   dim: int = 0, **overrides) -> ml_collections.ConfigDict:
  """One encoder's node. `overrides` go to the backbone's config (`vit` or `convnet`)."""
  c = ml_collections.ConfigDict(dict(kind=kind, trainable=trainable, pool_channels=pool_channels,
                                     tokens=tokens, dim=dim))
  if kind == "vit":
    c.vit = vit.vit_config(vit_variant, **{"num_classes": 0, "pool": "gap", **overrides})
  elif kind == "convnet":
    c.convnet = convnet_config(convnet_size, **overrides)
  elif kind != "features" or overrides:
    raise ValueError(f"encoder kind={kind!r}: use one of {KINDS} (backbone overrides "
                     f"{sorted(overrides)} need kind 'vit' or 'convnet')")
  return c


class ConvBlock(nnx.Module):
  """ConvNeXt block `[B, H, W, C] -> [B, H, W, C]`: depthwise conv, LN, MLP (C -> rC -> C), skip."""

  def __init__(self, dim: int, kernel_size: int, mlp_ratio: int, dtype, *, rngs: nnx.Rngs):
    self.dwconv = nnx.Conv(dim, dim, (kernel_size, kernel_size), feature_group_count=dim,
                           padding="SAME", dtype=dtype, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, mlp_ratio * dim, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_ratio * dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.fc2(nnx.gelu(self.fc1(self.norm(self.dwconv(x)))))


class ConvNet(nnx.Module):
  """ConvNeXt-style encoder: `images [B, H, W, C] -> tokens [B, h*w, widths[-1]]` with
  h = H / (stem_patch * 2^(stages-1))."""

  def __init__(self, c: ml_collections.ConfigDict, channels: int, *, rngs: nnx.Rngs):
    if len(c.widths) != len(c.depths) or not c.widths:
      raise ValueError(f"convnet.widths={c.widths} and convnet.depths={c.depths} must be "
                       "non-empty and of equal length")
    dtype = jnp.dtype(c.dtype)
    p = c.stem_patch
    self.stem = nnx.Conv(channels, c.widths[0], (p, p), strides=(p, p), padding="VALID",
                         dtype=dtype, rngs=rngs)
    self.stem_norm = nnx.LayerNorm(c.widths[0], rngs=rngs)
    self.downsample = nnx.List([
        nnx.Sequential(nnx.LayerNorm(c.widths[i - 1], rngs=rngs),
                       nnx.Conv(c.widths[i - 1], c.widths[i], (2, 2), strides=(2, 2),
                                padding="VALID", dtype=dtype, rngs=rngs))
        for i in range(1, len(c.widths))])
    self.stages = nnx.List([
        nnx.Sequential(*[ConvBlock(w, c.kernel_size, c.mlp_ratio, dtype, rngs=rngs)
                         for _ in range(d)])
        for w, d in zip(c.widths, c.depths)])
    self.norm = nnx.LayerNorm(c.widths[-1], rngs=rngs)
    self.dtype = dtype

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.stages[0](self.stem_norm(self.stem(images.astype(self.dtype))))
    for down, stage in zip(self.downsample, self.stages[1:]):
      x = stage(down(x))
    return self.norm(x.reshape(x.shape[0], -1, x.shape[-1]))


class Encoder(nnx.Module):
  """One encoder of MoCHA: `inputs (the batch dict) -> [B, num_tokens, dim]`."""

  def __init__(self, name: str, c: ml_collections.ConfigDict, *, image_size: int, channels: int,
               rngs: nnx.Rngs):
    field = f"model.encoders.{name}"
    self.name, self.trainable = name, c.trainable
    if c.kind == "vit":
      v = ml_collections.ConfigDict(c.vit)
      v.image_size, v.channels = image_size, channels
      self.backbone = vit.ViT(v, rngs=rngs)
      tokens, dim = (image_size // v.patch_size) ** 2 + (v.pool == "cls"), v.width
    elif c.kind == "convnet":
      self.backbone = ConvNet(c.convnet, channels, rngs=rngs)
      side = image_size // c.convnet.stem_patch // 2 ** (len(c.convnet.widths) - 1)
      if side < 1:
        raise ValueError(f"{field}.convnet: image_size={image_size} is too small for its "
                         "stem_patch and stages")
      tokens, dim = side * side, c.convnet.widths[-1]
    elif c.kind == "features":
      if c.tokens < 1 or c.dim < 1:
        raise ValueError(f"{field}.tokens={c.tokens} and .dim={c.dim} must be >= 1 for "
                         "kind='features'")
      self.backbone = None
      tokens, dim = c.tokens, c.dim
    else:
      raise ValueError(f"{field}.kind={c.kind!r} is unknown; use one of {KINDS}")
    if c.pool_channels and (c.pool_channels < 0 or dim % c.pool_channels):
      raise ValueError(f"{field}.pool_channels={c.pool_channels} must divide the encoder width "
                       f"{dim} (0 = no pooling)")
    self.pool_channels = c.pool_channels
    self.num_tokens, self.dim = tokens, c.pool_channels or dim

  def raw_tokens(self, inputs: dict[str, jax.Array]) -> jax.Array:
    """The backbone's tokens `[B, num_tokens, D_i]` before pooling."""
    if self.backbone is None:
      return inputs[f"features/{self.name}"]
    if isinstance(self.backbone, vit.ViT):
      return self.backbone.tokens(inputs["image"])
    return self.backbone(inputs["image"])

  def __call__(self, inputs: dict[str, jax.Array]) -> jax.Array:
    x = self.raw_tokens(inputs).astype(jnp.float32)
    if self.pool_channels:
      x = pool_channels(x, self.pool_channels)
    return x if self.trainable else jax.lax.stop_gradient(x)


def pool_channels(x: jax.Array, out: int) -> jax.Array:
  """`[..., D] -> [..., out]`: mean of each run of D/out adjacent channels."""
  return x.reshape(*x.shape[:-1], out, x.shape[-1] // out).mean(-1)
