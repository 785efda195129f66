"""MoCHA's vision encoders: each maps the batch to visual tokens `[B, T_i, D_i]`.

Kinds (`encoder.kind`):
- `clip`, `siglip`, `dinov2`, `convnext`: the library's ViT / ConvNeXt (`backbone`: its model
  config, e.g. `importers.import_checkpoint(path)[0]`) holding the pretrained weights of
  `checkpoint` (any format `importers.import_checkpoint` reads), features taken as the reference
  code takes them (Pbhgit/MoCHA, llava/model/multimodal_encoder/*_encoder.py, `feature_select`;
  `REFERENCE_FEATURES`):
  - clip (`CLIPVisionTower`, ViT-L/14-336): `hidden_states[-2][:, 1:]`, the penultimate block's
    tokens without the class token;
  - siglip (`SigLipVisionTower`, SigLIP-L/16-384): the reference deletes the last block, then
    takes `hidden_states[-2][:, 1:]`: the tokens after block L-2 of L (our layer -3), without the
    first token; SigLIP has no class token, so that is the first patch (reference behaviour);
  - dinov2 (`DINOVisionTower`, torch-hub dinov2_vitl14): `x_prenorm[:, 1:]`, the last block's
    tokens before the final norm, without the class token;
  - convnext (`ConvNextVisionTower`, timm convnext_xxlarge.clip_laion2b_soup_ft_in1k): the last
    stage's map as tokens, no norm; `pool_channels=1024` is the reference's
    `nn.AvgPool1d(kernel_size=3, stride=3)` over channels (3072 -> 1024).
  Images: the reference feeds every encoder the same tensor, the CLIP tower's image processor's
  output (336 px, CLIP mean / std, `data_args.image_processor = vision_tower.image_processor`),
  whatever each encoder was trained with (`TRAINED_WITH`); so does MoCHA here (`model.image_size`,
  one `image`).
- `vit`: a `moe_jax.models.vit.ViT` from scratch (its patch tokens after the final norm);
- `convnet`: a small ConvNeXt-style network from scratch; tokens = its final feature map;
- `features`: precomputed features `batch["features/<name>"]` of shape `[B, tokens, dim]`, for
  encoders run elsewhere.

Every encoder may be frozen (`trainable=False`: its output is a `stop_gradient`, and the stage's
optimizer mask leaves its weights alone) and may pool channels (`pool_channels`: average adjacent
channels). Checkpoints are loaded into an initialised model by `moe_jax.vlm.pretrained` (the
trainer does it for a fresh run); SigLIP's and DINOv2's position embeddings are resized to
`model.image_size`'s patch grid as the reference does (`resize_posemb_bicubic`, offsets
`POSEMB_OFFSET`), CLIP's never (the reference runs it at its native 336 px).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moe_jax.models import convnext, vit
from moe_jax.parallel.grad_precision import Conv, Linear
from moe_jax.vlm import attention


@dataclasses.dataclass(frozen=True)
class ReferenceFeatures:
  """How the reference takes an encoder's tokens: our `backbone.name`, the ViT `hidden_states`
  layer (None: ConvNeXt `tokens`), and how many leading tokens it drops."""
  model: str
  layer: int | None
  drop_first: int


REFERENCE_FEATURES = {
    "clip": ReferenceFeatures("vit", -2, 1), "siglip": ReferenceFeatures("vit", -3, 1),
    "dinov2": ReferenceFeatures("vit", -1, 1), "convnext": ReferenceFeatures("convnext", None, 0)}
# kind -> (`data.normalization` preset, resolution) the paper's checkpoint was trained with (the
# reference feeds them all CLIP-normalised 336 px images instead).
TRAINED_WITH = {"clip": ("clip", 336), "siglip": ("minus_one_one", 384),
                "dinov2": ("imagenet", 518), "convnext": ("clip", 256)}
# kind -> the reference's position-embedding interpolation for another patch grid: the offset
# added to the new side in torch's bicubic `scale_factor` (DINOv2's torch-hub 0.1; SigLIP 0:
# `size=`). CLIP (native 336 px) is never interpolated by the reference.
POSEMB_OFFSET = {"siglip": 0.0, "dinov2": 0.1}
KINDS = (*REFERENCE_FEATURES, "vit", "convnet", "features")
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
                   dim: int = 0, checkpoint: str = "",
                   backbone: ml_collections.ConfigDict | None = None,
                   **overrides) -> ml_collections.ConfigDict:
  """One encoder's node. Pretrained kinds (`REFERENCE_FEATURES`) need `backbone` (the library
  model config the `checkpoint` fills; "" = random init); `overrides` go to the backbone's
  config (`vit`, `convnet` or `backbone`)."""
  c = ml_collections.ConfigDict(dict(kind=kind, trainable=trainable, pool_channels=pool_channels,
                                     tokens=tokens, dim=dim))
  if kind in REFERENCE_FEATURES:
    if backbone is None or backbone.get("name") != REFERENCE_FEATURES[kind].model:
      raise ValueError(f"encoder kind={kind!r} needs backbone=<a {REFERENCE_FEATURES[kind].model!r}"
                       " model config>, e.g. importers.import_checkpoint(path)[0]")
    c.checkpoint = checkpoint
    c.backbone = vit.with_overrides(ml_collections.ConfigDict(backbone), overrides,
                                    f"encoder_config({kind!r})")
  elif kind == "vit":
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
    self.dwconv = Conv(dim, dim, (kernel_size, kernel_size), feature_group_count=dim,
                       padding="SAME", dtype=dtype, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = Linear(dim, mlp_ratio * dim, dtype=dtype, rngs=rngs)
    self.fc2 = Linear(mlp_ratio * dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    # hidden batch-sharded: else on small maps FSDP gathers the batch to the F-sharded fc1
    # (cheaper than gathering fc1) and all-reduces fc2's whole-batch partial sums
    h = attention.shard_batch(self.fc1(self.norm(self.dwconv(x))))
    return x + self.fc2(nnx.gelu(h))


class ConvNet(nnx.Module):
  """ConvNeXt-style encoder: `images [B, H, W, C] -> tokens [B, h*w, widths[-1]]` with
  h = H / (stem_patch * 2^(stages-1))."""

  def __init__(self, c: ml_collections.ConfigDict, channels: int, *, rngs: nnx.Rngs):
    if len(c.widths) != len(c.depths) or not c.widths:
      raise ValueError(f"convnet.widths={c.widths} and convnet.depths={c.depths} must be "
                       "non-empty and of equal length")
    dtype = jnp.dtype(c.dtype)
    p = c.stem_patch
    self.stem = Conv(channels, c.widths[0], (p, p), strides=(p, p), padding="VALID",
                     dtype=dtype, rngs=rngs)
    self.stem_norm = nnx.LayerNorm(c.widths[0], rngs=rngs)
    self.downsample = nnx.List([
        nnx.Sequential(nnx.LayerNorm(c.widths[i - 1], rngs=rngs),
                       Conv(c.widths[i - 1], c.widths[i], (2, 2), strides=(2, 2),
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
    self.name, self.trainable, self.reference = name, c.trainable, REFERENCE_FEATURES.get(c.kind)
    if self.reference is not None:
      self.backbone, tokens, dim = _pretrained_backbone(field, c, image_size, channels, rngs)
    elif c.kind == "vit":
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
    if self.reference is not None:
      x = (self.backbone.tokens(inputs["image"]) if self.reference.layer is None else
           self.backbone.hidden_states(inputs["image"], self.reference.layer))
      return x[:, self.reference.drop_first:]
    if isinstance(self.backbone, vit.ViT):
      return self.backbone.tokens(inputs["image"])
    return self.backbone(inputs["image"])

  def __call__(self, inputs: dict[str, jax.Array]) -> jax.Array:
    x = self.raw_tokens(inputs).astype(jnp.float32)
    if self.pool_channels:
      x = pool_channels(x, self.pool_channels)
    return x if self.trainable else jax.lax.stop_gradient(x)


def _pretrained_backbone(field: str, c: ml_collections.ConfigDict, image_size: int, channels: int,
                         rngs: nnx.Rngs) -> tuple[nnx.Module, int, int]:
  """(backbone at `image_size`, tokens the reference takes, their width) of pretrained kind c."""
  b = ml_collections.ConfigDict(c.backbone)
  b.image_size, b.channels = image_size, channels
  ref = REFERENCE_FEATURES[c.kind]
  if ref.model == "convnext":
    side = image_size // b.patch_size // 2 ** (len(b.widths) - 1)
    if side < 1:
      raise ValueError(f"{field}.backbone: model.image_size={image_size} is too small for its "
                       "patch_size and stages")
    return convnext.ConvNeXt(b, rngs=rngs), side * side, b.widths[-1]
  if not -b.depth - 1 <= ref.layer <= b.depth:
    raise ValueError(f"{field}.backbone.depth={b.depth} has no hidden_states[{ref.layer}]")
  tokens = (image_size // b.patch_size) ** 2 + (b.pool == "cls") + b.num_registers
  return vit.ViT(b, rngs=rngs), tokens - ref.drop_first, b.width


def encoder_order(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """`config.encoder_order`, checked to name every encoder of `config.encoders` once."""
  order = tuple(config.encoder_order)
  if sorted(order) != sorted(config.encoders):
    raise ValueError(f"model.encoder_order={order} must list each of model.encoders "
                     f"{sorted(config.encoders)} exactly once")
  return order


def _bicubic_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
  """`[n_out, n_in]` weights of torch's 1-D bicubic resampling (A = -0.75, align_corners=False,
  no antialias, edge taps clamped); source x = scale * (dst + 0.5) - 0.5."""
  A = -0.75
  x = scale * (np.arange(n_out) + 0.5) - 0.5
  base = np.floor(x)
  t = x - base
  w0 = ((A * (t + 1) - 5 * A) * (t + 1) + 8 * A) * (t + 1) - 4 * A
  w1 = ((A + 2) * t - (A + 3)) * t * t + 1
  w2 = ((A + 2) * (1 - t) - (A + 3)) * (1 - t) * (1 - t) + 1
  weights = np.stack([w0, w1, w2, 1 - w0 - w1 - w2], axis=1)
  out = np.zeros((n_out, n_in))
  for tap in range(4):
    np.add.at(out, (np.arange(n_out), np.clip(base + tap - 1, 0, n_in - 1).astype(int)),
              weights[:, tap])
  return out


def resize_posemb_bicubic(posemb: np.ndarray, side: int, offset: float) -> np.ndarray:
  """`[1, g*g, D] -> [1, side*side, D]` as torch `interpolate(mode="bicubic")` on the g x g grid:
  `size=(side, side)` for offset 0 (SigLIP), `scale_factor=(side + offset) / g` otherwise
  (DINOv2's torch hub, offset 0.1)."""
  g = int(round(posemb.shape[1] ** 0.5))
  m = _bicubic_matrix(g, side, g / (side + offset))
  grid = posemb.reshape(g, g, -1).astype(np.float64)
  return np.einsum("ai,bj,ijd->abd", m, m, grid).reshape(1, side * side, -1).astype(np.float32)


def pool_channels(x: jax.Array, out: int) -> jax.Array:
  """`[..., D] -> [..., out]`: mean of each run of D/out adjacent channels."""
  return x.reshape(*x.shape[:-1], out, x.shape[-1] // out).mean(-1)
