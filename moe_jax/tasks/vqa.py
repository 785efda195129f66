"""Visual question answering (MoCHA): answer-token loss, greedy-generation eval, exact match.

Two input pipelines, by `data.name`:
- `mnist_digits_vqa` (the embedded offline default, `moe_jax.vlm.vqa_data`): `image float32
  [B, H, W, C]`, `tokens int32 [B, L]`, `prompt_len`, `answer_len`, `qtype`, `label`,
  `image_id` int32 `[B]`, optional precomputed encoder features `features/<name> float32
  [B, T_i, D_i]`; evaluated by greedy generation and exact match per question type.
- `llava_json` (LLaVA-format instruction data, `moe_jax.vlm.llava_data`): `image`, `tokens`,
  `loss_mask float32 [B, L]` (the assistant turns), `prompt_len`, `example`; evaluated teacher
  forced (answer-token loss and accuracy: open-ended answers have no exact match).
Eval batches add `mask float32 [B]`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_jax import moe
from moe_jax.tasks.base import Batch, Task
from moe_jax.tasks.classification import check_model_matches_data, moe_scalars
from moe_jax.vlm import llava_data, model as model_lib, pretrained, tokenizer as tok, vqa_data


def answer_mask(batch: Batch) -> jax.Array:
  """`[B, L]` float: 1 at the answer tokens and their `<eos>` (the batch's `loss_mask` where it
  has one: multi-turn instruction data, `moe_jax.vlm.llava_data`)."""
  if "loss_mask" in batch:
    return jnp.asarray(batch["loss_mask"], jnp.float32)
  pos = jnp.arange(batch["tokens"].shape[1])[None]
  start = batch["prompt_len"][:, None]
  return ((pos >= start) & (pos < start + batch["answer_len"][:, None])).astype(jnp.float32)


def answer_token_loss(model: nnx.Module, batch: Batch):
  """(per-token cross-entropy `[B, L-1]`, answer mask `[B, L-1]`, hits `[B, L-1]`, MoE aux) of
  next-token prediction; only answer tokens (and `<eos>`) count."""
  tokens = batch["tokens"]
  logits, aux = moe.capture_aux(model)(batch, tokens)
  logits, targets = logits[:, :-1], tokens[:, 1:]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  hits = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return ce, answer_mask(batch)[:, 1:], hits, aux


def vqa_loss(model: nnx.Module, batch: Batch):
  """(loss, metrics): mean answer-token CE + MoE aux losses."""
  ce, mask, hits, aux = answer_token_loss(model, batch)
  n = jnp.maximum(mask.sum(), 1.0)
  answer_ce = jnp.sum(ce * mask) / n
  loss = answer_ce + aux.total_loss
  return loss, {"train/loss": loss, "train/answer_loss": answer_ce,
                "train/token_accuracy": jnp.sum(hits * mask) / n, **moe_scalars(aux, "train")}


def exact_match(generated: jax.Array, batch: Batch) -> jax.Array:
  """`[B]` bool: do the generated tokens `[B, A]` (cut after their first `<eos>`) equal the
  answer + `<eos>`?"""
  A = generated.shape[1]
  steps = jnp.arange(A)[None]
  ended = jnp.cumsum(generated == tok.EOS, axis=1) - (generated == tok.EOS) > 0
  generated = jnp.where(ended, tok.PAD, generated)
  rows = jnp.arange(generated.shape[0])[:, None]
  reference = batch["tokens"][rows, batch["prompt_len"][:, None] + steps]
  reference = jnp.where(steps < batch["answer_len"][:, None], reference, tok.PAD)
  return jnp.all(generated == reference, axis=1)


class VqaTask(Task):
  """`config.task = "vqa"`."""

  name = "vqa"

  def __init__(self, config):
    super().__init__(config)
    self.llava = config.data.name == llava_data.NAME
    self.data_module = llava_data if self.llava else vqa_data

  def check(self) -> None:
    if self.config.data.name not in (vqa_data.NAME, llava_data.NAME):
      raise ValueError(f"data.name={self.config.data.name!r}: the vqa task reads "
                       f"{vqa_data.NAME!r} (embedded) or {llava_data.NAME!r} (LLaVA JSON files)")
    check_model_matches_data(self.config)
    pretrained.check_decoder_config(self.config.model)
    if self.llava:
      llava_data.check_config(self.config.data)
    else:
      vqa_data.validate(self.config.data)

  def train_batches(self, **kw):
    if self.llava:  # the tokenizer must fit the LM: checked once its file is read
      vocab = len(llava_data.build_tokenizer(self.config.data.tokenizer))
      if vocab > self.config.model.decoder.vocab_size:
        raise ValueError(f"data.tokenizer.path={self.config.data.tokenizer.path!r} has {vocab} "
                         f"tokens but model.decoder.vocab_size="
                         f"{self.config.model.decoder.vocab_size}; use the LM's own tokenizer")
    return super().train_batches(**kw)

  def check_eval(self, source):
    self.data_module.check_eval_source(self.config.data, source)

  def batch_shapes(self, batch_size, eval_):
    return self.data_module.batch_shapes(self.config, batch_size, eval_)

  def loss(self, model, batch):
    return vqa_loss(model, batch)

  def eval_sums(self, model, batch):
    """Sums over real examples: answer-token loss, tokens, token hits (teacher forced), count;
    on the digit task also the exact matches of greedy answers (overall and per question
    type)."""
    ce, mask, hits, _ = answer_token_loss(model, batch)
    real = batch["mask"]
    mask = mask * real[:, None]
    teacher_forced = {"loss": jnp.sum(ce * mask), "tokens": mask.sum(),
                      "token_hits": jnp.sum(hits * mask), "count": real.sum()}
    if self.llava:
      return teacher_forced
    generated = model_lib.generate(model, batch, batch["tokens"], batch["prompt_len"],
                                   self.config.data.answer_len, eos_id=tok.EOS, pad_id=tok.PAD)
    exact = exact_match(generated, batch) * real
    types = jax.nn.one_hot(batch["qtype"], len(vqa_data.QUESTION_TYPES)) * real[:, None]
    return {**teacher_forced, "exact": exact.sum(), "type_exact": exact @ types,
            "type_count": types.sum(0)}

  def eval_results(self, s):
    n, t = float(s["count"]), float(s["tokens"])
    scalars = {"eval/loss": float(s["loss"]) / t,
               "eval/token_accuracy": float(s["token_hits"]) / t, "eval/num_examples": n}
    if self.llava:
      return scalars, {}
    scalars["eval/exact_match"] = float(s["exact"]) / n
    for name, hit, count in zip(vqa_data.QUESTION_TYPES, s["type_exact"], s["type_count"]):
      if count:
        scalars[f"eval/exact_match/{name}"] = float(hit) / float(count)
    return scalars, {}
