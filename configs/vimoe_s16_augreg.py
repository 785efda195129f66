r"""ViMoE-S/16 upcycled from an AugReg ViT-S/16 (big_vision / vit_jax `.npz`), on ImageNet-1k.

    gsutil cp gs://vit_models/augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz \
        checkpoints/augreg_s16_i21k.npz
    python train.py --config configs/vimoe_s16_augreg.py --workdir workdirs/vimoe_s16_augreg \
        --config.init_from.path=checkpoints/augreg_s16_i21k.npz --config.mesh.expert=8

Variants: `vimoe` (default) and `dense` (the AugReg ViT-S/16 fine-tuned as is).

Model = the AugReg checkpoint's architecture (big_vision ViT-S/16: tanh GELU, LayerNorm eps
1e-6, CLS token, learned posemb) at 224x224; the ImageNet-21k head is replaced by a fresh
1000-class one (`reinit='head/.*'`); inputs in [-1, 1] (`data.normalization='minus_one_one'`, as
big_vision trained it). MoE: 8 experts, top-2, a shared expert, in the last 2 blocks (V-MoE's
"last-2" placement); upcycled with `upcycle_split='shared'`, so step 0 equals the AugReg model.
Reading `.npz` checkpoints is `init_from.kind='big_vision'` (moe_jax.checkpoints, the importer).
Expected result: not measured here (no ImageNet on this machine).
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
  c = vimoe_imagenet.get_config("S/16")  # ImageNet data, schedule, optimizer, mesh
  c.data.normalization = "minus_one_one"
  c.model = vimoe.vimoe_config("S/16", moe_layers="last:2", router="top_k", dtype="bfloat16",
                               pool="cls", **data.model_refs(c.data))
  m = c.model.moe
  m.num_experts, m.router.k, m.capacity_factor = 8, 2, 1.05
  m.shared_expert.enabled = True
  c.optimizer.learning_rate = 1e-4  # fine-tuning a pretrained model

  # A fresh 1000-class head for the 21k one. resize_posemb only acts at another image size
  # (big_vision resamples with scipy.ndimage.zoom, order 1 on a corner-aligned grid: slightly
  # different from this torch-style bilinear).
  c.init_from = init_from.from_source("big_vision", "checkpoints/augreg_s16_i21k.npz",
                                      reinit="head/.*", resize_posemb="bilinear",
                                      upcycle=variant == "vimoe")
  if variant == "dense":
    c.model.name = "vit"
  return c
