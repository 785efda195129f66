r"""ViMoE depth study (reproduction of the ViMoE paper's qualitative finding): per-image routing
with MoE in every block of the tiny ViMoE, with and without a shared expert, over 3 seeds.

    python -m moe_jax.commands.compare --config configs/vimoe_depth_study.py \
        --workdir workdirs/depth_study
    python -m moe_jax.commands.compare --config configs/vimoe_depth_study.py:quick \
        --workdir /tmp/depth

The question: do deeper MoE layers specialise more (per-layer class-expert mutual information,
the per-layer table), and does the shared expert stabilise training (accuracy std over seeds)?
Both strategies train the tiny ViMoE of `configs/compare_routers.py` (Ti/7, width 64, depth 4)
with MoE in all 4 blocks, 4 experts, top-1 per image (`granularity="image"`, mean-pooled router
input, each device's share of the batch as one routing group), capacity factor 1.25; `shared`
adds the summed shared expert; 800 steps (as `compare_routers.py:full`). Measured (2026-12-01,
3 seeds): specialisation rises with depth (block 0 -> 3: 0.10 -> 0.37 with the shared expert,
0.14 -> 0.34 without); the shared expert gives 93.4 +- 0.9% vs 89.0 +- 1.4% test accuracy.
Tables: bench/RESULTS.md ("ViMoE depth study").
"""
from __future__ import annotations

import ml_collections

from configs import check_variant, compare_routers

VARIANTS = ("full", "quick")


def _depth_model(data_config: ml_collections.ConfigDict,
                 shared: bool) -> ml_collections.ConfigDict:
  """The default model with per-image top-1 MoE in every block, with or without shared expert."""
  model = compare_routers.vimoe_tiny_mnist.model_config(data_config)
  model.moe_layers = "every:1"
  model.moe.update_from_flattened_dict({"granularity": "image", "router.k": 1,
                                        "shared_expert.enabled": shared})
  return model


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = compare_routers.get_config("full" if variant == "full" else "quick")
  c.total_steps = 800 if variant == "full" else 10
  c.only, c.seeds, c.per_layer = "shared,no_shared", "0,1,2", True
  c.strategies = ml_collections.ConfigDict({"shared": _depth_model(c.data, True),
                                            "no_shared": _depth_model(c.data, False)})
  if variant == "quick":
    c.seeds = "0,1"
  return c
