"""A run's evaluations: `config.evals`, name -> entry, each built once and run every N steps.

    c.evals.val = evaluators.task_eval("classification", dataset=c.data.get_ref("name"),
                                       split="test", pp="resize|normalize", batch_size=200,
                                       every_steps=500)
    c.evals.fewshot = evaluators.fewshot_eval(dataset=c.data.get_ref("name"),
                                              train_split="train", split="test", ...)

Entry fields (all required: no hidden defaults; `validate` names `evals.<name>.<field>`):
- `type`: the task's own evaluation (its name, `config.task`: 'classification', 'vqa'),
  'fewshot' (`FewShotEvaluator`: ridge probes on frozen pre-logits features, `fewshot`) or
  'generate' (`GenerateEvaluator`: greedy answers through the KV cache, scored against the
  references; tasks with `generate_answers`, i.e. 'vqa').
- `dataset`, `split`: a tfds dataset (read from `data.data_dir`) and split (tfds syntax,
  'test[:200]'); a task evaluation's dataset must fit the model's head (`data.num_classes`).
- `pp`: a deterministic pp string (`moe_jax.data.preprocess`), ending at `data.image_size`.
- `batch_size`: global; a multiple of the mesh's batch shards. `every_steps`: run every N
  train steps (0 = only after the last step); `eval.py` runs every entry (or one: `--only`).
- fewshot only: `train_split` (where the shots come from), `shots` (list of n), `l2_regs`
  (list), `select_l2_shots` (the n at which the reported l2 is chosen), `seed` (shot sampling).
- generate only: `max_new_tokens` (greedy steps; each row stops at its `<eos>`) and
  `max_prompt_len` (text tokens of the prompt buffer: every prompt of the split must fit, and
  visual tokens + max_prompt_len + max_new_tokens must fit `model.decoder.max_len`, as the
  reference's prompt + max_new_tokens; one-line errors naming the fields otherwise).

Metrics: `<name>/<metric>` (task: `<name>/accuracy`, `<name>/loss`, ...; fewshot:
`<name>/<n>shot`, `<name>/l2_reg`; generate: `<name>/exact_match`, `<name>/normalized_match`
against one reference answer, or `<name>/vqa_accuracy` against the 10 annotators' `answers`
(`moe_jax.tasks.vqa_scoring`), and `<name>/num_examples`) in metrics.jsonl and TensorBoard;
with an EMA of the parameters (`optimizer.ema_decay > 0`) also `<name>_ema/<metric>`. `eval.py`
writes `eval_<name>.json` per entry (and a generate entry's predictions to
`predictions_<name>.json`).
"""
from __future__ import annotations

import json
import re
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict

from moe_jax import data, paths
from moe_jax.data import EvalSource
from moe_jax.parallel import sharding
from moe_jax.tasks import Task
from moe_jax.tasks.base import with_sharding
from moe_jax.train import fewshot, step as step_lib
from moe_jax.train.state import ModelDefs, TrainState

FEWSHOT = "fewshot"
GENERATE = "generate"
TASK_FIELDS = ("type", "dataset", "split", "pp", "batch_size", "every_steps")
FEWSHOT_FIELDS = TASK_FIELDS + ("train_split", "shots", "l2_regs", "select_l2_shots", "seed")
GENERATE_FIELDS = TASK_FIELDS + ("max_new_tokens", "max_prompt_len")
# The single-eval fields that `config.evals` replaced: old -> the entry field that holds it now.
REPLACED = {"eval_batch_size": "batch_size", "eval_every_steps": "every_steps",
            "data.eval_split": "split", "data.pp_eval": "pp"}


def task_eval(type_: str, *, dataset: str | config_dict.FieldReference, split: str, pp: str,
              batch_size: int, every_steps: int) -> ml_collections.ConfigDict:
  """An entry of the task's own evaluation (`type_` = the task name)."""
  return ml_collections.ConfigDict(dict(type=type_, dataset=dataset, split=split, pp=pp,
                                        batch_size=batch_size, every_steps=every_steps))


def fewshot_eval(*, dataset: str | config_dict.FieldReference, train_split: str, split: str,
                 pp: str, batch_size: int, every_steps: int,
                 shots: Sequence[int] = fewshot.DEFAULT_SHOTS,
                 l2_regs: Sequence[float] = fewshot.DEFAULT_L2_REGS, select_l2_shots: int = 10,
                 seed: int = 0) -> ml_collections.ConfigDict:
  """A few-shot linear-probe entry (big_vision's defaults: 1/5/10/25 shots, l2 in 2^-10..2^19
  chosen at 10-shot; see `moe_jax.train.fewshot`)."""
  entry = task_eval(FEWSHOT, dataset=dataset, split=split, pp=pp, batch_size=batch_size,
                    every_steps=every_steps)
  entry.update(dict(train_split=train_split, shots=tuple(shots), l2_regs=tuple(l2_regs),
                    select_l2_shots=select_l2_shots, seed=seed))
  return entry


def generate_eval(*, dataset: str | config_dict.FieldReference,
                  split: str | config_dict.FieldReference, pp: str,
                  batch_size: int | config_dict.FieldReference, every_steps: int,
                  max_new_tokens: int | config_dict.FieldReference,
                  max_prompt_len: int | config_dict.FieldReference) -> ml_collections.ConfigDict:
  """A generation entry: greedy answers of up to `max_new_tokens` tokens to the questions of
  `split`, each prompt in a buffer of `max_prompt_len` text tokens (`GenerateEvaluator`)."""
  entry = task_eval(GENERATE, dataset=dataset, split=split, pp=pp, batch_size=batch_size,
                    every_steps=every_steps)
  entry.max_new_tokens, entry.max_prompt_len = max_new_tokens, max_prompt_len
  return entry


def check_replaced_fields(config: ml_collections.ConfigDict) -> None:
  """ValueError naming the new field when `config` still sets a field `config.evals` replaced."""
  for old, new in REPLACED.items():
    node, _, key = old.rpartition(".")
    if key in (config[node] if node else config):
      raise ValueError(f"config.{old} is gone: each evaluation is an entry of config.evals "
                       f"(set config.evals.<name>.{new}; see moe_jax.train.evaluators)")


def source(name: str, entry: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict,
           train: bool = False) -> EvalSource:
  """What entry `name` reads: its `split`, or its few-shot `train_split` (`train=True`)."""
  return EvalSource(entry.dataset, entry.train_split if train else entry.split, entry.pp,
                    f"evals.{name}", None if entry.type == FEWSHOT else data_config.num_classes,
                    "train_split" if train else "split")


def _field(name: str, key: str) -> str:
  return f"evals.{name}.{key}"


def _check_numbers(name: str, entry: ml_collections.ConfigDict) -> None:
  if not isinstance(entry.every_steps, int) or entry.every_steps < 0:
    raise ValueError(f"{_field(name, 'every_steps')}={entry.every_steps!r} must be an integer "
                     ">= 0 (0 = only after the last step)")
  for key in ("max_new_tokens", "max_prompt_len") if entry.type == GENERATE else ():
    if not isinstance(entry[key], int) or entry[key] < 1:
      raise ValueError(f"{_field(name, key)}={entry[key]!r} must be an integer >= 1")
  if entry.type != FEWSHOT:
    return
  shots, l2 = tuple(entry.shots), tuple(entry.l2_regs)
  if not shots or any(not isinstance(n, int) or n < 1 for n in shots) or len(set(shots)) < len(
      shots):
    raise ValueError(f"{_field(name, 'shots')}={shots!r} must be distinct integers >= 1, e.g. "
                     f"(1, 5, 10, 25)")
  if not l2 or any(not isinstance(v, (int, float)) or v <= 0 for v in l2):
    raise ValueError(f"{_field(name, 'l2_regs')}={l2!r} must be a non-empty list of numbers > 0")
  if entry.select_l2_shots not in shots:
    raise ValueError(f"{_field(name, 'select_l2_shots')}={entry.select_l2_shots!r} must be one "
                     f"of {_field(name, 'shots')}={shots}")


def validate(config: ml_collections.ConfigDict, task: Task, mesh: jax.sharding.Mesh,
             model_has_features: bool) -> None:
  """One-line ValueError naming `evals.<name>.<field>` for any entry the run cannot evaluate:
  unknown or missing fields, unknown type, dataset or split, bad pp string, batch size that
  does not split over the mesh, bad numbers. Opens dataset metadata, reads no example."""
  for name, entry in config.evals.items():
    if not re.fullmatch(r"[A-Za-z0-9_]+", name) or name == "train" or name.endswith("_ema"):
      raise ValueError(f"evals.{name}: names are letters, digits and _ (used in metric keys and "
                       f"eval_<name>.json), not 'train' and not ending in _ema")
    if not isinstance(entry, ml_collections.ConfigDict) or "type" not in entry:
      raise ValueError(f"evals.{name} must be an entry with a type "
                       f"(evaluators.task_eval, fewshot_eval or generate_eval)")
    types = (task.name, FEWSHOT) + ((GENERATE,) if hasattr(task, "generate_answers") else ())
    if entry.type not in types:
      raise ValueError(f"{_field(name, 'type')}={entry.type!r}: unknown; use one of {types}")
    fields = {FEWSHOT: FEWSHOT_FIELDS, GENERATE: GENERATE_FIELDS}.get(entry.type, TASK_FIELDS)
    missing, unknown = [f for f in fields if f not in entry], sorted(set(entry) - set(fields))
    if missing or unknown:
      raise ValueError(f"evals.{name} ({entry.type}): missing fields {missing}, unknown fields "
                       f"{unknown}; its fields are {list(fields)}")
    _check_numbers(name, entry)
    step_lib.check_batch_size(mesh, entry.batch_size, _field(name, "batch_size"))
    if entry.type == FEWSHOT:
      if not model_has_features:
        raise ValueError(f"{_field(name, 'type')}='fewshot' needs a model with pre-logits "
                         f"features (model.name vit, vimoe or convnext), not "
                         f"{config.model.name!r}")
      for train in (True, False):
        data.pipeline.check_eval_source(config.data, source(name, entry, config.data, train))
    else:
      task.check_eval(source(name, entry, config.data))


def due(entry: ml_collections.ConfigDict, step: int, total_steps: int) -> bool:
  """Whether the entry runs after train step `step` (every `every_steps`, and the last step)."""
  return step == total_steps or bool(entry.every_steps and step % entry.every_steps == 0)


class Context(NamedTuple):
  """What every evaluator needs of the trainer: the task, the mesh, the model's structure, the
  state's abstract values (shapes + shardings) and shardings, and `compiled`: steps compiled
  so far, by (kind, batch size), shared by the evaluators of one `build`."""
  task: Task
  mesh: jax.sharding.Mesh
  defs: ModelDefs
  abstract: TrainState
  shardings: TrainState
  compiled: dict

  def compile_once(self, kind: str, batch_size: int, make_step, abstract_batch):
    """`make_step(defs, mesh, shardings)` lowered for (params, rest, `abstract_batch`) and
    compiled, once per (kind, batch size)."""
    key = (kind, batch_size)
    if key not in self.compiled:
      with jax.set_mesh(self.mesh):
        self.compiled[key] = make_step(self.defs, self.mesh, self.shardings).lower(
            self.abstract.params, self.abstract.rest, abstract_batch).compile()
    return self.compiled[key]


def _this_process(batch_size: int) -> dict[str, int]:
  """The keywords of this process's share of a global batch of `batch_size`."""
  pc = jax.process_count()
  return dict(batch_size=batch_size // pc, process_index=jax.process_index(), process_count=pc)


def _batches(ctx: Context, src: EvalSource, batch_size: int, own_data: bool):
  """This process's batches of `src` (`own_data`: through the task's input pipeline, else the
  image pipeline `moe_jax.data`)."""
  kwargs = _this_process(batch_size)
  if own_data:
    return ctx.task.eval_batches(src, **kwargs)
  return data.eval_dataset(ctx.task.config.data, src, **kwargs)


def _task_data_and_step(name: str, entry: ml_collections.ConfigDict, ctx: Context, kind: str,
                        fn) -> tuple:
  """(this process's batches of the entry's split through the task's input pipeline,
  `fn(model, batch)` of the eval-mode model compiled for the entry's batch size: once per
  `kind`, `moe_jax.train.step.make_eval_step`)."""
  batches = _batches(ctx, source(name, entry, ctx.task.config.data), entry.batch_size,
                     own_data=True)
  abstract_batch = ctx.task.abstract_batch(entry.batch_size, sharding.batch_sharding(ctx.mesh),
                                           True)
  step = ctx.compile_once(
      kind, entry.batch_size,
      lambda defs, mesh, shardings: step_lib.make_eval_step(defs, mesh, shardings, fn),
      abstract_batch)
  return batches, step


class TaskEvaluator:
  """The task's own evaluation (`Task.eval_sums` summed over the split, `Task.eval_results`):
  data opened and the step compiled at construction."""

  def __init__(self, name: str, entry: ml_collections.ConfigDict, ctx: Context):
    self.name, self.entry, self.ctx = name, entry, ctx
    self.batches, self.step = _task_data_and_step(name, entry, ctx, "task", ctx.task.eval_sums)

  def run(self, params, rest) -> tuple[dict[str, float], dict]:
    """(`<name>/...` scalars, the task's extras, e.g. routing statistics)."""
    totals = None
    with jax.set_mesh(self.ctx.mesh):
      for local in self.batches:
        # summed on the host: no eager XLA op per batch on the sharded outputs
        out = jax.device_get(self.step(params, rest, step_lib.global_batch(local, self.ctx.mesh)))
        totals = out if totals is None else jax.tree.map(np.add, totals, out)
    scalars, extras = self.ctx.task.eval_results(totals)
    return {f"{self.name}/" + k.removeprefix("eval/"): v for k, v in scalars.items()}, extras

  def report(self, extras: dict, workdir: str) -> dict:
    """The task's report (e.g. routing), its plots in `workdir/analysis/<name>`."""
    return self.ctx.task.report(extras, str(paths.workdir_path(workdir) / "analysis" / self.name))


class GenerateEvaluator:
  """Greedy answers (`Task.generate_answers`: KV-cached generation from each row's prompt, up to
  `max_new_tokens`, stopping at `<eos>`) to the questions of `split`, asked as the reference's
  eval asks them (`Task.generate_batches`: the prompt only, in a buffer of `max_prompt_len` text
  tokens, so that visual + max_prompt_len + max_new_tokens positions fit
  `model.decoder.max_len`), scored on the host against the reference answers
  (`Task.answer_records`). Reports the mean of each of the task's scores
  (`Task.answer_metrics`: `<name>/exact_match` and `<name>/normalized_match`, or, against the
  annotators' answers, `<name>/vqa_accuracy`) and `<name>/num_examples`; `report` writes the
  predictions."""

  def __init__(self, name: str, entry: ml_collections.ConfigDict, ctx: Context):
    self.name, self.entry, self.ctx = name, entry, ctx
    self.source = source(name, entry, ctx.task.config.data)
    steps, length = entry.max_new_tokens, entry.max_prompt_len
    self.batches = ctx.task.generate_batches(
        self.source, max_prompt_len=length, field=_field(name, "max_prompt_len"),
        **_this_process(entry.batch_size))
    self.metrics = ctx.task.answer_metrics(self.source)
    generate = lambda model, batch: ctx.task.generate_answers(model, batch, steps,
                                                              f"evals.{name}")
    abstract_batch = with_sharding(ctx.task.generate_batch_shapes(entry.batch_size, length),
                                   sharding.batch_sharding(ctx.mesh))
    self.step = ctx.compile_once(
        f"generate_{length}_{steps}", entry.batch_size,
        lambda defs, mesh, shardings: step_lib.make_eval_step(defs, mesh, shardings, generate),
        abstract_batch)

  def run(self, params, rest) -> tuple[dict[str, float], dict]:
    """(`<name>/...` scalars, {"predictions": one record per real example})."""
    records = []
    with jax.set_mesh(self.ctx.mesh):
      for local in self.batches:
        generated = jax.device_get(self.step(params, rest,
                                             step_lib.global_batch(local, self.ctx.mesh)))
        records += self.ctx.task.answer_records(local, _local_rows(generated), self.source)
    n = len(records)
    scalars = {f"{self.name}/{k}": sum(r[k] for r in records) / max(n, 1) for k in self.metrics}
    scalars[f"{self.name}/num_examples"] = float(n)
    return scalars, {"predictions": records}

  def report(self, extras: dict, workdir: str) -> dict:
    """Writes `workdir/predictions_<name>.json` (process 0); returns its file name."""
    filename = f"predictions_{self.name}.json"
    if jax.process_index() == 0:
      (paths.workdir_path(workdir) / filename).write_text(
          json.dumps(extras["predictions"], indent=1))
    return {"predictions": filename}


def _local_rows(generated: np.ndarray) -> np.ndarray:
  """This process's rows of a replicated global `[B, ...]` output (processes hold consecutive
  blocks of the global batch, `moe_jax.train.step.global_batch`)."""
  per_process = generated.shape[0] // jax.process_count()
  return generated[jax.process_index() * per_process:][:per_process]


class FewShotEvaluator:
  """Ridge-regression probes (`moe_jax.train.fewshot`) on the frozen pre-logits features of
  `train_split` (the shots) and `split` (the test): features from a jitted, mesh-sharded step,
  the solve on the host in float64. Reports `<name>/<n>shot` at the l2 best at
  `select_l2_shots` and that `<name>/l2_reg`."""

  def __init__(self, name: str, entry: ml_collections.ConfigDict, ctx: Context):
    self.name, self.entry, self.ctx = name, entry, ctx
    config = ctx.task.config.data
    self.train_batches = _batches(ctx, source(name, entry, config, train=True),
                                  entry.batch_size, own_data=False)
    self.test_batches = _batches(ctx, source(name, entry, config), entry.batch_size,
                                 own_data=False)
    self.num_classes = data.prepared_builder(entry.dataset, config.data_dir).info.features[
        "label"].num_classes
    batch_sharding = sharding.batch_sharding(ctx.mesh)
    B, S = entry.batch_size, config.image_size
    abstract_batch = {
        "image": jax.ShapeDtypeStruct((B, S, S, config.channels), jnp.float32,
                                      sharding=batch_sharding),
        "label": jax.ShapeDtypeStruct((B,), jnp.int32, sharding=batch_sharding),
        "mask": jax.ShapeDtypeStruct((B,), jnp.float32, sharding=batch_sharding)}
    self.step = ctx.compile_once("features", B, step_lib.make_features_step, abstract_batch)

  def features(self, params, rest, batches) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 `[N, D]`, labels `[N]`) of the real examples of `batches`."""
    feats, labels = [], []
    with jax.set_mesh(self.ctx.mesh):
      for local in batches:
        local = {k: local[k] for k in ("image", "label", "mask")}
        f, y, m = jax.device_get(self.step(params, rest,
                                           step_lib.global_batch(local, self.ctx.mesh)))
        real = np.asarray(m) > 0
        feats.append(np.asarray(f)[real])
        labels.append(np.asarray(y)[real])
    return np.concatenate(feats), np.concatenate(labels)

  def run(self, params, rest) -> tuple[dict[str, float], dict]:
    e = self.entry
    train_x, train_y = self.features(params, rest, self.train_batches)
    test_x, test_y = self.features(params, rest, self.test_batches)
    results = fewshot.fewshot_accuracies(train_x, train_y, test_x, test_y, self.num_classes,
                                         tuple(e.shots), tuple(e.l2_regs), e.seed,
                                         field=f"evals.{self.name}.shots")
    l2 = fewshot.select_l2(results, e.select_l2_shots)
    scalars = {f"{self.name}/{n}shot": results[n][l2] for n in e.shots}
    scalars[f"{self.name}/l2_reg"] = float(l2)
    return scalars, {}

  def report(self, extras: dict, workdir: str) -> dict:
    del extras, workdir
    return {}


Evaluator = TaskEvaluator | FewShotEvaluator | GenerateEvaluator


def build(config: ml_collections.ConfigDict, ctx: Context,
          only: str | None = None) -> dict[str, Evaluator]:
  """Every entry of `config.evals` (or only the one named `only`, which must be one) built:
  data opened and steps compiled, so that a bad entry fails before training."""
  kinds = {FEWSHOT: FewShotEvaluator, GENERATE: GenerateEvaluator}
  return {name: kinds.get(entry.type, TaskEvaluator)(name, entry, ctx)
          for name, entry in config.evals.items() if only in (None, name)}


def run_with_ema(evaluator: Evaluator, state) -> tuple[dict, dict]:
  """`evaluator.run` on `state`'s parameters (a TrainState, or a dict of its `params`, `rest`
  and `ema`), plus, when it has an EMA, the EMA parameters' scalars as `<name>_ema/...` (the
  extras are those of the raw parameters)."""
  get = state.get if isinstance(state, dict) else lambda k: getattr(state, k)
  scalars, extras = evaluator.run(get("params"), get("rest"))
  if get("ema") is not None:
    ema_scalars, _ = evaluator.run(get("ema"), get("rest"))
    prefix = f"{evaluator.name}/"
    scalars.update({f"{evaluator.name}_ema/" + k.removeprefix(prefix): v
                    for k, v in ema_scalars.items()})
  return scalars, extras


def write_result(workdir: str, name: str, result: dict) -> None:
  """`workdir/eval_<name>.json` (process 0 only)."""
  if jax.process_index() == 0:
    (paths.workdir_path(workdir) / f"eval_{name}.json").write_text(json.dumps(result, indent=1))
