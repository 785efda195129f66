r"""Routing-strategy comparison on the embedded default (tiny ViMoE, embedded MNIST).

    python -m moe_jax.compare --config configs/compare_routers.py --workdir workdirs/compare
    python -m moe_jax.compare --config configs/compare_routers.py:quick --workdir /tmp/cmp

Every strategy trains the same model shape (Ti/7, width 64, depth 4, MoE in the last 2 blocks,
4 experts + a shared expert) with the same data, seed, batch and number of steps, then is
evaluated with routing analysis. `--config.only=top1,soft` runs a subset (e.g. one strategy per
job on a pod, all writing into the same --workdir); `--config.train=False` rebuilds the table
from the finished runs in --workdir. Results: README ("Comparing routing strategies").
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vimoe_tiny_mnist.py")


def _load_default():
  spec = importlib.util.spec_from_file_location("vimoe_tiny_mnist", _DEFAULT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_default = _load_default()
ORDER = ("dense", "top1", "top2", "top2_bpr", "expert_choice", "soft", "moec", "hash")


def _moe_model(router: str, **moe_overrides) -> ml_collections.ConfigDict:
  """The default model under `router` (its paper loss weights), with MoE-node overrides."""
  model = _default.model_config(router)
  for path, value in moe_overrides.items():
    *parents, leaf = path.split(".")
    node = model.moe
    for p in parents:
      node = node[p]
    node[leaf] = value
  return model


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  c = _default.get_config("vimoe")
  c.total_steps = 800 if variant == "full" else 30
  c.log_every_steps = 100 if variant == "full" else 10
  c.eval_every_steps = 0  # evaluated once, at the end
  c.checkpoint_every_steps = 0
  c.only = ",".join(ORDER)  # the strategies to run, in table order
  c.train = True  # False: only rebuild the table from finished runs in --workdir

  s = c.strategies = ml_collections.ConfigDict()
  s.dense = _default.get_config("dense").model
  s.top1 = _moe_model("top_k", **{"router.k": 1, "router.bpr": False})
  s.top2 = _moe_model("top_k", **{"router.k": 2, "router.bpr": False})
  s.top2_bpr = _moe_model("top_k", **{"router.k": 2, "router.bpr": True})
  s.expert_choice = _moe_model("expert_choice", capacity_factor=2.0)  # ~2 experts per token
  s.soft = _moe_model("soft", **{"router.soft.slots_per_expert": 4})  # 16 slots for 16 tokens
  s.moec = _moe_model("clusters", capacity_factor=2.0, **{"router.k": 1})
  s.hash = _moe_model("hash", **{"router.k": 1})
  if variant == "quick":
    c.only = "dense,top2,soft"
  elif variant != "full":
    raise ValueError(f"variant {variant!r}: use full or quick")
  return c
