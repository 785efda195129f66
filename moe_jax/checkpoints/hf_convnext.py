"""Hugging Face `ConvNextModel` safetensors -> our `moe_jax.models.convnext.ConvNeXt`.

Keys are the hub's (`embeddings.patch_embeddings`, `encoder.stages.{s}.downsampling_layer.{0,1}`,
`encoder.stages.{s}.layers.{j}.{dwconv, layernorm, pwconv1, pwconv2, layer_scale_parameter}`,
`layernorm`); torch conv `[out, in/groups, k, k]` -> ours `[k, k, in/groups, out]`, linear
`[out, in]` -> `[in, out]`. HF's block LayerNorms use epsilon 1e-6, its final one
`config.layer_norm_eps` (our `head_norm_eps`).
"""
from __future__ import annotations

import ml_collections
import numpy as np

from moe_jax.checkpoints import hf
from moe_jax.checkpoints.rules import (ImportReport, Rule, apply_rules, copied, param_shapes,
                                       torch_linear, torch_norm)
from moe_jax.checkpoints.tree import CheckpointMismatch
from moe_jax.models import convnext

# config.json hidden_act -> our model.gelu_approximate.
GELU = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}
# transformers' ConvNextConfig defaults for the fields a hub config.json may omit.
DEFAULTS = dict(num_channels=3, patch_size=4, num_stages=4, hidden_sizes=[96, 192, 384, 768],
                depths=[3, 3, 9, 3], hidden_act="gelu", layer_norm_eps=1e-12,
                layer_scale_init_value=1e-6, image_size=224)


def convnext_config_from_hf(hf_config: dict, num_classes: int = 0) -> ml_collections.ConfigDict:
  """Our ConvNeXt config for an HF ConvNeXt `config.json` dict."""
  h = {**DEFAULTS, **hf_config}
  if h["hidden_act"] not in GELU:
    raise CheckpointMismatch(f"config.json hidden_act={h['hidden_act']!r}: supported {sorted(GELU)}")
  if len(h["hidden_sizes"]) != h["num_stages"] or len(h["depths"]) != h["num_stages"]:
    raise CheckpointMismatch(f"config.json num_stages={h['num_stages']} but hidden_sizes="
                             f"{h['hidden_sizes']}, depths={h['depths']}")
  return convnext.convnext_config(
      widths=tuple(h["hidden_sizes"]), depths=tuple(h["depths"]), patch_size=h["patch_size"],
      image_size=h["image_size"], channels=h["num_channels"], num_classes=num_classes,
      layer_norm_eps=1e-6, head_norm_eps=h["layer_norm_eps"], gelu_approximate=GELU[h["hidden_act"]],
      layer_scale=float(h["layer_scale_init_value"]), head_zero_init=False)


def conv_rules(target: str, key: str) -> list[Rule]:
  """Our Conv `target` (kernel `[k, k, in/groups, out]`, bias) from torch Conv2d `key`."""
  return [Rule(f"{target}/kernel", (f"{key}.weight",), lambda s: ((s[3], s[2], s[0], s[1]),),
               lambda w: w.transpose(2, 3, 1, 0)),
          copied(f"{target}/bias", f"{key}.bias")]


def _rules(c: ml_collections.ConfigDict, shapes: dict) -> list[Rule]:
  rules = [*conv_rules("stem", "embeddings.patch_embeddings"),
           *torch_norm("stem_norm", "embeddings.layernorm"), *torch_norm("norm", "layernorm")]
  for s, depth in enumerate(c.depths):
    ours, theirs = f"stages/{s}", f"encoder.stages.{s}"
    if s:
      rules += [*torch_norm(f"{ours}/downsample_norm", f"{theirs}.downsampling_layer.0"),
                *conv_rules(f"{ours}/downsample", f"{theirs}.downsampling_layer.1")]
    for j in range(depth):
      o, t = f"{ours}/blocks/{j}", f"{theirs}.layers.{j}"
      rules += [*conv_rules(f"{o}/dwconv", f"{t}.dwconv"),
                *torch_norm(f"{o}/norm", f"{t}.layernorm"),
                *torch_linear(f"{o}/fc1", f"{t}.pwconv1", shapes),
                *torch_linear(f"{o}/fc2", f"{t}.pwconv2", shapes)]
      if c.layer_scale:
        rules.append(copied(f"{o}/ls/scale", f"{t}.layer_scale_parameter"))
  return rules


def import_convnext(path: str) -> tuple[ml_collections.ConfigDict, dict[str, np.ndarray],
                                        ImportReport]:
  """(our ConvNeXt config without head, flat float32 parameters, report) of the HF ConvNeXt
  checkpoint directory `path` (`config.json` + safetensors)."""
  config = convnext_config_from_hf(hf.read_config(path))
  shapes = param_shapes(config)
  return (config, *apply_rules(_rules(config, shapes), hf.read_safetensors(path), shapes, {}, path))
