"""big_vision / vit_jax `.npz` ViT checkpoints -> our ViT, read with `numpy.load(allow_pickle=False)`.

Layouts (flax names, "/"-joined; kernels are already ours: dense `[in, out]`, q/k/v
`[D, heads, D/heads]`, attention output `[heads, D/heads, D]`, patch conv `[p, p, C, D]`):

- vit_jax / AugReg ViT-Ti..L: `embedding`, `cls`, `Transformer/posembed_input/pos_embedding`
  (`[1, 1 + T, D]`, the CLS position first; folded into our CLS parameter), blocks
  `Transformer/encoderblock_N/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
  MlpBlock_3/Dense_0/1}`, `Transformer/encoder_norm`, `head`; optionally under `opt/target/`.
- big_vision ViT (`params/`) and SigLIP image towers (`params/img/`, the text tower and `t` / `b`
  of the two-tower model reported as ignored): `pos_embedding` `[1, T, D]` (patches only),
  blocks `{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}`, optionally
  scanned (`Transformer/encoderblock/...` stacked over depth), `MAPHead_0` -> our `map_head`.

Both use flax's default tanh GELU and LayerNorm epsilon 1e-6 (timm's loader pairs these weights
with erf GELU by default; we follow the JAX originals, and so does the fixture's timm model).
"""
from __future__ import annotations

import itertools
import math

import ml_collections
import numpy as np

from moe_jax.checkpoints.rules import ImportReport, Rule, apply_rules, copied, param_shapes
from moe_jax.checkpoints.tree import CheckpointMismatch
from moe_jax.models import vit

PREFIXES = ("opt/target/", "params/img/", "params/", "")
# block sub-module names: (norm1, attention, norm2, mlp)
VIT_JAX_BLOCK = ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
BIG_VISION_BLOCK = ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")


def read_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of the `.npz` at `path` (no pickles)."""
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise CheckpointMismatch(f"{path}: not a readable .npz checkpoint ({e})") from None


def _prefix(tensors: dict[str, np.ndarray], path: str) -> str:
  for prefix in PREFIXES:
    if f"{prefix}embedding/kernel" in tensors:
      return prefix
  raise CheckpointMismatch(f"{path}: no 'embedding/kernel' under any of {PREFIXES}: not a "
                           "big_vision / vit_jax ViT checkpoint")


def _square(n: int) -> bool:
  return math.isqrt(n) ** 2 == n


class _Layout:
  """Where a checkpoint keeps what: its key prefix, block naming, scan, position embedding."""

  def __init__(self, tensors: dict[str, np.ndarray], path: str):
    self.prefix = p = _prefix(tensors, path)
    self.scan = f"{p}Transformer/encoderblock/LayerNorm_0/scale" in tensors
    block0 = f"{p}Transformer/encoderblock{'' if self.scan else '_0'}/"
    self.names = (VIT_JAX_BLOCK if f"{block0}{VIT_JAX_BLOCK[1]}/query/kernel" in tensors
                  else BIG_VISION_BLOCK)
    self.posemb = next((f"{p}{k}" for k in ("Transformer/posembed_input/pos_embedding",
                                           "pos_embedding") if f"{p}{k}" in tensors), None)
    if self.posemb is None:
      raise CheckpointMismatch(f"{path}: no position embedding ({p}pos_embedding or "
                               f"{p}Transformer/posembed_input/pos_embedding)")
    self.cls = f"{p}cls" if f"{p}cls" in tensors else None
    tokens = tensors[self.posemb].shape[1]
    # vit_jax stores the CLS token's position first; big_vision adds none to it.
    self.cls_position = self.cls is not None and not _square(tokens) and _square(tokens - 1)
    self.grid = math.isqrt(tokens - self.cls_position)
    if self.grid ** 2 != tokens - self.cls_position:
      raise CheckpointMismatch(f"{path}: {self.posemb!r} has {tokens} positions: not a square "
                               "patch grid (plus one CLS position)")
    self.map_head = f"{p}MAPHead_0/probe" in tensors
    self.depth = (tensors[f"{block0}LayerNorm_0/scale"].shape[0] if self.scan else
                  next(i for i in itertools.count()
                       if f"{p}Transformer/encoderblock_{i}/LayerNorm_0/scale" not in tensors))

  def block(self, i: int) -> str:
    return f"{self.prefix}Transformer/encoderblock{'' if self.scan else f'_{i}'}"


def vit_config_from_npz(tensors: dict[str, np.ndarray], layout: _Layout) -> ml_collections.ConfigDict:
  """Our ViT config (head included when the checkpoint has one) read off the array shapes."""
  p = layout.prefix
  patch, _, channels, width = tensors[f"{p}embedding/kernel"].shape
  attn = f"{layout.block(0)}/{layout.names[1]}"
  query = tensors[f"{attn}/query/kernel"].shape
  mlp_dim = tensors[f"{layout.block(0)}/{layout.names[3]}/Dense_0/kernel"].shape[-1]
  head = tensors.get(f"{p}head/kernel")
  return vit.vit_config(
      f"B/{patch}", width=width, depth=layout.depth, mlp_dim=mlp_dim, num_heads=query[-2],
      image_size=layout.grid * patch, channels=channels,
      num_classes=0 if head is None else head.shape[-1],
      pool="map" if layout.map_head else "cls" if layout.cls else "gap", posemb="learned",
      head_zero_init=False, gelu_approximate=True, layer_norm_eps=1e-6)


def _rules(c: ml_collections.ConfigDict, layout: _Layout) -> list[Rule]:
  p = layout.prefix
  norm = lambda ours, theirs: [copied(f"{ours}/{n}", f"{theirs}/{n}") for n in ("scale", "bias")]
  dense = lambda ours, theirs: [copied(f"{ours}/{n}", f"{theirs}/{n}") for n in ("kernel", "bias")]
  attention = lambda ours, theirs: [r for n in ("query", "key", "value", "out")
                                    for r in dense(f"{ours}/{n}", f"{theirs}/{n}")]
  mlp = lambda ours, theirs: [*dense(f"{ours}/fc1", f"{theirs}/Dense_0"),
                              *dense(f"{ours}/fc2", f"{theirs}/Dense_1")]
  rules = [*dense("patch_embed", f"{p}embedding"), *norm("norm", f"{p}Transformer/encoder_norm")]
  if layout.cls_position:
    rules += [Rule("posemb", (layout.posemb,), lambda s: ((1, s[1] + 1, s[2]),),
                   lambda x: x[:, 1:]),
              Rule("cls", (layout.cls, layout.posemb), lambda s: (s, None),
                   lambda t, x: t + x[:, :1])]
  else:
    rules += [copied("posemb", layout.posemb)] + ([copied("cls", layout.cls)] if layout.cls else [])
  if c.num_classes:
    rules += dense("head", f"{p}head")
  if layout.map_head:
    m = f"{p}MAPHead_0"
    rules += [copied("map_head/probe", f"{m}/probe"), *norm("map_head/norm", f"{m}/LayerNorm_0"),
              *attention("map_head/attn", f"{m}/MultiHeadDotProductAttention_0"),
              *mlp("map_head/mlp", f"{m}/MlpBlock_0")]
  norm1, attn, norm2, block_mlp = layout.names
  for i in range(c.depth):
    ours, theirs = f"blocks/{i}", layout.block(i)
    block = [*norm(f"{ours}/norm1", f"{theirs}/{norm1}"),
             *attention(f"{ours}/attn", f"{theirs}/{attn}"),
             *norm(f"{ours}/norm2", f"{theirs}/{norm2}"),
             *mlp(f"{ours}/mlp", f"{theirs}/{block_mlp}")]
    if layout.scan:  # every block's arrays stacked on a leading depth axis
      block = [Rule(r.target, r.keys, lambda s: ((c.depth, *s),), lambda x, i=i: x[i])
               for r in block]
    rules += block
  return rules


def import_big_vision(path: str) -> tuple[ml_collections.ConfigDict, dict[str, np.ndarray],
                                          ImportReport]:
  """(our ViT config, flat float32 parameters, report) of the `.npz` checkpoint at `path`."""
  tensors = read_npz(path)
  layout = _Layout(tensors, path)
  config = vit_config_from_npz(tensors, layout)
  why = {"opt/target/": "vit_jax optimizer state (not parameters)",
         "params/img/": "big_vision two-tower model: text tower / temperature / bias (not in "
                        "our image encoder)"}.get(layout.prefix)
  ignored = {k: why for k in tensors if why and not k.startswith(layout.prefix)}
  shapes = param_shapes(config)
  return (config, *apply_rules(_rules(config, layout), tensors, shapes, ignored, path))
