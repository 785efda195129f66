r"""ViMoE on ImageNet-1k (paper-style recipe) and its dense twins.

    python train.py --config configs/vimoe_imagenet.py:B/16 --workdir gs://.../vimoe_b16 \
        --config.mesh.expert=8

Variants: `S/16`, `B/16`, `L/16` (ViMoE: 8 experts, top-2, shared expert, MoE in the last 4
blocks, capacity factor 1.05, per-token routing) and `dense-S/16`, `dense-B/16`, `dense-L/16`
(the same ViT without MoE). Needs `imagenet2012` prepared in the tfds data dir (the trainer
says how when it is missing). The paper starts from a pretrained DINOv2 ViT and trains ~200
epochs at lr 3e-4; to start from a dense checkpoint use `moe_jax.models.vimoe.upcycle`.
Expected result: not measured here (no ImageNet on this machine).
"""
from __future__ import annotations

import ml_collections

from configs import check_variant
from moe_jax import data
from moe_jax.models import vimoe
from moe_jax.parallel import mesh
from moe_jax.train import evaluators, optim

IMAGES_PER_EPOCH = 1_281_167
VARIANTS = ("B/16", "S/16", "L/16", "dense-S/16", "dense-B/16", "dense-L/16")


def get_config(variant: str = "B/16") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  dense = variant.startswith("dense-")
  size = variant.removeprefix("dense-")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 4096
  epochs = 200
  c.total_steps = epochs * IMAGES_PER_EPOCH // c.batch_size
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.profile_steps = ""  # e.g. "10,11": a jax.profiler trace of those steps in WORKDIR/profile

  c.data = data.default_config()
  c.data.name = "imagenet2012"
  c.data.image_size, c.data.channels, c.data.num_classes = 224, 3, 1000
  # Inception crop + flip + RandAugment + mixup + label smoothing (DeiT-style); eval: the short
  # side to 256, central 224 (ratio 0.875).
  c.data.pp_train = ("decode|inception_crop|flip_lr|randaug(2, 9)|normalize|mixup(0.8)"
                     "|label_smoothing(0.1)")
  pp_eval = "decode|resize_small(256)|central_crop|normalize"
  # The validation set, and big_vision's ImageNet few-shot probe: shots from the first 10% of
  # the train split (>= 25 per class), tested on the validation set.
  c.evals = ml_collections.ConfigDict(dict(
      val=evaluators.task_eval("classification", dataset=c.data.get_ref("name"),
                               split="validation", pp=pp_eval, batch_size=4096,
                               every_steps=5000),
      fewshot=evaluators.fewshot_eval(dataset=c.data.get_ref("name"), train_split="train[:10%]",
                                      split="validation", pp=pp_eval, batch_size=4096,
                                      every_steps=10_000)))

  c.model = vimoe.vimoe_config(size, moe_layers="last:4", router="top_k", dtype="bfloat16",
                               stochastic_depth=0.1, **data.model_refs(c.data))
  m = c.model.moe
  m.num_experts, m.router.k, m.capacity_factor = 8, 2, 1.05
  m.group_size = 0  # one routing group per image
  m.shared_expert.enabled = True
  if dense:
    c.model.name = "vit"

  c.optimizer = optim.default_config()
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 10_000
  c.optimizer.weight_decay = 0.05
  c.optimizer.b2 = 0.999

  c.mesh = mesh.default_config()  # set mesh.expert (e.g. 8) to shard experts
  return c
