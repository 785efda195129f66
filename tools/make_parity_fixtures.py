"""Writes the conversion parity fixtures `tests/data/<model>/`: tiny random HF reference models.

Each fixture is what `save_pretrained` writes (`config.json` + `model.safetensors`, or shards +
`model.safetensors.index.json`) and `reference.npz`: fixed `pixel_values [B, C, H, W]` and the
model's `last_hidden_state [B, T, D]` (+ `pooler_output [B, D]` for DINOv2) on them, in float32.
The tests read these with `moe_jax.checkpoints` and no torch.

  python -m venv /work/venv-convert && /work/venv-convert/bin/pip install -e '.[convert]'
  HF_HUB_OFFLINE=1 /work/venv-convert/bin/python tools/make_parity_fixtures.py
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import torch
import transformers as tf

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data")
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28,
            patch_size=7, num_channels=3)
# name -> (model, save_pretrained kwargs); dinov2_registers is saved in shards.
MODELS = {
    "hf_vit": (lambda: tf.ViTModel(tf.ViTConfig(intermediate_size=64, **TINY)), {}),
    "hf_dinov2": (lambda: tf.Dinov2Model(tf.Dinov2Config(mlp_ratio=2, layerscale_value=0.5,
                                                         **TINY)), {}),
    "hf_dinov2_registers": (lambda: tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(
        mlp_ratio=2, layerscale_value=0.5, num_register_tokens=2, **TINY)),
                            dict(max_shard_size="40KB")),
}


def perturbed(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
  """`model` with every parameter moved by N(0, scale): norms, biases and LayerScale no longer
  sit at their 1 / 0 / constant inits, so a layout error in any of them shows in the outputs."""
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))
  return model.eval()


def saved_reference(name: str, make, save_kwargs: dict) -> tuple[torch.nn.Module, str]:
  """(the perturbed model `make()` under seed 0, its folder `OUT/name`, rewritten by
  `save_pretrained`)."""
  torch.manual_seed(0)
  model = perturbed(make())
  folder = os.path.join(OUT, name)
  shutil.rmtree(folder, ignore_errors=True)
  model.save_pretrained(folder, **save_kwargs)
  return model, folder


def main() -> None:
  for name, (make, save_kwargs) in MODELS.items():
    model, folder = saved_reference(name, make, save_kwargs)
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
      out = model(pixel_values=torch.from_numpy(pixels))
    arrays = dict(pixel_values=pixels, last_hidden_state=out.last_hidden_state.numpy())
    if name != "hf_vit":  # HF ViT's pooler is a tanh dense layer that our model does not have
      arrays["pooler_output"] = out.pooler_output.numpy()
    np.savez(os.path.join(folder, "reference.npz"), **arrays)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(f"{name}: {sorted(os.listdir(folder))}, {size / 1024:.0f} KB")


if __name__ == "__main__":
  main()
