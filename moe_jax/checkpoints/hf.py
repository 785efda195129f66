"""Hugging Face ViT-family safetensors -> our ViT: `ViTModel`, `Dinov2Model`,
`Dinov2WithRegistersModel`, `CLIPVisionModel` (or the image tower of a full `CLIPModel`) and
`SiglipVisionModel` (or a full `SiglipModel`'s).

Checkpoint key names are the hub's (`encoder.layer.{i}.attention.attention.query.weight`,
`vision_model.encoder.layers.{i}.self_attn.q_proj.weight`, ...), which `save_pretrained` still
writes. Torch layouts -> ours: linear `[out, in]` -> kernel `[in, out]` (q/k/v `[D, heads,
D/heads]`, attention output `[heads, D/heads, D]`), patch conv `[D, C, p, p]` -> `[p, p, C, D]`.
HF adds position embeddings to the CLS token too; ours has none for it, so the CLS parameter
becomes `cls_token + position_embeddings[0]` (the same function). CLIP's `last_hidden_state` has
no final norm (our `hidden_states(images, -1)`; `post_layernorm` is our `norm`, applied to the
pooled CLS token in `features`); SigLIP's has it (our `tokens`), and its MAP head is our
`map_head` (torch `nn.MultiheadAttention`'s packed `in_proj` split into query/key/value).
"""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from safetensors.numpy import load_file

from moe_jax.checkpoints.rules import (ImportReport, Rule, apply_rules, copied, param_shapes,
                                       torch_linear, torch_norm)
from moe_jax.checkpoints.tree import CheckpointMismatch
from moe_jax.models import vit

# Checkpoint keys our model has no use for, and why (reported, never silently dropped).
IGNORED = {
    "embeddings.mask_token": "DINOv2 masked-image pretraining only",
    "pooler.dense.weight": "HF ViT tanh pooler (not in our model)",
    "pooler.dense.bias": "HF ViT tanh pooler (not in our model)",
    "visual_projection.weight": "CLIP image-text projection (not in our image encoder)",
}
# config.json hidden_act -> our (model.gelu_approximate, model.quick_gelu).
ACTIVATIONS = {"gelu": (False, False), "gelu_new": (True, False),
               "gelu_pytorch_tanh": (True, False), "quick_gelu": (True, True)}
# Full image-text models: their image tower's model_type and key prefix.
TOWERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers", "clip_vision_model",
               "siglip_vision_model", *TOWERS)
# transformers' defaults (CLIPVisionConfig, SiglipVisionConfig) for fields a hub config.json may
# omit: `save_pretrained` writes only the fields that differ from them.
DEFAULTS = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, num_channels=3, image_size=224,
                              patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, num_channels=3, image_size=224,
                                patch_size=16, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6, vision_use_head=True),
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of `path`: a .safetensors file, or a directory holding `model.safetensors` or a
  sharded checkpoint's `model.safetensors.index.json` (+ its shards)."""
  if not os.path.isdir(path):
    return load_file(path)
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      tensors.update(load_file(os.path.join(path, shard)))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
      raise CheckpointMismatch(f"{index} lists {missing[0]!r} but no shard holds it")
    return tensors
  single = os.path.join(path, "model.safetensors")
  if not os.path.exists(single):
    raise CheckpointMismatch(f"{path} has neither model.safetensors nor "
                             "model.safetensors.index.json")
  return load_file(single)


def read_config(path: str) -> dict:
  """The `config.json` dict of HF checkpoint directory `path`."""
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise CheckpointMismatch(f"{path} has no config.json (an HF checkpoint directory holds "
                             "config.json + safetensors)")
  with open(file) as f:
    return json.load(f)


def image_tower(hf: dict) -> tuple[str, dict]:
  """(model_type, config with transformers' defaults filled in) of the image encoder of `hf`:
  itself, or a full CLIP / SigLIP model's `vision_config`."""
  kind = hf.get("model_type")
  if kind not in MODEL_TYPES:
    raise CheckpointMismatch(f"config.json model_type={kind!r}: supported {MODEL_TYPES}")
  if kind in TOWERS:
    kind, hf = TOWERS[kind], hf.get("vision_config", {})
  return kind, {**DEFAULTS.get(kind, {}), **hf}


def vit_config_from_hf(hf: dict, num_classes: int = 0) -> ml_collections.ConfigDict:
  """Our ViT config for an HF `config.json` dict (ViT, DINOv2 (with registers), CLIP, SigLIP)."""
  kind, hf = image_tower(hf)
  if hf.get("hidden_act") not in ACTIVATIONS:
    raise CheckpointMismatch(f"config.json hidden_act={hf.get('hidden_act')!r}: supported "
                             f"{sorted(ACTIVATIONS)}")
  for field, ok in (("qkv_bias", True), ("use_swiglu_ffn", False), ("vision_use_head", True)):
    if hf.get(field, ok) != ok:
      raise CheckpointMismatch(f"config.json {field}={hf[field]} is not supported (only {ok})")
  width = hf["hidden_size"]
  mlp_dim = int(width * hf["mlp_ratio"]) if kind.startswith("dinov2") else hf["intermediate_size"]
  gelu_approximate, quick_gelu = ACTIVATIONS[hf["hidden_act"]]
  return vit.vit_config(
      f"B/{hf['patch_size']}", width=width, depth=hf["num_hidden_layers"], mlp_dim=mlp_dim,
      num_heads=hf["num_attention_heads"], image_size=hf["image_size"],
      channels=hf["num_channels"], num_classes=num_classes,
      pool="map" if kind == "siglip_vision_model" else "cls", posemb="learned",
      head_zero_init=False, gelu_approximate=gelu_approximate, quick_gelu=quick_gelu,
      layer_norm_eps=hf["layer_norm_eps"],
      layer_scale=float(hf["layerscale_value"]) if kind.startswith("dinov2") else 0.0,
      num_registers=hf.get("num_register_tokens", 0),
      patch_bias=kind != "clip_vision_model", pre_norm=kind == "clip_vision_model")


def _vit_dinov2_rules(c: ml_collections.ConfigDict, kind: str, shapes: dict) -> list[Rule]:
  """HF ViT / DINOv2 (with registers): every parameter of our ViT `c` (`shapes`: path -> shape)."""
  pos = "embeddings.position_embeddings"
  rules = [
      Rule("patch_embed/kernel", ("embeddings.patch_embeddings.projection.weight",),
           lambda s: ((s[3], s[2], s[0], s[1]),), lambda w: w.transpose(2, 3, 1, 0)),
      copied("patch_embed/bias", "embeddings.patch_embeddings.projection.bias"),
      Rule("posemb", (pos,), lambda s: ((1, s[1] + 1, s[2]),), lambda p: p[:, 1:]),
      Rule("cls", ("embeddings.cls_token", pos), lambda s: (s, None), lambda t, p: t + p[:, :1]),
      *torch_norm("norm", "layernorm")]
  if c.num_registers:
    rules.append(copied("registers", "embeddings.register_tokens"))
  vit_names = dict(norm1="layernorm_before", norm2="layernorm_after", fc1="intermediate.dense",
                   fc2="output.dense")
  dino_names = dict(norm1="norm1", norm2="norm2", fc1="mlp.fc1", fc2="mlp.fc2")
  names = vit_names if kind == "vit" else dino_names
  for i in range(c.depth):
    ours, theirs = f"blocks/{i}", f"encoder.layer.{i}"
    rules += [*torch_norm(f"{ours}/norm1", f"{theirs}.{names['norm1']}"),
              *torch_norm(f"{ours}/norm2", f"{theirs}.{names['norm2']}"),
              *torch_linear(f"{ours}/mlp/fc1", f"{theirs}.{names['fc1']}", shapes),
              *torch_linear(f"{ours}/mlp/fc2", f"{theirs}.{names['fc2']}", shapes),
              *torch_linear(f"{ours}/attn/out", f"{theirs}.attention.output.dense", shapes, 2)]
    rules += [r for p in ("query", "key", "value")
              for r in torch_linear(f"{ours}/attn/{p}", f"{theirs}.attention.attention.{p}", shapes)]
    if c.layer_scale:
      rules += [copied(f"{ours}/ls{j}/scale", f"{theirs}.layer_scale{j}.lambda1") for j in (1, 2)]
  return rules


def _clip_siglip_rules(c: ml_collections.ConfigDict, kind: str, shapes: dict,
                       prefix: str) -> list[Rule]:
  """CLIP / SigLIP image towers: every parameter of our ViT `c` (`shapes`: path -> shape) from
  keys under `prefix` ("vision_model." or "")."""
  k = lambda name: prefix + name
  pos = k("embeddings.position_embedding.weight")
  rules = [Rule("patch_embed/kernel", (k("embeddings.patch_embedding.weight"),),
                lambda s: ((s[3], s[2], s[0], s[1]),), lambda w: w.transpose(2, 3, 1, 0)),
           *torch_norm("norm", k("post_layernorm"))]
  if kind == "clip_vision_model":
    rules += [Rule("posemb", (pos,), lambda s: ((s[1] + 1, s[2]),), lambda p: p[None, 1:]),
              Rule("cls", (k("embeddings.class_embedding"), pos), lambda s: (s[2:], None),
                   lambda t, p: (t + p[0])[None, None]),
              *torch_norm("pre_norm", k("pre_layrnorm"))]
  else:
    head = k("head")
    D = c.width
    rules += [copied("patch_embed/bias", k("embeddings.patch_embedding.bias")),
              Rule("posemb", (pos,), lambda s: (s[1:],), lambda p: p[None]),
              copied("map_head/probe", f"{head}.probe"),
              *torch_norm("map_head/norm", f"{head}.layernorm"),
              *torch_linear("map_head/mlp/fc1", f"{head}.mlp.fc1", shapes),
              *torch_linear("map_head/mlp/fc2", f"{head}.mlp.fc2", shapes),
              *torch_linear("map_head/attn/out", f"{head}.attention.out_proj", shapes, 2)]
    for j, p in enumerate(("query", "key", "value")):  # torch packs them as in_proj [3D, D]
      rules += [Rule(f"map_head/attn/{p}/kernel", (f"{head}.attention.in_proj_weight",),
                     lambda s: ((3 * D, D),),
                     lambda w, j=j: w[j * D:(j + 1) * D].T.reshape(D, c.num_heads, -1)),
                Rule(f"map_head/attn/{p}/bias", (f"{head}.attention.in_proj_bias",),
                     lambda s: ((3 * D,),),
                     lambda b, j=j: b[j * D:(j + 1) * D].reshape(c.num_heads, -1))]
  for i in range(c.depth):
    ours, theirs = f"blocks/{i}", k(f"encoder.layers.{i}")
    rules += [*torch_norm(f"{ours}/norm1", f"{theirs}.layer_norm1"),
              *torch_norm(f"{ours}/norm2", f"{theirs}.layer_norm2"),
              *torch_linear(f"{ours}/mlp/fc1", f"{theirs}.mlp.fc1", shapes),
              *torch_linear(f"{ours}/mlp/fc2", f"{theirs}.mlp.fc2", shapes),
              *torch_linear(f"{ours}/attn/out", f"{theirs}.self_attn.out_proj", shapes, 2)]
    rules += [r for p, q in (("query", "q"), ("key", "k"), ("value", "v"))
              for r in torch_linear(f"{ours}/attn/{p}", f"{theirs}.self_attn.{q}_proj", shapes)]
  return rules


def import_hf(path: str) -> tuple[ml_collections.ConfigDict, dict[str, np.ndarray], ImportReport]:
  """(our ViT config without head, flat float32 parameters, report) of the HF ViT-family
  checkpoint directory `path` (`config.json` + safetensors)."""
  hf = read_config(path)
  config = vit_config_from_hf(hf)
  kind, _ = image_tower(hf)
  shapes = param_shapes(config)
  tensors = read_safetensors(path)
  ignored = dict(IGNORED)
  if kind in ("clip_vision_model", "siglip_vision_model"):
    full = hf["model_type"] in TOWERS
    prefix = "vision_model." if full or any(k.startswith("vision_model.") for k in tensors) else ""
    if full:
      ignored.update({k: f"{hf['model_type']} text tower / projections (not in our image encoder)"
                      for k in tensors if not k.startswith(prefix) and k not in IGNORED})
    rules = _clip_siglip_rules(config, kind, shapes, prefix)
  else:
    rules = _vit_dinov2_rules(config, kind, shapes)
  params, report = apply_rules(rules, tensors, shapes, ignored, path)
  return config, params, report
