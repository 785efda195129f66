"""Model zoo. `build_model(config.model, rngs=...)` builds the model named by `config.model.name`."""
from __future__ import annotations

import importlib

import ml_collections
from flax import nnx

# model.name -> "module:Class"; each class is built as Class(model_config, rngs=rngs).
MODEL_CLASSES = {
    "vit": "moe_jax.models.vit:ViT",
    "vimoe": "moe_jax.models.vimoe:ViMoE",
    "mocha": "moe_jax.vlm.model:MoCHA",
}


def build_model(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
  """The model named by `config.name` (see MODEL_CLASSES)."""
  if config.name not in MODEL_CLASSES:
    raise ValueError(f"model.name={config.name!r} is unknown; use one of {sorted(MODEL_CLASSES)}")
  module, cls = MODEL_CLASSES[config.name].split(":")
  return getattr(importlib.import_module(module), cls)(config, rngs=rngs)
