"""The training loop and sharded evaluation of any `moe_jax.tasks.Task`, driven by one config."""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_jax import models, paths, tasks
from moe_jax.checkpoints import init_from
from moe_jax.parallel import mesh as mesh_lib
from moe_jax.parallel import sharding
from moe_jax.train import checkpoint, evaluators, metrics, optim, prefetch, state as state_lib
from moe_jax.train import step as step_lib
from moe_jax.vlm import pretrained

REQUIRED = ("seed", "batch_size", "total_steps", "log_every_steps", "evals",
            "checkpoint_every_steps", "model", "data", "optimizer", "mesh")


def validate_config(config: ml_collections.ConfigDict) -> None:
  evaluators.check_replaced_fields(config)
  missing = [k for k in REQUIRED if k not in config]
  if missing:
    raise ValueError(f"config is missing {missing}; every training config needs {REQUIRED}")
  for k in ("batch_size", "total_steps", "log_every_steps"):
    if config[k] < 1:
      raise ValueError(f"config.{k}={config[k]} must be >= 1")
  if "device_prefetch" not in config.data:
    raise ValueError("config.data.device_prefetch is missing: add it to the data node (batches "
                     "copied to the devices ahead of the step, 0 = none; "
                     "moe_jax.data.default_config() has it)")


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


class Trainer:
  """Everything one run needs, built once: task, mesh, optimizer, state structure (one model
  build), checkpoints, compiled train step and the evaluators of `config.evals` (built by
  `evaluators()` before the first train step: data opened, steps compiled)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    validate_config(config)
    if config.get("init_from"):
      init_from.validate(config)
    self.config, self.workdir = config, workdir
    paths.workdir_path(workdir)  # an unsupported scheme:// fails here, before any compile
    self.task = tasks.build_task(config)
    self.task.check()
    self.mesh = build_mesh(config)
    evaluators.validate(config, self.task, self.mesh,
                        hasattr(models.MODELS.get(config.model.name), "features"))
    accum = config.optimizer.grad_accum_steps
    if accum > 1 and config.batch_size % accum == 0:
      step_lib.check_batch_size(
          self.mesh, config.batch_size // accum,
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
    self._evaluators = None  # name -> evaluator, built by `evaluators()`

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

  def evaluators(self, only: str | None = None) -> dict:
    """name -> evaluator of every `config.evals` entry, built once (what `train` does before
    step 1, so a bad eval fails before training); `only`: just that entry (built anew)."""
    if only is None and self._evaluators is not None:
      return self._evaluators
    ctx = evaluators.Context(self.task, self.mesh, self.defs, self.abstract, self.shardings, {})
    built = evaluators.build(self.config, ctx, only)
    if only is None:
      self._evaluators = built
    return built

  def train(self) -> dict:
    c = self.config
    pc, pi = jax.process_count(), jax.process_index()
    # the data first: a missing file is an error before any checkpoint is read
    iterator = prefetch.DevicePrefetch(
        self.task.train_batches(batch_size=c.batch_size // pc, seed=c.seed, process_index=pi,
                                process_count=pc),
        sharding.batch_sharding(self.mesh), c.data.device_prefetch)
    state, data_state = self.restore_or_init()
    if data_state is not None:
      iterator.set_state(data_state)
    with jax.set_mesh(self.mesh):
      train_step = step_lib.make_train_step(self.defs, self.tx, self.schedule, self.mesh,
                                            self.shardings, self.task.loss,
                                            **step_lib.options(c.optimizer),
                                            grad_reduce_dtype=c.mesh.grad_reduce_dtype)
      compiled = train_step.lower(self.abstract, self._abstract_batch(c.batch_size, False)).compile()
    flops = float((compiled.cost_analysis() or {}).get("flops", 0.0))
    self.evaluators()
    start, last = int(state.step), {}
    writer = metrics.MetricWriter(self.workdir, start)
    unchecked: list[tuple[int, jax.Array]] = []  # (step, its "train/finite") since the last check
    bar = metrics.progress_bar(start, c.total_steps)
    tick, tick_step = time.perf_counter(), start
    tracing = False
    try:
      for step in range(start + 1, c.total_steps + 1):
        batch = next(iterator)  # on the devices; the next ones are being copied
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
        for name, evaluator in self.evaluators().items():
          if evaluators.due(c.evals[name], step, c.total_steps):
            scalars, _ = evaluators.run_with_ema(evaluator, state)
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


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        only: str | None = None) -> dict[str, dict]:
  """Evaluates the latest checkpoint with every `config.evals` entry (or the one named `only`);
  writes `workdir/eval_<name>.json` per entry (its scalars and report, e.g. classification's
  routing analysis) and returns {name: that result}."""
  if not config.get("evals"):
    raise ValueError("config.evals is empty: add an entry (moe_jax.train.evaluators) to evaluate")
  if only is not None and only not in config.evals:
    raise ValueError(f"--only={only!r}: config.evals has no such entry; it has "
                     f"{list(config.evals)}")
  trainer = Trainer(config, workdir)
  state = trainer.restore_for_eval()
  results = {}
  for name, evaluator in trainer.evaluators(only).items():
    scalars, extras = evaluators.run_with_ema(evaluator, state)
    results[name] = {"step": int(state["step"]), **scalars, **evaluator.report(extras, workdir)}
    evaluators.write_result(workdir, name, results[name])
  return results
