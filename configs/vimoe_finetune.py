r"""Fine-tune a trained run (or a checkpoint) on a new dataset, resolution and head.

    python train.py                                                   # the source: MNIST 28x28
    python train.py --config configs/vimoe_finetune.py --workdir workdirs/finetune_digits \
        --config.init_from.path=workdirs/vimoe_tiny_mnist
    python train.py --config configs/vimoe_finetune.py:scratch --workdir workdirs/scratch_digits
    python bench/finetune_study.py       # both, 3 seeds each -> bench/RESULTS.md's table

Variants:
- `digits` (default): the default run's tiny ViMoE (`configs/vimoe_tiny_mnist.py`, MNIST at
  28x28 = a 4x4 grid of 7x7 patches) -> scikit-learn's 8x8 digits upsampled to 21x21 (a 3x3
  grid; another dataset, resolution and grid), head re-initialised, 300 steps. A learned posemb
  would be resized bicubically (`init_from.resize_posemb`); the default model's sincos2d posemb
  is recomputed for the new grid. (The class set is again the digits 0-9: the embedded datasets
  have no other; `data.num_classes` and `reinit='head/.*'` take any other count.)
- `scratch`: the same run from a fresh initialisation (the study's baseline).
- `imagenet384`: a 224x224 ImageNet run of `configs/vimoe_imagenet.py:B/16` -> 384x384 (posemb
  14x14 -> 24x24 bicubic), same classes and head, 10k steps at batch 512, lr 3e-5 (vmoe-style
  short high-resolution fine-tune). Not measured here.
"""
from __future__ import annotations

import ml_collections

from configs import check_variant, vimoe_imagenet, vimoe_tiny_mnist
from moe_jax.checkpoints import init_from

VARIANTS = ("digits", "scratch", "imagenet384")


def get_config(variant: str = "digits") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  if variant == "imagenet384":
    c = vimoe_imagenet.get_config("B/16")
    c.data.image_size = 384  # the model's image_size follows (a reference)
    c.batch_size = c.evals.val.batch_size = c.evals.fewshot.batch_size = 512
    c.total_steps, c.evals.val.every_steps, c.checkpoint_every_steps = 10_000, 1_000, 1_000
    c.evals.fewshot.every_steps = 5_000
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 3e-5, 500
    c.optimizer.weight_decay = 0.0
    source, reinit = "workdirs/vimoe_b16", ""
  else:
    c = vimoe_tiny_mnist.get_config("vimoe")
    c.data.name, c.data.image_size = "sklearn_digits", 21
    c.data.pp_train = "resize|pad_crop(1)|normalize"
    c.total_steps, c.evals.test.every_steps, c.checkpoint_every_steps = 300, 100, 300
    del c.evals.fewshot  # a short fine-tune: the test accuracy only
    c.log_every_steps = 50
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-3, 30
    source, reinit = "workdirs/vimoe_tiny_mnist", "head/.*"
  c.init_from = (init_from.default_config() if variant == "scratch" else
                 init_from.from_source("run", source, reinit=reinit, resize_posemb="bicubic",
                                       upcycle=False))
  return c
