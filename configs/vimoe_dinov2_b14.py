r"""ViMoE-B/14 upcycled from DINOv2-B (the ViMoE paper's start), fine-tuned on ImageNet-1k.

    huggingface-cli download facebook/dinov2-base --local-dir checkpoints/dinov2-base
    python train.py --config configs/vimoe_dinov2_b14.py --workdir workdirs/vimoe_dinov2_b14 \
        --config.init_from.path=checkpoints/dinov2-base --config.mesh.expert=8

Variants: `vimoe` (default) and `dense` (the DINOv2 ViT-B/14 fine-tuned as is: the baseline).

Model = DINOv2-B/14's architecture (width 768, 12 blocks, erf GELU, LayerScale, LayerNorm eps
1e-6, CLS pooling) at 224x224 (a 16x16 patch grid; the checkpoint's 37x37 posemb, for 518x518,
is resized bicubically as HF's `interpolate_pos_encoding` does); a fresh head; ImageNet
mean/std normalisation (`data.normalization='imagenet'`, what DINOv2 was trained with).
MoE (from the paper, SPECS.md): MoE layers in the deeper half (`last:4`), a shared expert, and
per-image routing (each image routed by its CLS token, capacity over images). Not checked
against the paper's tables here (only its abstract could be read offline): 8 experts, top-2,
capacity factor 1.05 and the optimiser follow `configs/vimoe_imagenet.py` (~200 epochs,
lr 3e-4, as SPECS.md gives the paper's setting).
Upcycling: `init_from.upcycle_split='shared'`: the shared expert is DINOv2's MLP and the routed
experts' fc2 starts at 0, so at step 0 the model computes exactly DINOv2's features
(tests/test_init_from.py); `upcycle_noise_std` perturbs the routed experts' fc1 copies.
Expected result: not measured here (no ImageNet, no accelerator on this machine).
"""
from __future__ import annotations

import ml_collections

from configs import check_variant, vimoe_imagenet
from moe_jax import data
from moe_jax.checkpoints import init_from
from moe_jax.models import vimoe

VARIANTS = ("vimoe", "dense")


def get_config(variant: str = "vimoe") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = vimoe_imagenet.get_config("B/16")  # ImageNet data, schedule, optimizer, mesh
  c.data.normalization = "imagenet"
  c.model = vimoe.vimoe_config(
      "B/14", moe_layers="last:4", router="top_k", dtype="bfloat16", stochastic_depth=0.1,
      gelu_approximate=False, layer_norm_eps=1e-6, layer_scale=1.0, pool="cls",
      **data.model_refs(c.data))
  m = c.model.moe
  m.activation = "gelu_exact"  # DINOv2's MLP
  m.num_experts, m.router.k, m.capacity_factor = 8, 2, 1.05
  m.granularity, m.image_pooling = "image", "cls"
  m.shared_expert.enabled = True

  # DINOv2 has no classifier: a fresh head.
  c.init_from = init_from.from_source("hf", "checkpoints/dinov2-base", reinit="head/.*",
                                      resize_posemb="bicubic", upcycle=variant == "vimoe")
  if variant == "dense":
    c.model.name = "vit"
  return c
