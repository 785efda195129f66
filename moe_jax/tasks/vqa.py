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
generation (`generate_answers`) from batches of the prompts alone (`generate_batches`, sized by
the entry's `max_prompt_len`) and scores the answers as text (`answer_records`, `scores`:
exact / normalised match, or the VQA accuracy against the annotators' `answers`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe_jax import moe
from moe_jax.tasks.base import Batch, Task
from moe_jax.tasks.classification import check_model_matches_data, moe_scalars
from moe_jax.tasks.vqa_scoring import NUM_ANNOTATORS, normalize_answer, vqa_accuracy
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


def scores(record: dict) -> dict[str, float]:
  """The scores of `record["prediction"]`: against the annotators' `answers`, `vqa_accuracy`;
  against one `answer`, `exact_match` (the stripped strings equal) and `normalized_match`
  (equal after VQA's normalisation), 1.0 / 0.0."""
  prediction = record["prediction"]
  if "answers" in record:
    return {"vqa_accuracy": vqa_accuracy(prediction, record["answers"])}
  answer = record["answer"]
  return {"exact_match": float(prediction.strip() == answer.strip()),
          "normalized_match": float(normalize_answer(prediction) == normalize_answer(answer))}


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

  def generate_batches(self, source, *, max_prompt_len: int, field: str, batch_size: int,
                       process_index: int, process_count: int):
    """Re-iterable single pass over a generate evaluation's prompts (`source`: its
    `moe_jax.data.EvalSource`): `tokens [B, max_prompt_len]` hold each row's prompt only
    (the first question, as the reference's eval builds it; `<pad>` after it), with `prompt_len`,
    ids, `mask` (and on the digit task `answer_tokens`); ValueError naming `field` (the entry's
    max_prompt_len) for a longer prompt."""
    kwargs = dict(max_prompt_len=max_prompt_len, field=field, batch_size=batch_size,
                  process_index=process_index, process_count=process_count)
    if self.llava:
      kwargs["num_answers"] = NUM_ANNOTATORS
    return self.data_module.generate_dataset(self.config.data, source, **kwargs)

  def generate_batch_shapes(self, batch_size: int,
                            max_prompt_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a global batch of `generate_batches`."""
    return self.data_module.generate_batch_shapes(self.config, batch_size, max_prompt_len)

  def generate_answers(self, model: model_lib.MoCHA, batch: Batch, max_new_tokens: int,
                       entry: str) -> jax.Array:
    """`[B, max_new_tokens]` greedy tokens after each row's prompt `tokens[:prompt_len]` (the
    image spliced in as in training), through the KV cache, `<pad>` after a row's `<eos>`.
    The prompt buffer + the new tokens must fit the positions, as the reference's generation
    (prompt + max_new_tokens): ValueError naming the fields of `entry` (`evals.<name>`) and
    `model.decoder.max_len` when `visual + max_prompt_len + max_new_tokens` exceeds it."""
    tokens = batch["tokens"]
    visual, length = sum(model.group_sizes), tokens.shape[1]
    if visual + length + max_new_tokens > model.decoder.max_len:
      raise ValueError(f"{entry}.max_prompt_len={length} + {entry}.max_new_tokens="
                       f"{max_new_tokens} + {visual} visual tokens exceed model.decoder.max_len="
                       f"{model.decoder.max_len}; lower them to fit")
    # the last generated token is never fed back: max_new_tokens - 1 columns of room
    tokens = jnp.pad(tokens, ((0, 0), (0, max_new_tokens - 1)), constant_values=self.tokenizer.pad)
    return model_lib.generate(model, batch, tokens, batch["prompt_len"], max_new_tokens,
                              eos_id=self.tokenizer.eos, pad_id=self.tokenizer.pad)

  def _eval_examples(self, source) -> tuple[tuple[dict, ...], int]:
    """(the LLaVA examples of `source`'s file, by JSON row; the first row of its split)."""
    field = f"{source.field}.{source.split_key}"
    name = llava_data.split_rows(self.config.data, source.split, field)[0]
    examples = llava_data.read_examples(self.config.data.files[name])
    return examples, llava_data.split_rows(self.config.data, source.split, field,
                                           len(examples))[1] or 0

  def answer_metrics(self, source) -> tuple[str, ...]:
    """The per-example scores `answer_records` gives on `source`'s split: `vqa_accuracy` where
    the examples have the annotators' `answers` (LLaVA data), else `exact_match`,
    `normalized_match`."""
    if self.llava:
      examples, first = self._eval_examples(source)
      if llava_data.ANSWERS in examples[first]:
        return ("vqa_accuracy",)
    return ("exact_match", "normalized_match")

  def answer_records(self, batch: dict[str, np.ndarray], generated: np.ndarray,
                     source) -> list[dict]:
    """One dict per real row of a host batch of `generate_batches(source)`: its ids (`example`,
    or `image_id` and `qtype`), `prompt`, the reference `answer` (LLaVA: the first gpt turn) or
    `answers` (the annotators'), `prediction` (of `generated [B, N]`) and its scores
    (`answer_metrics`): `exact_match` and `normalized_match` (1.0 / 0.0; the stripped strings
    equal, equal after VQA's normalisation) or `vqa_accuracy` (`vqa_scoring`)."""
    examples = self._eval_examples(source)[0] if self.llava else None
    records = []
    for b in np.flatnonzero(np.asarray(batch["mask"]) > 0):
      n = int(batch["prompt_len"][b])
      record = {**{k: int(batch[k][b]) for k in ("example", "image_id", "qtype") if k in batch},
                "prompt": self.tokenizer.decode(batch["tokens"][b, :n])}
      if examples is None:
        record["answer"] = self.tokenizer.decode(batch["answer_tokens"][b])
      else:
        example = examples[int(batch["example"][b])]
        if llava_data.ANSWERS in example:
          record["answers"] = example[llava_data.ANSWERS]
        else:
          record["answer"] = example["conversations"][1]["value"]
      record["prediction"] = self.tokenizer.decode(generated[b])
      records.append({**record, **scores(record)})
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
