"""Model zoo. `build_model(config.model, rngs=...)` builds the model named by `config.model.name`."""
from __future__ import annotations

import ml_collections
from flax import nnx

from moe_jax.registry import Registry

# model.name -> class, each built as Class(model_config, rngs=rngs). Add one with
# `MODELS.register("name", "package.module:Class")`.
MODELS = Registry("model.name", {
    "vit": "moe_jax.models.vit:ViT",
    "vimoe": "moe_jax.models.vimoe:ViMoE",
    "convnext": "moe_jax.models.convnext:ConvNeXt",
    "mocha": "moe_jax.vlm.model:MoCHA",
})


def build_model(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
  """The model named by `config.name` (see `MODELS`)."""
  return MODELS.get(config.name)(config, rngs=rngs)
