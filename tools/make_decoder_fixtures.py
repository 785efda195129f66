"""Writes the decoder parity fixtures `tests/data/<model>/`: tiny random HF causal LMs.

Each fixture is what `save_pretrained` writes (`config.json`, `generation_config.json`,
`model.safetensors` or shards + `model.safetensors.index.json`) and `reference.npz`: fixed
`input_ids [B, L]` and the model's float32 `logits [B, L, V]` on them. `tests/test_decoders.py` reads these with
`moe_jax.checkpoints.hf_decoders` and no torch.

  HF_HUB_OFFLINE=1 /work/venv-convert/bin/python tools/make_decoder_fixtures.py
"""
from __future__ import annotations

import os

import numpy as np
import torch
import transformers as tf

from make_parity_fixtures import saved_reference

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64)
# name -> (model, save_pretrained kwargs).
MODELS = {
    # Phi-2's layout: parallel blocks, partial rotary (head_dim 8 -> 4 rotary dims), gelu_new.
    "hf_phi": (lambda: tf.PhiForCausalLM(tf.PhiConfig(
        partial_rotary_factor=0.5, rope_theta=10_000.0, hidden_act="gelu_new",
        layer_norm_eps=1e-5, **TINY)), {}),
    # LLaMA / Vicuna: grouped-query attention (4 query heads on 2 key/value heads), untied head,
    # a non-default rope_theta.
    "hf_llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, **TINY)), {}),
    # Tied head (no lm_head.weight in the file), saved in shards (index file).
    "hf_llama_tied": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        num_key_value_heads=1, tie_word_embeddings=True, **TINY)), dict(max_shard_size="20KB")),
}


def main() -> None:
  for name, (make, save_kwargs) in MODELS.items():
    model, folder = saved_reference(name, make, save_kwargs)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 12)).astype(np.int32)
    with torch.no_grad():
      logits = model(input_ids=torch.from_numpy(ids).long()).logits
    np.savez(os.path.join(folder, "reference.npz"), input_ids=ids,
             logits=logits.float().numpy())
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(f"{name}: {sorted(os.listdir(folder))}, {size / 1024:.0f} KB")


if __name__ == "__main__":
  main()
