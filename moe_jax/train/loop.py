"""The training loop and sharded evaluation of any `moe_jax.tasks.Task`, driven by one config."""
from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_jax import paths, tasks
from moe_jax.checkpoints import init_from
from moe_jax.parallel import mesh as mesh_lib
from moe_jax.parallel import distributed, sharding
from moe_jax.train import checkpoint, metrics, optim, state as state_lib, step as step_lib
from moe_jax.vlm import pretrained

REQUIRED = ("seed", "batch_size", "total_steps", "log_every_steps", "eval_every_steps",
            "checkpoint_every_steps", "model", "data", "optimizer", "mesh")


def validate_config(config: ml_collections.ConfigDict) -> None:
  missing = [k for k in REQUIRED if k not in config]
  if missing:
    raise ValueError(f"config is missing {missing}; every training config needs {REQUIRED}")
  for k in ("batch_size", "total_steps", "log_every_steps"):
    if config[k] < 1:
      raise ValueError(f"config.{k}={config[k]} must be >= 1")


def num_experts(config: ml_collections.ConfigDict) -> int | None:
  """The number the mesh's `expert` axis must divide: the experts of the model's MoE layers
  (`model.moe`; MoCHA's `model.connector` and MoE decoder layers: their gcd), None without any."""
  m = config.model
  counts = [m.moe.num_experts] if "moe" in m else []
  if "connector" in m:
    counts.append(m.connector.num_experts)
  if "decoder" in m and m.decoder.get("moe_layers"):
    counts.append(m.decoder.moe.num_experts)
  return math.gcd(*counts) if counts else None


def build_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  return mesh_lib.build_mesh(config.mesh, num_experts=num_experts(config),
                             global_batch=config.batch_size)


def _global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's part of the batch -> global arrays sharded over the batch axes."""
  return distributed.global_batch(local, sharding.batch_sharding(mesh))


def check_batch_size(mesh: jax.sharding.Mesh, size: int, field: str) -> None:
  """ValueError naming `field` unless a global batch of `size` splits over the mesh's batch
  axes and the processes."""
  axes = sharding.batch_sharding(mesh).spec[0]
  shards = math.prod(mesh.shape[a] for a in axes)
  if size < 1 or size % shards or size % jax.process_count():
    raise ValueError(f"{field}={size} must be a positive multiple of the {shards} batch shards "
                     f"(mesh axes {'*'.join(axes)} = {'*'.join(str(mesh.shape[a]) for a in axes)})"
                     f" and of the {jax.process_count()} processes")


class Trainer:
  """Everything one run needs, built once: task, mesh, optimizer, state structure (one model
  build), checkpoints, compiled train step and (at the first evaluation) eval step + eval data."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    validate_config(config)
    if config.get("init_from"):
      init_from.validate(config)
    self.config, self.workdir = config, workdir
    paths.workdir_path(workdir)  # an unsupported scheme:// fails here, before any compile
    self.task = tasks.build_task(config)
    self.task.check()
    self.mesh = build_mesh(config)
    self.eval_batch_size = config.get("eval_batch_size", config.batch_size)
    check_batch_size(self.mesh, self.eval_batch_size, "eval_batch_size")
    accum = config.optimizer.grad_accum_steps
    if accum > 1 and config.batch_size % accum == 0:
      check_batch_size(self.mesh, config.batch_size // accum,
                       f"batch_size/optimizer.grad_accum_steps ({config.batch_size}/{accum})")
    elif accum > 1:
      raise ValueError(f"batch_size={config.batch_size} must be a multiple of "
                       f"optimizer.grad_accum_steps={accum}")
    self.profile_steps = profile_window(config)
    self.tx = optim.make_optimizer(config.optimizer, config.total_steps)
    self.schedule = optim.schedule(config.optimizer, config.total_steps)
    check_writable(workdir)
    self.init = state_lib.StateInit(config, self.tx, self.mesh)
    self.abstract, self.shardings, self.defs = self.init.abstract, self.init.shardings, self.init.defs
    self.ckpt = checkpoint.manager(workdir)
    self._evaluator = None  # (compiled eval step, eval batches), built by `evaluator()`

  def restore_or_init(self):
    """(state, data-iterator state or None): the latest checkpoint, else a fresh state
    (initialised by `config.init_from` when that names a source; MoCHA's encoders and decoder
    from their checkpoints)."""
    restored = checkpoint.restore(self.ckpt, self.abstract)
    if restored is not None:
      return restored
    state = self.init.create()
    if self.config.get("init_from") and self.config.init_from.kind:
      state = init_from.apply(state, self.config, self.tx, self.shardings)
    elif self.config.model.get("name") == "mocha":  # (a next stage has them from its source)
      params = pretrained.with_checkpoints(state.params, self.config.model)
      state = state.replace(params=jax.device_put(params, self.shardings.params))
    else:
      return state, None
    if self.shardings.ema is not None:  # the average starts at the imported weights
      state = state.replace(ema=jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                                        out_shardings=self.shardings.ema)(state.params))
    return state, None

  def restore_for_eval(self) -> dict:
    """The latest good checkpoint's `checkpoint.EVAL_FIELDS` (no optimizer state, so the
    optimizer flags need not match); CheckpointError naming the fix when there is none."""
    restored = checkpoint.restore(self.ckpt, checkpoint.eval_abstract(self.abstract))
    if restored is None:
      raise checkpoint.CheckpointError(
          f"no checkpoint in {self.ckpt.directory}; train first (python train.py --config ... "
          f"--workdir {self.workdir}) or point --workdir at a finished run")
    return restored[0]

  def _abstract_batch(self, batch_size: int, eval_: bool):
    return self.task.abstract_batch(batch_size, sharding.batch_sharding(self.mesh), eval_)

  def evaluator(self):
    """(compiled eval step, eval batches), built once: the eval data opened and the step
    compiled (what `train` does before step 1, so a bad eval split fails before training)."""
    if self._evaluator is None:
      self._evaluator = self._build_evaluator()
    return self._evaluator

  def _build_evaluator(self):
    pc, pi = jax.process_count(), jax.process_index()
    batches = self.task.eval_batches(batch_size=self.eval_batch_size // pc, process_index=pi,
                                     process_count=pc)
    with jax.set_mesh(self.mesh):
      eval_step = step_lib.make_eval_step(self.defs, self.mesh, self.shardings,
                                          self.task.eval_sums)
      compiled = eval_step.lower(self.abstract.params, self.abstract.rest,
                                 self._abstract_batch(self.eval_batch_size, True)).compile()
    return compiled, batches

  def evaluate_with_ema(self, state) -> tuple[dict, dict]:
    """`evaluate(state)`, plus when `state` has an EMA (optimizer.ema_decay > 0) the EMA
    parameters' scalars as `eval_ema/...` (the extras are those of the raw parameters)."""
    scalars, extras = self.evaluate(state)
    ema = state.get("ema") if isinstance(state, dict) else state.ema
    if ema is not None:
      rest = state["rest"] if isinstance(state, dict) else state.rest
      ema_scalars, _ = self.evaluate({"params": ema, "rest": rest})
      scalars.update({"eval_ema/" + k.removeprefix("eval/"): v for k, v in ema_scalars.items()})
    return scalars, extras

  def evaluate(self, state) -> tuple[dict, dict]:
    """Sharded evaluation on the eval split of `state` (a TrainState, or a dict with its
    `params` and `rest`): the task's (`eval/...` scalars, extras)."""
    params, rest = (state["params"], state["rest"]) if isinstance(state, dict) else (
        state.params, state.rest)
    eval_step, batches = self.evaluator()
    totals = None
    with jax.set_mesh(self.mesh):
      for local in batches:
        out = eval_step(params, rest, _global_batch(local, self.mesh))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    return self.task.eval_results(jax.device_get(totals))

  def train(self) -> dict:
    c = self.config
    pc, pi = jax.process_count(), jax.process_index()
    # the data first: a missing file is an error before any checkpoint is read
    iterator = self.task.train_batches(batch_size=c.batch_size // pc, seed=c.seed,
                                       process_index=pi, process_count=pc)
    state, data_state = self.restore_or_init()
    if data_state is not None:
      iterator.set_state(data_state)
    with jax.set_mesh(self.mesh):
      train_step = step_lib.make_train_step(self.defs, self.tx, self.schedule, self.mesh,
                                            self.shardings, self.task.loss,
                                            **step_lib.options(c.optimizer))
      compiled = train_step.lower(self.abstract, self._abstract_batch(c.batch_size, False)).compile()
    flops = float((compiled.cost_analysis() or {}).get("flops", 0.0))
    self.evaluator()
    start, last = int(state.step), {}
    writer = metrics.MetricWriter(self.workdir, start)
    unchecked: list[tuple[int, jax.Array]] = []  # (step, its "train/finite") since the last check
    bar = metrics.progress_bar(start, c.total_steps)
    tick, tick_step = time.perf_counter(), start
    tracing = False
    try:
      for step in range(start + 1, c.total_steps + 1):
        batch = _global_batch(next(iterator), self.mesh)
        if self.profile_steps and step == self.profile_steps[0]:
          jax.block_until_ready(state)  # the trace holds these steps only
          jax.profiler.start_trace(profile_dir(self.workdir))
          tracing = True
        state, step_metrics = compiled(state, batch)
        if tracing and step == self.profile_steps[-1]:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
          tracing = False
        unchecked.append((step, step_metrics["train/finite"]))
        bar.update(1)
        is_last = step == c.total_steps
        if step % c.log_every_steps == 0 or is_last:
          _check_finite(unchecked, self.ckpt)
          last = {k: float(np.asarray(v)) for k, v in jax.device_get(step_metrics).items()}
          seconds = time.perf_counter() - tick
          rate = (step - tick_step) / max(seconds, 1e-9)
          last.update({"train/steps_per_sec": rate, "train/examples_per_sec": rate * c.batch_size,
                       "train/gflops_per_sec": rate * flops / 1e9})
          writer.write(step, last)
          bar.set_postfix(loss=f"{last['train/loss']:.4f}")
          tick, tick_step = time.perf_counter(), step
        if (c.eval_every_steps and step % c.eval_every_steps == 0) or is_last:
          scalars, _ = self.evaluate_with_ema(state)
          writer.write(step, scalars)
          last.update(scalars)
          if jax.process_index() == 0:
            bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in scalars.items()))
        if (c.checkpoint_every_steps and step % c.checkpoint_every_steps == 0) or is_last:
          _check_finite(unchecked, self.ckpt)
          checkpoint.save(self.ckpt, state, iterator.get_state(), c)
      self.ckpt.wait_until_finished()
    finally:
      if tracing:
        jax.profiler.stop_trace()
      bar.close()
      writer.close()
    return last


def profile_window(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The steps of `config.profile_steps` ("10,11": consecutive steps whose `jax.profiler` trace
  goes to `profile_dir(workdir)`; optional, "" or absent = none), ValueError when malformed."""
  spec = config.get("profile_steps", "")
  try:
    steps = tuple(int(s) for s in spec.split(",")) if spec.strip() else ()
  except ValueError:
    steps = None
  if steps is not None and (not steps or (
      steps == tuple(range(steps[0], steps[0] + len(steps))) and 1 <= steps[0]
      and steps[-1] <= config.total_steps)):
    return steps
  raise ValueError(f"profile_steps={spec!r} must be consecutive steps in [1, total_steps="
                   f"{config.total_steps}] separated by commas, e.g. '10,11' ('' = no trace)")


def profile_dir(workdir: str) -> str:
  """Where the profiler trace goes (TensorBoard's profile plugin layout below it)."""
  return str(paths.workdir_path(workdir) / "profile")


def check_writable(workdir: str) -> None:
  """ValueError naming the fix unless `workdir` can be created and written."""
  folder = paths.workdir_path(workdir)
  probe = folder / f".writable.{jax.process_index()}"
  try:
    folder.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"--workdir {workdir} is not writable ({e.strerror or e}); pass a folder "
                     "you can write") from None


def _check_finite(unchecked: list[tuple[int, jax.Array]], ckpt) -> None:
  """Empties `unchecked`; FloatingPointError naming the first step whose loss, gradient norm or
  updated state was not finite (no state from it on is saved; saved checkpoints are kept)."""
  flags = jax.device_get([flag for _, flag in unchecked])
  bad = [step for (step, _), flag in zip(unchecked, flags) if not flag]
  unchecked.clear()
  if bad:
    ckpt.wait_until_finished()
    raise FloatingPointError(
        f"the loss, gradient norm or updated state is nan/inf at step {bad[0]}; stopped without "
        f"saving a state from it on (last good checkpoint: step {ckpt.latest_step()} in "
        f"{ckpt.directory}); lower optimizer.learning_rate or set optimizer.grad_clip_norm, "
        "then rerun to resume")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir`) and returns the last metrics."""
  return Trainer(config, workdir).train()


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates the latest checkpoint; writes and returns `workdir/eval.json` (the task's
  scalars and report, e.g. classification's routing analysis)."""
  trainer = Trainer(config, workdir)
  state = trainer.restore_for_eval()
  scalars, extras = trainer.evaluate_with_ema(state)
  result = {"step": int(state["step"]), **scalars, **trainer.task.report(extras, workdir)}
  if jax.process_index() == 0:
    (paths.workdir_path(workdir) / "eval.json").write_text(json.dumps(result, indent=1))
  return result
