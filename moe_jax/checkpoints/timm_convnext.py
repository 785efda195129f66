"""timm / open_clip ConvNeXt safetensors -> our `moe_jax.models.convnext.ConvNeXt`.

Two layouts of the same timm module names (`stem.{0,1}`, `stages.{s}.downsample.{0,1}`,
`stages.{s}.blocks.{j}.{conv_dw, norm, mlp.fc1, mlp.fc2, gamma}`, `head.norm`, `head.fc`):

- a timm hub directory (`timm.models.push_to_hf_hub` / `save_for_hf`): `config.json` with
  `architecture` (+ optional `model_args`) and `model.safetensors`; e.g. MoCHA's ConvNeXt-XXL
  `timm/convnext_xxlarge.clip_laion2b_soup_ft_in1k`;
- an open_clip directory: `open_clip_config.json` (`model_cfg.vision_cfg.timm_model_name`) and
  `open_clip_model.safetensors`, the image trunk under `visual.trunk.*`; its joint-embedding
  projection `visual.head.proj` and the text tower are reported as ignored.

Widths and depths come from the tensor shapes; the LayerNorm epsilon is `model_args.norm_eps`
or timm's default of the architecture (1e-5 for `convnext_xxlarge`, else 1e-6), used by every
norm incl. `head.norm`. timm's GELU is exact erf. The classifier `head.fc` is imported when
present (`num_classes` = its rows), so nothing in the checkpoint is dropped silently.
"""
from __future__ import annotations

import json
import os
import re

import ml_collections
import numpy as np

from moe_jax.checkpoints import hf
from moe_jax.checkpoints.hf_convnext import conv_rules
from moe_jax.checkpoints.rules import (ImportReport, Rule, apply_rules, copied, param_shapes,
                                       torch_linear, torch_norm)
from moe_jax.checkpoints.tree import CheckpointMismatch
from moe_jax.models import convnext

# timm architectures whose norm_eps is not timm's LayerNorm default 1e-6.
NORM_EPS = {"convnext_xxlarge": 1e-5}
OPEN_CLIP_TRUNK = "visual.trunk."
# `model_args` entries that change the function away from what our ConvNeXt computes.
UNSUPPORTED_ARGS = {"conv_mlp": True, "use_grn": True, "head_norm_first": True,
                    "conv_bias": False, "kernel_sizes": None}


def is_timm_directory(path: str) -> bool:
  """Whether `path` is a timm hub (`config.json` with `architecture`) or open_clip directory."""
  if os.path.exists(os.path.join(path, "open_clip_config.json")):
    return True
  file = os.path.join(path, "config.json")
  return os.path.exists(file) and "architecture" in hf.read_config(path)


def _read(path: str) -> tuple[str, dict, dict[str, np.ndarray], dict[str, str]]:
  """(architecture, model_args, trunk tensors in timm naming, ignored key -> why) of `path`."""
  open_clip_config = os.path.join(path, "open_clip_config.json")
  if not os.path.exists(open_clip_config):
    config = hf.read_config(path)
    return (config["architecture"], config.get("model_args", {}), hf.read_safetensors(path), {})
  with open(open_clip_config) as f:
    vision = json.load(f).get("model_cfg", {}).get("vision_cfg", {})
  if "timm_model_name" not in vision:
    raise CheckpointMismatch(f"{open_clip_config}: model_cfg.vision_cfg has no timm_model_name "
                             "(only open_clip models with a timm image trunk are supported)")
  tensors = hf.read_safetensors(os.path.join(path, "open_clip_model.safetensors"))
  trunk = {k.removeprefix(OPEN_CLIP_TRUNK): v for k, v in tensors.items()
           if k.startswith(OPEN_CLIP_TRUNK)}
  ignored = {k: ("open_clip projection into the joint embedding (not in the image trunk)"
                 if k.startswith("visual.") else "open_clip text tower / logit scale")
             for k in tensors if not k.startswith(OPEN_CLIP_TRUNK)}
  return vision["timm_model_name"], vision.get("timm_model_args", {}), {**trunk, **{
      k: tensors[k] for k in ignored}}, ignored


def convnext_config_from_timm(architecture: str, model_args: dict,
                              tensors: dict[str, np.ndarray]) -> ml_collections.ConfigDict:
  """Our ConvNeXt config of a timm ConvNeXt state dict (`tensors` in timm naming)."""
  if not architecture.startswith("convnext"):
    raise CheckpointMismatch(f"timm architecture={architecture!r}: only ConvNeXt is supported")
  for arg, bad in UNSUPPORTED_ARGS.items():
    if arg in model_args and (bad is None or model_args[arg] == bad):
      raise CheckpointMismatch(f"timm model_args.{arg}={model_args[arg]!r} is not supported by "
                               "our ConvNeXt")
  depths = []
  for s in range(len({k.split(".")[1] for k in tensors if k.startswith("stages.")})):
    blocks = {m.group(1) for k in tensors if (m := re.match(rf"stages\.{s}\.blocks\.(\d+)\.", k))}
    depths.append(len(blocks))
  if "stem.0.weight" not in tensors or not depths or min(depths) < 1:
    raise CheckpointMismatch(f"no timm ConvNeXt stem.0.weight / stages.*.blocks.* in the "
                             f"checkpoint of {architecture!r}")
  widths = [tensors[f"stages.{s}.blocks.0.conv_dw.weight"].shape[0] for s in range(len(depths))]
  stem = tensors["stem.0.weight"].shape
  eps = float(model_args.get("norm_eps") or NORM_EPS.get(architecture, 1e-6))
  return convnext.convnext_config(
      widths=tuple(widths), depths=tuple(depths), patch_size=stem[-1], channels=stem[1],
      num_classes=tensors["head.fc.weight"].shape[0] if "head.fc.weight" in tensors else 0,
      layer_norm_eps=eps, head_norm_eps=eps, gelu_approximate=False,
      layer_scale=1e-6 if "stages.0.blocks.0.gamma" in tensors else 0.0, head_zero_init=False)


def _rules(c: ml_collections.ConfigDict, shapes: dict) -> list[Rule]:
  rules = [*conv_rules("stem", "stem.0"), *torch_norm("stem_norm", "stem.1"),
           *torch_norm("norm", "head.norm")]
  if c.num_classes:
    rules += torch_linear("head", "head.fc", shapes)
  for s, depth in enumerate(c.depths):
    if s:
      rules += [*torch_norm(f"stages/{s}/downsample_norm", f"stages.{s}.downsample.0"),
                *conv_rules(f"stages/{s}/downsample", f"stages.{s}.downsample.1")]
    for j in range(depth):
      o, t = f"stages/{s}/blocks/{j}", f"stages.{s}.blocks.{j}"
      rules += [*conv_rules(f"{o}/dwconv", f"{t}.conv_dw"), *torch_norm(f"{o}/norm", f"{t}.norm"),
                *torch_linear(f"{o}/fc1", f"{t}.mlp.fc1", shapes),
                *torch_linear(f"{o}/fc2", f"{t}.mlp.fc2", shapes)]
      if c.layer_scale:
        rules.append(copied(f"{o}/ls/scale", f"{t}.gamma"))
  return rules


def import_timm_convnext(path: str) -> tuple[ml_collections.ConfigDict, dict[str, np.ndarray],
                                             ImportReport]:
  """(our ConvNeXt config, flat float32 parameters, report) of the timm hub or open_clip
  ConvNeXt directory `path`."""
  architecture, model_args, tensors, ignored = _read(path)
  config = convnext_config_from_timm(architecture, model_args, tensors)
  shapes = param_shapes(config)
  return (config, *apply_rules(_rules(config, shapes), tensors, shapes, ignored, path))
