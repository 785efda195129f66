r"""The tiny MoCHA of `configs/mocha_tiny_digits_vqa.py` with a Phi-2-style decoder
(`moe_jax.vlm.phi`: parallel blocks, partial rotary, biases, LM head with bias; 2 blocks of
width 64, 4 heads, the second block's MLP an MoE) in place of the from-scratch 'transformer'.

    python -m moe_jax.commands.aot --config configs/mocha_tiny_phi.py:bfloat16 \
        --topology v5p:2x2x1 --config.batch_size=16      # the gradient all-reduce dtypes
    python train.py --config configs/mocha_tiny_phi.py

Variants (`--config configs/mocha_tiny_phi.py:VARIANT`): the compute dtype of the encoders, the
connectors and the decoder, `float32` (default) or `bfloat16` (parameters stay float32; the
gradients reduce in `mesh.grad_reduce_dtype`, f32 by default). Used for the gradient all-reduce
precision in `bench/RESULTS.md` (`bench/grad_precision.py`); its accuracy on the digit-VQA task
has not been measured.
"""
from __future__ import annotations

import ml_collections

from configs import check_variant, mocha_tiny_digits_vqa
from moe_jax.vlm import phi, tokenizer

VARIANTS = ("float32", "bfloat16")


def get_config(variant: str = "float32") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = mocha_tiny_digits_vqa.get_config("stage2")
  c.model.decoder = phi.phi_config(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=4,
                                   vocab_size=len(tokenizer.VOCAB), max_len=64, moe_layers="last:1")
  c.model.decoder.dtype = c.model.connector.dtype = variant
  for encoder in c.model.encoders.values():
    encoder[encoder.kind].dtype = variant
  return c
