r"""V-MoE S/32 (E=8, K=2, "Last 2") from scratch on ImageNet-1k for 300 epochs, and its dense twin.

    python train.py --config configs/vmoe_s32_imagenet.py:vmoe --workdir gs://.../vmoe_s32
    python train.py --config configs/vmoe_s32_imagenet.py:dense --workdir gs://.../vit_s32

Reference: google-research/vmoe `vmoe/configs/vmoe_paper/vmoe_s32_last2_ilsvrc2012_randaug_light1.py`
(with `vmoe/configs/vmoe_paper/common.py`), read at commit 942a78b. Taken from it:

- model: vmoe's "ViT-S/32" is **not** big_vision's ViT-S: width 512, 8 blocks, MLP 2048, 8 heads,
  patch 32, 224x224 (49 patches + a CLS token, `classifier='token'`), a pre-logits layer
  (`representation_size=512`, dense + tanh), the head's kernel zero-initialised and its bias
  -log(1000). MoE layers: vmoe's "Last 2" is the last two *odd* blocks,
  `range(1, depth, 2)[-2:]` = blocks 5 and 7 (not 6 and 7).
- loss: `sigmoid_xent` (sum over classes of the binary cross-entropy), `config.loss`.
- MoE: 8 experts, top-2 (weights not renormalised), router noise std 1/E, capacity factor 1.05,
  **no** Batch Prioritized Routing (`dispatcher.batch_priority=False` in common.py), importance
  and load losses 0.005 each, routing groups of 400 tokens (8 images x 50 tokens), dropout 0.2 in
  the experts (`moe.dropout_rate`); evaluation at capacity factor 4.0
  (`moe.eval_capacity_factor`, vmoe's `evaluate.model_overrides`).
- data: train on `train[:99%]`, evaluate `evals.minival` (`train[99%:]`, vmoe's minival) and
  `evals.val` (`validation`); `decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2, 10)|value_range(-1, 1)`
  ("light1"), mixup with concentration 0.2 of 2 images; eval `resize_small(256)|central_crop(224)`.
- optimisation: batch 8192, Adam (b1 0.9, b2 0.999) with decoupled weight decay 0.1 on the
  kernels (vmoe: clip -> scale_by_adam -> + 0.1 * param -> * -lr, i.e. optax.adamw), gradient
  clipping at global norm 1.0, `warmup_linear_decay`: 10,000 warmup steps to 3e-3, linear decay
  to 1e-5; 300 epochs of train[:99%] (1,268,355 images) = 46,449 steps.
- dense twin (`dense`): the same ViT, data and optimisation with every block a dense MLP.

Not as in the reference (no such option here; each changes the recipe, so say so when comparing):
vmoe mixes at device granularity, one Dirichlet(0.2, 0.2) weight per device (ours: pairs
(2k, 2k+1), one weight per global batch from Beta(0.2, 0.2), the same distribution) and shards
the experts over an `expert` mesh axis (ours: expert parallelism does not support
`moe.dropout_rate > 0` yet, so the experts are replicated, `mesh.expert=1`; the experts of the
two MoE layers are 33.6 M parameters).

Expected result (the reference file's docstring, mean of 3 seeds, 5 h 50 min on a TPUv3-32):
ILSVRC2012 `validation` ("test" there) **73.1%** top-1 (76.8% on vmoe's train[99%:] minival,
59.2% ImageNet-V2). The dense twin: no number in the vmoe repository; not given here. Not run on
this machine (no ImageNet, no accelerator).
"""
from __future__ import annotations

import math

import ml_collections

from configs import check_variant
from moe_jax import data
from moe_jax.models import vimoe
from moe_jax.parallel import mesh
from moe_jax.train import evaluators, optim

VARIANTS = ("vmoe", "dense")
TRAIN_IMAGES = 1_268_355  # imagenet2012 train[:99%] (of 1,281,167)
EPOCHS = 300
# vmoe's ViT-S: (width, depth, mlp_dim, heads) = (512, 8, 2048, 8); common.get_vmoe_config.
VMOE_S = dict(width=512, depth=8, mlp_dim=2048, num_heads=8)


def get_config(variant: str = "vmoe") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 8192
  c.total_steps = math.ceil(EPOCHS * TRAIN_IMAGES / c.batch_size)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.profile_steps = ""  # e.g. "10,11": a jax.profiler trace of those steps in WORKDIR/profile
  c.loss = "sigmoid_xent"  # vmoe: config.loss.name

  c.data = data.default_config()
  c.data.name, c.data.train_split = "imagenet2012", "train[:99%]"
  c.data.image_size, c.data.channels, c.data.num_classes = 224, 3, 1000
  c.data.normalization = "minus_one_one"  # vmoe: value_range(-1, 1)
  c.data.pp_train = "decode|inception_crop|flip_lr|randaug(2, 10)|normalize|mixup(0.2)"
  pp_eval = "decode|resize_small(256)|central_crop|normalize"
  # vmoe evaluates its minival (`train[99%:]`, held out of training) and the validation set.
  c.evals = ml_collections.ConfigDict({
      name: evaluators.task_eval("classification", dataset=c.data.get_ref("name"), split=split,
                                 pp=pp_eval, batch_size=8192, every_steps=1000)
      for name, split in (("minival", "train[99%:]"), ("val", "validation"))})

  c.model = vimoe.vimoe_config("S/32", moe_layers="5,7", router="top_k", dtype="bfloat16",
                               pool="cls", representation_size=512,
                               head_bias_init=-math.log(1000), **VMOE_S,
                               **data.model_refs(c.data))
  m = c.model.moe
  m.num_experts, m.router.k, m.capacity_factor = 8, 2, 1.05
  m.router.bpr = False
  m.router.noise_std = 1.0  # eps ~ N(0, (1/E)^2)
  m.router.loss_weights.importance = m.router.loss_weights.load = 0.005
  m.group_size = 8 * ((224 // 32) ** 2 + 1)  # 8 images x 50 tokens, as vmoe
  m.dropout_rate = 0.2
  m.eval_capacity_factor = 4.0
  if variant == "dense":
    c.model.name = "vit"

  c.optimizer = optim.default_config()
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 3e-3
  c.optimizer.schedule = "linear"
  c.optimizer.warmup_steps = 10_000
  c.optimizer.end_learning_rate = 1e-5
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.999

  c.mesh = mesh.default_config()  # data parallel over every chip (see the docstring)
  return c
