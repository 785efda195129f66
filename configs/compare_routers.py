r"""Routing-strategy comparison on the embedded default (tiny ViMoE, embedded MNIST).

    python -m moe_jax.commands.compare --config configs/compare_routers.py \
        --workdir workdirs/compare
    python -m moe_jax.commands.compare --config configs/compare_routers.py:quick \
        --workdir /tmp/cmp

Every strategy trains the same model shape (Ti/7, width 64, depth 4, MoE in the last 2 blocks,
4 experts + a shared expert) with the same data, seed, batch and number of steps, then is
evaluated with routing analysis. `--config.only=top1,soft` runs a subset (e.g. one strategy per
job on a pod, all writing into the same --workdir); `--config.train=False` rebuilds the table
from the finished runs in --workdir; `--config.seeds=0,1,2` trains every strategy once per seed
(mean ± std in the table). Results: README ("Comparing routing strategies").

The `experts` variant (MoEC's claim: clusters help more as experts grow under limited data):
top-1 vs MoEC (4 clusters, cluster-level expert dropout 0.5, top-1, capacity factor 2) at 8, 32
and 64 experts, 3 seeds, 300 steps each:

    python -m moe_jax.commands.compare --config configs/compare_routers.py:experts \
        --workdir workdirs/moec_experts
"""
from __future__ import annotations

import ml_collections

from configs import check_variant, vimoe_tiny_mnist

VARIANTS = ("full", "quick", "experts")
ORDER = ("dense", "top1", "top2", "top2_bpr", "expert_choice", "soft", "moec", "hash")


def _moe_model(data_config: ml_collections.ConfigDict, router: str,
               **moe_overrides) -> ml_collections.ConfigDict:
  """The default model under `router` (its paper loss weights), with MoE-node overrides (dotted
  keys)."""
  model = vimoe_tiny_mnist.model_config(data_config, router)
  model.moe.update_from_flattened_dict(moe_overrides)
  return model


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = vimoe_tiny_mnist.get_config("vimoe")
  c.total_steps = {"full": 800, "quick": 30, "experts": 300}[variant]
  c.log_every_steps = 10 if variant == "quick" else 100
  c.evals.test.every_steps = 0  # evaluated once, at the end
  del c.evals.fewshot  # the table compares the test accuracy and routing only
  c.checkpoint_every_steps = 0
  c.only = ",".join(ORDER)  # the strategies to run, in table order
  c.train = True  # False: only rebuild the table from finished runs in --workdir
  c.seeds = "0"  # each strategy trains once per seed, e.g. "0,1,2"
  c.num_experts = ""  # e.g. "8,32,64": one row per expert count for every MoE strategy
  c.per_layer = False  # True: also a table of each MoE layer's specialisation

  s = c.strategies = ml_collections.ConfigDict()
  s.dense = vimoe_tiny_mnist.model_config(c.data)  # the "dense" variant's model: the ViT twin
  s.dense.name = "vit"
  s.top1 = _moe_model(c.data, "top_k", **{"router.k": 1, "router.bpr": False})
  s.top2 = _moe_model(c.data, "top_k", **{"router.k": 2, "router.bpr": False})
  s.top2_bpr = _moe_model(c.data, "top_k", **{"router.k": 2, "router.bpr": True})
  s.expert_choice = _moe_model(c.data, "expert_choice", capacity_factor=2.0)  # ~2 per token
  s.soft = _moe_model(c.data, "soft", **{"router.soft.slots_per_expert": 4})  # 16 slots
  s.moec = _moe_model(c.data, "clusters", capacity_factor=2.0, **{"router.k": 1})
  s.hash = _moe_model(c.data, "hash", **{"router.k": 1})
  if variant == "quick":
    c.only = "dense,top2,soft"
  elif variant == "experts":
    c.only, c.seeds, c.num_experts = "top1,moec", "0,1,2", "8,32,64"
    s.moec.moe.router.clusters.update(num_clusters=4, expert_dropout=0.5)  # MoEC: p = 0.5
  return c
