"""The VQA task on the shared trainer: answer-token loss, greedy-generation eval, exact match.

`python train.py --config configs/mocha_tiny_digits_vqa.py` dispatches here on
`config.task == "vqa"`; `VqaTrainer` is `moe_jax.train.loop.Trainer` with the VQA data, loss and
evaluation plugged into its task hooks (checkpoints, logging, sharding, freezing masks unchanged).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from moe_jax import moe
from moe_jax.parallel import mesh as mesh_lib
from moe_jax.parallel import sharding
from moe_jax.train import loop, step as step_lib
from moe_jax.train.state import ModelDefs, TrainState
from moe_jax.vlm import model as model_lib, tokenizer as tok, vqa_data


def answer_mask(batch: dict[str, jax.Array]) -> jax.Array:
  """`[B, L]` float: 1 at the answer tokens and their `<eos>`."""
  pos = jnp.arange(batch["tokens"].shape[1])[None]
  start = batch["prompt_len"][:, None]
  return ((pos >= start) & (pos < start + batch["answer_len"][:, None])).astype(jnp.float32)


def answer_token_loss(model: nnx.Module, batch: dict[str, jax.Array]):
  """(per-token cross-entropy `[B, L-1]`, answer mask `[B, L-1]`, hits `[B, L-1]`, MoE aux) of
  next-token prediction; only answer tokens (and `<eos>`) count."""
  tokens = batch["tokens"]
  logits, aux = moe.capture_aux(model)(batch, tokens)
  logits, targets = logits[:, :-1], tokens[:, 1:]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  hits = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return ce, answer_mask(batch)[:, 1:], hits, aux


def vqa_loss(model: nnx.Module, batch: dict[str, jax.Array]):
  """(loss, metrics) for `step.make_train_step`: mean answer-token CE + MoE aux losses."""
  ce, mask, hits, aux = answer_token_loss(model, batch)
  n = jnp.maximum(mask.sum(), 1.0)
  answer_ce = jnp.sum(ce * mask) / n
  loss = answer_ce + aux.total_loss
  return loss, {"train/loss": loss, "train/answer_loss": answer_ce,
                "train/token_accuracy": jnp.sum(hits * mask) / n,
                **step_lib.moe_scalars(aux, "train")}


def exact_match(generated: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
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


def make_eval_step(defs: ModelDefs, mesh: jax.sharding.Mesh, shardings: TrainState,
                   answer_len: int) -> Callable:
  """`eval_step(state, batch) -> sums` over real examples: answer-token loss, tokens, token hits
  (teacher forced), exact matches of greedy answers (overall and per question type), count."""
  num_types = len(vqa_data.QUESTION_TYPES)

  def eval_step(state: TrainState, batch: dict[str, jax.Array]):
    model = nnx.merge(defs.eval, state.params, state.rest, copy=True)
    ce, mask, hits, _ = answer_token_loss(model, batch)
    real = batch["mask"]
    mask = mask * real[:, None]
    generated = model_lib.generate(model, batch, batch["tokens"], batch["prompt_len"], answer_len)
    exact = exact_match(generated, batch) * real
    types = jax.nn.one_hot(batch["qtype"], num_types) * real[:, None]
    return {"loss": jnp.sum(ce * mask), "tokens": mask.sum(), "token_hits": jnp.sum(hits * mask),
            "exact": exact.sum(), "count": real.sum(), "type_exact": exact @ types,
            "type_count": types.sum(0)}

  return jax.jit(eval_step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def evaluate(config: ml_collections.ConfigDict, state: TrainState, defs: ModelDefs,
             mesh: jax.sharding.Mesh, shardings: TrainState) -> dict[str, float]:
  """`eval/...` scalars on the eval split: loss, token accuracy, exact match (and per type)."""
  B = config.get("eval_batch_size", config.batch_size)
  mesh_lib.build_mesh(config.mesh, global_batch=B)
  pc, pi = jax.process_count(), jax.process_index()
  ds = vqa_data.eval_dataset(config.data, batch_size=B // pc, process_index=pi, process_count=pc)
  with jax.set_mesh(mesh):
    eval_step = make_eval_step(defs, mesh, shardings, config.data.answer_len)
    s = loop.sum_eval_batches(eval_step, state, ds, mesh)
  n, t = float(s["count"]), float(s["tokens"])
  scalars = {"eval/loss": float(s["loss"]) / t, "eval/token_accuracy": float(s["token_hits"]) / t,
             "eval/exact_match": float(s["exact"]) / n, "eval/num_examples": n}
  for name, hit, count in zip(vqa_data.QUESTION_TYPES, s["type_exact"], s["type_count"]):
    if count:
      scalars[f"eval/exact_match/{name}"] = float(hit) / float(count)
  return scalars


class VqaTrainer(loop.Trainer):
  """The shared trainer with the VQA task hooks."""

  train_dataset = staticmethod(vqa_data.train_dataset)
  abstract_batch = staticmethod(vqa_data.abstract_batch)
  make_train_step = staticmethod(functools.partial(step_lib.make_train_step, task_loss=vqa_loss))

  def evaluate(self, state: TrainState) -> tuple[dict, dict]:
    return evaluate(self.config, state, self.defs, self.mesh, self.shardings), {}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from `workdir`) and returns the last metrics, with the final evaluation."""
  return VqaTrainer(config, workdir).train()


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates the latest checkpoint; writes and returns `workdir/eval.json`."""
  trainer = VqaTrainer(config, workdir)
  state = trainer.restore()
  result = {"step": int(state.step), **trainer.evaluate(state)[0]}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(result, f, indent=1)
  return result

