"""Visual question answering (MoCHA): answer-token loss, greedy-generation eval, exact match.

Two input pipelines, by `data.name`:
- `mnist_digits_vqa` (the embedded offline default, `moe_jax.vlm.vqa_data`): `image float32
  [B, H, W, C]`, `tokens int32 [B, L]`, `prompt_len`, `answer_len`, `qtype`, `label`,
  `image_id` int32 `[B]`, optional precomputed encoder features `features/<name> float32
  [B, T_i, D_i]`; evaluated by greedy generation and exact match per question type.
- `llava_json` (LLaVA-format instruction data, `moe_jax.vlm.llava_data`): `image`, `tokens`,
  `loss_mask float32 [B, L]` (the assistant turns), `prompt_len`, `image_pos` (where the visual
  tokens are spliced in), `example`; its own evaluation is teacher forced (answer-token loss and
  accuracy).
Eval batches add `mask float32 [B]`. On either, a 'generate' entry of `config.evals`
(`moe_jax.train.evaluators.GenerateEvaluator`) answers each example's first question by greedy
generation (`generate_answers`) and scores the answers as text (`answer_records`).
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
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
  """(per-token cross-entropy `[B, L]`, answer mask `[B, L]`, hits `[B, L]`, MoE aux) of
  predicting each text token (`model(batch, tokens)[:, i]` predicts `tokens[:, i]`: the first
  token after the image from the last visual token, as the reference's labels); only answer
  tokens (and `<eos>`) count."""
  tokens = batch["tokens"]
  logits, aux = moe.capture_aux(model)(batch, tokens)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
  hits = (jnp.argmax(logits, -1) == tokens).astype(jnp.float32)
  return ce, answer_mask(batch), hits, aux


def vqa_loss(model: nnx.Module, batch: Batch):
  """(loss, metrics): mean answer-token CE + MoE aux losses."""
  ce, mask, hits, aux = answer_token_loss(model, batch)
  n = jnp.maximum(mask.sum(), 1.0)
  answer_ce = jnp.sum(ce * mask) / n
  loss = answer_ce + aux.total_loss
  return loss, {"train/loss": loss, "train/answer_loss": answer_ce,
                "train/token_accuracy": jnp.sum(hits * mask) / n, **moe_scalars(aux, "train")}


# VQA's answer normalisation (the evaluation's EvalAIAnswerProcessor, which LLaVA's m4c_evaluator
# uses), in short: lower case, punctuation dropped, number words as digits, articles dropped.
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")


def normalize_answer(text: str) -> str:
  """`text` lower-cased, without punctuation (a period between digits kept), number words as
  digits and articles dropped, words single-spaced (VQA's normalisation, simplified: no
  contraction table)."""
  text = re.sub(r"(?!(?<=\d)\.(?=\d))[^\w\s]", "", text.lower().replace("\n", " "))
  words = [NUMBER_WORDS.get(w, w) for w in text.split()]
  return " ".join(w for w in words if w not in ARTICLES)


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

  @functools.cached_property
  def tokenizer(self) -> tok.Tokenizer | tok.PretrainedTokenizer:
    """The text's tokenizer (`bos`, `eos`, `pad`, `decode`)."""
    return llava_data.build_tokenizer(self.config.data.tokenizer) if self.llava else (
        tok.Tokenizer())

  def generate_answers(self, model: model_lib.MoCHA, batch: Batch, max_new_tokens: int,
                       field: str) -> jax.Array:
    """`[B, max_new_tokens]` greedy tokens after each row's prompt `tokens[:prompt_len]` (the
    first question, with the image spliced in as in training), through the KV cache, `<pad>`
    after a row's `<eos>`. The text gets `max_new_tokens - 1` columns of room, so every prompt
    fits; ValueError naming `field` when the sequence outgrows `model.decoder.max_len`."""
    tokens = batch["tokens"]
    visual, room = sum(model.group_sizes), tokens.shape[1] + max_new_tokens - 1
    if visual + room > model.decoder.max_len:
      raise ValueError(f"{field}={max_new_tokens}: {visual} visual + {tokens.shape[1]} text + "
                       f"{max_new_tokens - 1} new tokens exceed model.decoder.max_len="
                       f"{model.decoder.max_len}; lower it or data.text_len, or raise "
                       "model.decoder.max_len")
    tokens = jnp.pad(tokens, ((0, 0), (0, max_new_tokens - 1)), constant_values=self.tokenizer.pad)
    return model_lib.generate(model, batch, tokens, batch["prompt_len"], max_new_tokens,
                              eos_id=self.tokenizer.eos, pad_id=self.tokenizer.pad)

  def answer_records(self, batch: dict[str, np.ndarray], generated: np.ndarray) -> list[dict]:
    """One dict per real row of a host batch: its ids (`example`, or `image_id` and `qtype`),
    `prompt`, reference `answer` (the text after the prompt up to `<eos>`), `prediction` (of
    `generated [B, N]`), `exact_match` and `normalized_match` (1.0 / 0.0)."""
    records = []
    for b in np.flatnonzero(np.asarray(batch["mask"]) > 0):
      n = int(batch["prompt_len"][b])
      answer = self.tokenizer.decode(batch["tokens"][b, n:])
      prediction = self.tokenizer.decode(generated[b])
      records.append({
          **{k: int(batch[k][b]) for k in ("example", "image_id", "qtype") if k in batch},
          "prompt": self.tokenizer.decode(batch["tokens"][b, :n]), "answer": answer,
          "prediction": prediction,
          "exact_match": float(prediction.strip() == answer.strip()),
          "normalized_match": float(normalize_answer(prediction) == normalize_answer(answer))})
    return records

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
