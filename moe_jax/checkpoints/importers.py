"""One entry point for every pretrained-checkpoint format: `import_checkpoint(path)` picks the
importer from the checkpoint itself (an HF directory's `config.json` `model_type`, a timm hub /
open_clip ConvNeXt directory, or a big_vision / vit_jax `.npz`) and returns (our model config,
flat float32 parameters, report).

The report also names the `data.normalization` preset the checkpoint expects: for HF, the one
whose mean / std equal `preprocessor_config.json`'s `image_mean` / `image_std` (None when that
file is absent or matches no preset); big_vision / vit_jax ViTs are trained on [-1, 1] images.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import ml_collections
import numpy as np

from moe_jax.checkpoints import big_vision, hf, hf_convnext, timm_convnext
from moe_jax.checkpoints.rules import ImportReport
from moe_jax.checkpoints.tree import CheckpointMismatch
from moe_jax.data.transforms import NORMALIZATIONS
from moe_jax.models import convnext, vit

Imported = tuple[ml_collections.ConfigDict, dict[str, np.ndarray], ImportReport]
# HF safetensors directory, big_vision / vit_jax .npz, timm hub / open_clip directory (ConvNeXt).
KINDS = ("hf", "big_vision", "timm")
# config.json model_type -> importer of that HF checkpoint directory.
HF_IMPORTERS: dict[str, Callable[[str], Imported]] = {
    **{t: hf.import_hf for t in hf.MODEL_TYPES}, "convnext": hf_convnext.import_convnext}
# our model.name -> the config fields a checkpoint fixes (see `check_architecture`).
ARCHITECTURE_FIELDS = {"vit": vit.CHECKPOINT_FIELDS, "convnext": convnext.CHECKPOINT_FIELDS}


def checkpoint_kind(path: str) -> str:
  """'timm' for a timm hub / open_clip directory, 'hf' for another directory with config.json,
  'big_vision' for an .npz file."""
  if os.path.isdir(path) and timm_convnext.is_timm_directory(path):
    return "timm"
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
    return "hf"
  if os.path.isfile(path) and path.endswith(".npz"):
    return "big_vision"
  raise CheckpointMismatch(f"{path} is neither an HF checkpoint directory (config.json + "
                           "safetensors), a timm / open_clip directory nor a big_vision / vit_jax "
                           ".npz file")


def import_checkpoint(path: str, kind: str | None = None) -> Imported:
  """(our model config without a head for HF / with the checkpoint's head for big_vision, flat
  float32 parameters, report) of the checkpoint at `path`; `kind` (one of KINDS), if given,
  must be what `path` holds."""
  found = checkpoint_kind(path)
  if kind is not None and kind != found:
    raise CheckpointMismatch(f"init_from.kind={kind!r} but {path} is a {found!r} checkpoint "
                             f"(set init_from.kind={found!r})")
  if found == "big_vision":
    config, params, report = big_vision.import_big_vision(path)
    return config, params, dataclasses.replace(report, normalization="minus_one_one")
  if found == "timm":
    config, params, report = timm_convnext.import_timm_convnext(path)
    return config, params, dataclasses.replace(report, normalization=timm_normalization(path))
  model_type = hf.read_config(path).get("model_type")
  if model_type not in HF_IMPORTERS:
    raise CheckpointMismatch(f"{path}/config.json model_type={model_type!r}: supported "
                             f"{sorted(HF_IMPORTERS)}")
  config, params, report = HF_IMPORTERS[model_type](path)
  return config, params, dataclasses.replace(report, normalization=hf_normalization(path))


def hf_normalization(path: str) -> str | None:
  """The `data.normalization` preset of HF checkpoint directory `path`'s
  `preprocessor_config.json` `image_mean` / `image_std` (to 1e-4), or None."""
  file = os.path.join(path, "preprocessor_config.json")
  if not os.path.exists(file):
    return None
  with open(file) as f:
    stats = json.load(f)
  return normalization_preset(stats.get("image_mean", ()), stats.get("image_std", ()))


def timm_normalization(path: str) -> str | None:
  """The preset of a timm hub directory's `config.json` `pretrained_cfg.mean` / `std` (open_clip:
  `preprocess_cfg`), or None."""
  open_clip_file = os.path.join(path, "open_clip_config.json")
  if os.path.exists(open_clip_file):
    with open(open_clip_file) as f:
      stats = json.load(f).get("preprocess_cfg", {})
  else:
    stats = hf.read_config(path).get("pretrained_cfg", {})
  return normalization_preset(stats.get("mean", ()), stats.get("std", ()))


def normalization_preset(image_mean, image_std) -> str | None:
  """The `data.normalization` preset whose mean / std equal these (to 1e-4), or None."""
  mean, std = np.asarray(image_mean, np.float32), np.asarray(image_std, np.float32)
  for name, (preset_mean, preset_std) in NORMALIZATIONS.items():
    if (mean.size and mean.shape == std.shape
        and np.allclose(np.broadcast_to(preset_mean, mean.shape), mean, atol=1e-4)
        and np.allclose(np.broadcast_to(preset_std, std.shape), std, atol=1e-4)):
      return name
  return None


def check_architecture(model: ml_collections.ConfigDict, checkpoint: ml_collections.ConfigDict,
                       source: str) -> None:
  """CheckpointMismatch naming the first field (activation, norm epsilon, LayerScale, pre-norm,
  ...) where `model` computes another function than the `checkpoint` config needs."""
  for field in ARCHITECTURE_FIELDS[checkpoint.name]:
    if model.get(field) != checkpoint[field]:
      raise CheckpointMismatch(f"{source}: model.{field}={model.get(field)} but the checkpoint "
                               f"needs {checkpoint[field]}")
