r"""MoEC (Mixture of Expert Clusters, Xie et al. AAAI 2023) as a ViMoE router.

    python train.py --config configs/moec_imagenet.py:reference --config.mesh.expert=8

Variants:
- `reference`: the paper's setting — 64 experts in 8 clusters, top-1, capacity factor 2,
  cluster-variance loss (lambda_var 1, gate-loss weight 0.01), cluster-level expert dropout 0.5
  redrawn every 100 steps; ViMoE-B/16 on ImageNet-1k with MoE in every other block.
- `small`: 16 experts in 4 clusters on ViMoE-S/16 (same losses), for a single host.
Expected result: not measured here (no ImageNet on this machine); the embedded-data MoEC run is
`configs/vimoe_tiny_mnist.py:moec`.
"""
from __future__ import annotations

import ml_collections

from configs import check_variant, vimoe_imagenet
from moe_jax import moe

VARIANTS = ("reference", "small")


def get_config(variant: str = "reference") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = vimoe_imagenet.get_config("B/16" if variant == "reference" else "S/16")
  c.model.moe_layers = "every:2"
  m = c.model.moe
  m.router = moe.default_config("clusters").router  # its knobs; loss weights 0.01 (MoEC)
  m.router.k, m.capacity_factor = 1, 2.0
  m.num_experts = 64 if variant == "reference" else 16
  m.router.clusters.num_clusters = 8 if variant == "reference" else 4
  m.router.clusters.lambda_var = 1.0
  m.router.clusters.expert_dropout = 0.5
  m.router.clusters.resample_every = 100
  m.shared_expert.enabled = False
  return c
