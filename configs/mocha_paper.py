r"""MoCHA at paper size (Pang et al. 2025): four ViT-L-class encoders, Phi-2-width LM.

    python train.py --config configs/mocha_paper.py:stage1 --workdir gs://.../mocha_s1
    python train.py --config configs/mocha_paper.py:stage2 --workdir gs://.../mocha_s2 \
        --config.init_from.path=gs://.../mocha_s1

Stage 2 starts from stage 1's latest checkpoint (`init_from.kind='run'`: every parameter, so
the trained connectors and the untouched encoders and LM) with a fresh optimizer at step 0; it
needs its own workdir (the stage-1 workdir holds another optimizer tree: a one-line error).

Encoders (in the reference's order, at 336 px, frozen): SigLIP ViT-L/16 (441 tokens),
ConvNeXt-XXL (10x10 tokens, 3072 channels pooled to 1024), CLIP ViT-L/14 (576), DINOv2 ViT-L/14
(576); ~1.75B parameters together. One MoE connector each (router on the encoder tokens, 4
experts Linear(1024 -> 2560)-GELU-Linear(2560 -> 2560), top-2, balance 0.1, z-loss 0.01) into
the LM width 2560, the reference HGA (`model.hga.kind='reference'`: k=10 split 7 intra / 3
inter, parameter-free), Phi-2-sized decoder (32 blocks, width 2560, ~2.8B parameters;
the real Phi-2 weights are not loaded here). Stage 1: connectors (+ HGA) at lr 1e-3; stage 2:
connectors + LM at lr 2e-5, cosine, 3% warmup.

Here the encoders start from random weights and the data is the embedded digit-VQA set resized
to 336 px (grey repeated to RGB) — the config fixes shapes and the recipe; for the paper's
results use pretrained encoders (or their precomputed features: `encoder_config("features",
tokens=T, dim=D)` + `data.features`) and the paper's instruction data in the same batch format.
Expected result: not measured (needs accelerators).
"""
from __future__ import annotations

import ml_collections

from configs import check_variant
from moe_jax.checkpoints import init_from
from moe_jax.parallel import mesh
from moe_jax.train import optim
from moe_jax.vlm import decoder, encoders, model, vqa_data

VARIANTS = ("stage2", "stage1")


def get_config(variant: str = "stage2") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.task = "vqa"
  c.seed = 0
  c.batch_size = 256 if variant == "stage1" else 128
  c.eval_batch_size = 256
  c.total_steps = 5000
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000

  c.data = vqa_data.default_config()
  c.data.image_size, c.data.channels, c.data.pp_train = 336, 3, "resize|normalize"

  vit_l = dict(trainable=False, dtype="bfloat16")
  c.model = model.mocha_config(decoder.decoder_config(max_len=2048), {  # the reference's order
      "siglip_vit_l16": encoders.encoder_config("vit", vit_variant="L/16", **vit_l),
      "convnext_xxl": encoders.encoder_config("convnet", convnet_size="XXL", pool_channels=1024,
                                              trainable=False, dtype="bfloat16"),
      "clip_vit_l14": encoders.encoder_config("vit", vit_variant="L/14", **vit_l),
      "dinov2_vit_l14": encoders.encoder_config("vit", vit_variant="L/14", **vit_l),
  }, image_size=c.data.get_ref("image_size"), channels=c.data.get_ref("channels"))
  c.model.decoder.dtype = c.model.connector.dtype = "bfloat16"
  c.model.decoder.vocab_size = 51200  # Phi-2's; the digit task uses ids < 33 of it

  c.optimizer = optim.default_config()
  c.optimizer.warmup_steps = int(0.03 * c.total_steps)
  c.optimizer.weight_decay = 0.0
  if variant == "stage1":
    c.optimizer.learning_rate, c.optimizer.schedule = 1e-3, "constant"
  else:
    c.optimizer.learning_rate, c.optimizer.schedule = 2e-5, "cosine"
  c.optimizer.trainable = model.trainable_pattern(c.model, variant)
  c.mesh = mesh.default_config()
  c.init_from = init_from.default_config()
  if variant == "stage2":  # from stage 1's workdir, given on the command line
    c.init_from.kind = "run"
  return c
