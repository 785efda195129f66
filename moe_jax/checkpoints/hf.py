"""Hugging Face `ViTModel` and `Dinov2Model` / `Dinov2WithRegistersModel` safetensors -> our ViT.

Checkpoint key names are the hub's (`encoder.layer.{i}.attention.attention.query.weight`, ...),
which `save_pretrained` still writes. Torch layouts -> ours: linear `[out, in]` -> kernel
`[in, out]` (q/k/v `[D, heads, D/heads]`, attention output `[heads, D/heads, D]`), patch conv
`[D, C, p, p]` -> `[p, p, C, D]`. HF adds position embeddings to the CLS token too; ours has none
for it, so the CLS parameter becomes `cls_token + position_embeddings[:, 0]` (the same function).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable

import ml_collections
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from moe_jax.checkpoints.tree import CheckpointMismatch, flatten
from moe_jax.models import build_model, vit

Shape = tuple[int, ...]
# Checkpoint keys our model has no use for, and why (reported, never silently dropped).
IGNORED = {
    "embeddings.mask_token": "DINOv2 masked-image pretraining only",
    "pooler.dense.weight": "HF ViT tanh pooler (not in our model)",
    "pooler.dense.bias": "HF ViT tanh pooler (not in our model)",
}
# config.json hidden_act -> our model.gelu_approximate.
GELU = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}
MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers")


@dataclasses.dataclass(frozen=True)
class ImportReport:
  """Which checkpoint keys filled which of our parameters, and the keys left out on purpose."""
  used: dict[str, tuple[str, ...]]  # our parameter path -> the checkpoint keys it came from
  ignored: dict[str, str]  # checkpoint key -> why


@dataclasses.dataclass(frozen=True)
class Rule:
  """Our parameter `target` from checkpoint `keys`: `shapes(target shape)` gives each key's
  expected shape (None: checked by another rule), `convert(*arrays)` our value."""
  target: str
  keys: tuple[str, ...]
  shapes: Callable[[Shape], tuple[Shape | None, ...]]
  convert: Callable[..., np.ndarray]


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


def vit_config_from_hf(hf: dict, num_classes: int = 0) -> ml_collections.ConfigDict:
  """Our ViT config for an HF `config.json` dict (ViT, DINOv2, DINOv2 with registers)."""
  kind = hf.get("model_type")
  if kind not in MODEL_TYPES:
    raise CheckpointMismatch(f"config.json model_type={kind!r}: supported {MODEL_TYPES}")
  if hf.get("hidden_act") not in GELU:
    raise CheckpointMismatch(f"config.json hidden_act={hf.get('hidden_act')!r}: supported "
                             f"{sorted(GELU)}")
  for field, ok in (("qkv_bias", True), ("use_swiglu_ffn", False)):
    if hf.get(field, ok) != ok:
      raise CheckpointMismatch(f"config.json {field}={hf[field]} is not supported (only {ok})")
  width = hf["hidden_size"]
  mlp_dim = hf["intermediate_size"] if kind == "vit" else int(width * hf["mlp_ratio"])
  return vit.vit_config(
      f"B/{hf['patch_size']}", width=width, depth=hf["num_hidden_layers"], mlp_dim=mlp_dim,
      num_heads=hf["num_attention_heads"], image_size=hf["image_size"],
      channels=hf["num_channels"], num_classes=num_classes, pool="cls", posemb="learned",
      head_zero_init=False, gelu_approximate=GELU[hf["hidden_act"]],
      layer_norm_eps=hf["layer_norm_eps"],
      layer_scale=float(hf["layerscale_value"]) if kind != "vit" else 0.0,
      num_registers=hf.get("num_register_tokens", 0))


def _same(shape: Shape) -> tuple[Shape]:
  return (shape,)


def _rules(c: ml_collections.ConfigDict, kind: str, shapes: dict[str, Shape]) -> list[Rule]:
  """Every parameter of our ViT (`shapes`: path -> shape) from the keys of an HF checkpoint."""
  def linear(target: str, key: str, n_in: int = 1) -> list[Rule]:
    kernel_shape = shapes[f"{target}/kernel"]
    return [
        Rule(f"{target}/kernel", (f"{key}.weight",),
             lambda s: ((math.prod(s[n_in:]), math.prod(s[:n_in])),),
             lambda w: w.T.reshape(kernel_shape)),
        Rule(f"{target}/bias", (f"{key}.bias",), lambda s: ((math.prod(s),),),
             lambda b: b.reshape(shapes[f"{target}/bias"]))]

  def norm(target: str, key: str) -> list[Rule]:
    return [Rule(f"{target}/scale", (f"{key}.weight",), _same, np.asarray),
            Rule(f"{target}/bias", (f"{key}.bias",), _same, np.asarray)]

  pos = "embeddings.position_embeddings"
  rules = [
      Rule("patch_embed/kernel", ("embeddings.patch_embeddings.projection.weight",),
           lambda s: ((s[3], s[2], s[0], s[1]),), lambda w: w.transpose(2, 3, 1, 0)),
      Rule("patch_embed/bias", ("embeddings.patch_embeddings.projection.bias",), _same, np.asarray),
      Rule("posemb", (pos,), lambda s: ((1, s[1] + 1, s[2]),), lambda p: p[:, 1:]),
      Rule("cls", ("embeddings.cls_token", pos), lambda s: (s, None), lambda t, p: t + p[:, :1]),
      *norm("norm", "layernorm")]
  if c.num_registers:
    rules.append(Rule("registers", ("embeddings.register_tokens",), _same, np.asarray))
  vit_names = dict(norm1="layernorm_before", norm2="layernorm_after", fc1="intermediate.dense",
                   fc2="output.dense")
  dino_names = dict(norm1="norm1", norm2="norm2", fc1="mlp.fc1", fc2="mlp.fc2")
  names = vit_names if kind == "vit" else dino_names
  for i in range(c.depth):
    ours, theirs = f"blocks/{i}", f"encoder.layer.{i}"
    rules += [*norm(f"{ours}/norm1", f"{theirs}.{names['norm1']}"),
              *norm(f"{ours}/norm2", f"{theirs}.{names['norm2']}"),
              *linear(f"{ours}/mlp/fc1", f"{theirs}.{names['fc1']}"),
              *linear(f"{ours}/mlp/fc2", f"{theirs}.{names['fc2']}"),
              *linear(f"{ours}/attn/out", f"{theirs}.attention.output.dense", n_in=2)]
    rules += [r for p in ("query", "key", "value")
              for r in linear(f"{ours}/attn/{p}", f"{theirs}.attention.attention.{p}")]
    if c.layer_scale:
      rules += [Rule(f"{ours}/ls{j}/scale", (f"{theirs}.layer_scale{j}.lambda1",), _same,
                     np.asarray) for j in (1, 2)]
  return rules


def apply_rules(rules: list[Rule], tensors: dict[str, np.ndarray], shapes: dict[str, Shape],
                ignored: dict[str, str], source: str) -> tuple[dict[str, np.ndarray], ImportReport]:
  """Our flat parameters from `tensors` by `rules`; CheckpointMismatch naming the first missing
  or mis-shaped key, the first checkpoint key no rule uses (unless `ignored`), or the first of
  our parameters no rule fills."""
  params, used = {}, {}
  for rule in rules:
    for key, expected in zip(rule.keys, rule.shapes(shapes[rule.target])):
      if key not in tensors:
        raise CheckpointMismatch(f"{source}: no key {key!r} (needed for our {rule.target})")
      if expected is not None and tuple(tensors[key].shape) != tuple(expected):
        raise CheckpointMismatch(f"{source}: {key!r} has shape {tuple(tensors[key].shape)}, our "
                                 f"{rule.target} {shapes[rule.target]} needs {tuple(expected)}")
    params[rule.target] = np.asarray(rule.convert(*(tensors[k] for k in rule.keys)), np.float32)
    used[rule.target] = rule.keys
  consumed = {k for keys in used.values() for k in keys}
  unused = sorted(k for k in tensors if k not in consumed and k not in ignored)
  if unused:
    raise CheckpointMismatch(f"{source}: key {unused[0]!r} maps onto no parameter of our model "
                             f"({len(unused)} such keys)")
  unfilled = sorted(set(shapes) - set(params))
  if unfilled:
    raise CheckpointMismatch(f"{source}: our parameter {unfilled[0]} has no checkpoint key")
  return params, ImportReport(used, {k: ignored[k] for k in sorted(ignored) if k in tensors})


def param_shapes(model_config: ml_collections.ConfigDict) -> dict[str, Shape]:
  """Flat `{path: shape}` of the parameters of the model `model_config` builds (no allocation)."""
  model = nnx.eval_shape(lambda: build_model(model_config, rngs=nnx.Rngs(0)))
  return {k: tuple(v.shape) for k, v in flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


def import_hf(path: str) -> tuple[ml_collections.ConfigDict, dict[str, np.ndarray], ImportReport]:
  """(our ViT config without head, flat float32 parameters, report) of the HF checkpoint
  directory `path` (`config.json` + safetensors)."""
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  config = vit_config_from_hf(hf)
  shapes = param_shapes(config)
  params, report = apply_rules(_rules(config, hf["model_type"], shapes), read_safetensors(path),
                               shapes, IGNORED, path)
  return config, params, report
