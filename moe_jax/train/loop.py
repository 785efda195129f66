"""The training loop and sharded evaluation, driven by one config."""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_jax import analysis, data
from moe_jax.analysis import plots
from moe_jax.parallel import mesh as mesh_lib
from moe_jax.parallel import distributed, sharding
from moe_jax.train import checkpoint, metrics, optim, state as state_lib, step as step_lib

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
  return config.model.moe.num_experts if "moe" in config.model else None


def build_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  return mesh_lib.build_mesh(config.mesh, num_experts=num_experts(config),
                             global_batch=config.batch_size)


def _global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's part of the batch -> global arrays sharded over the batch axes."""
  return distributed.global_batch(local, sharding.batch_sharding(mesh))


def sum_eval_batches(eval_step: Callable, state, dataset, mesh: jax.sharding.Mesh):
  """`eval_step(state, batch)` summed over every batch of `dataset`, fetched to the host once."""
  totals = None
  for local in dataset:
    out = eval_step(state, _global_batch(local, mesh))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  return jax.device_get(totals)


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, eval_: bool):
  """The global batch as `jax.ShapeDtypeStruct`s sharded over the batch axes (for lowering)."""
  size, s = config.data.image_size, sharding.batch_sharding(mesh)
  B = config.get("eval_batch_size", config.batch_size) if eval_ else config.batch_size
  channels = config.model.channels
  batch = {"image": jax.ShapeDtypeStruct((B, size, size, channels), jnp.float32, sharding=s),
           "label": jax.ShapeDtypeStruct((B,), jnp.int32, sharding=s)}
  if eval_:
    batch["mask"] = jax.ShapeDtypeStruct((B,), jnp.float32, sharding=s)
  return batch


def evaluate(config, state, defs, mesh, shardings) -> tuple[dict, dict]:
  """Sharded evaluation on the eval split: (`eval/...` scalars, per-MoE-layer routing:
  `{layer: {"metrics": averages, "class_expert": [classes, E]}}`)."""
  B = config.get("eval_batch_size", config.batch_size)
  mesh_lib.build_mesh(config.mesh, num_experts=num_experts(config), global_batch=B)
  pc, pi = jax.process_count(), jax.process_index()
  ds = data.eval_dataset(config.data, batch_size=B // pc, process_index=pi, process_count=pc)
  with jax.set_mesh(mesh):
    eval_step = step_lib.make_eval_step(defs, mesh, shardings, config.model.num_classes)
    sums, routing = sum_eval_batches(eval_step, state, ds, mesh)
  n = float(sums["count"])
  scalars = {"eval/loss": float(sums["loss"]) / n, "eval/accuracy": float(sums["top1"]) / n,
             "eval/top5_accuracy": float(sums["top5"]) / n, "eval/num_examples": n}
  routing = {layer: {"metrics": {k: np.asarray(v) / n for k, v in r["metrics"].items()},
                     "class_expert": np.asarray(r["class_expert"])}
             for layer, r in routing.items()}
  return scalars, routing


def routing_report(routing: dict, workdir: str | None = None) -> dict:
  """The routing analysis of an evaluation (and its PNG plots under `workdir/analysis`)."""
  report = analysis.layer_report({k: r["class_expert"] for k, r in routing.items()},
                                 {k: r["metrics"] for k, r in routing.items()})
  if workdir is not None and routing and jax.process_index() == 0:
    report["plots"] = plots.plot_report(report, os.path.join(workdir, "analysis"))
  return report


class Trainer:
  """Everything one run needs: mesh, data, optimizer, state, compiled steps, checkpoints."""

  # Task hooks (classification); moe_jax/vlm/train.py's VqaTrainer replaces them for MoCHA.
  train_dataset = staticmethod(data.train_dataset)
  abstract_batch = staticmethod(abstract_batch)
  make_train_step = staticmethod(step_lib.make_train_step)

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    validate_config(config)
    self.config, self.workdir = config, workdir
    self.mesh = build_mesh(config)
    self.tx = optim.make_optimizer(config.optimizer, config.total_steps)
    self.schedule = optim.schedule(config.optimizer, config.total_steps)
    self.abstract, self.shardings, self.defs = state_lib.abstract_state(config, self.tx, self.mesh)
    self.ckpt = checkpoint.manager(workdir)

  def restore_or_init(self):
    """(state, data-iterator state or None): the latest checkpoint, else a fresh state."""
    restored = checkpoint.restore(self.ckpt, self.abstract)
    if restored is not None:
      return restored
    return state_lib.create_state(self.config, self.tx, self.mesh)[0], None

  def restore(self):
    """The latest checkpoint's state; CheckpointError naming the fix when there is none."""
    restored = checkpoint.restore(self.ckpt, self.abstract)
    if restored is None:
      raise checkpoint.CheckpointError(
          f"no checkpoint in {self.ckpt.directory}; train first (python train.py --config ... "
          f"--workdir {self.workdir}) or point --workdir at a finished run")
    return restored[0]

  def evaluate(self, state) -> tuple[dict, dict]:
    return evaluate(self.config, state, self.defs, self.mesh, self.shardings)

  def train(self) -> dict:
    c = self.config
    state, data_state = self.restore_or_init()
    pc, pi = jax.process_count(), jax.process_index()
    iterator = iter(self.train_dataset(c.data, batch_size=c.batch_size // pc, seed=c.seed,
                                       process_index=pi, process_count=pc))
    if data_state is not None:
      iterator.set_state(data_state)
    with jax.set_mesh(self.mesh):
      train_step = self.make_train_step(self.defs, self.tx, self.schedule, self.mesh,
                                        self.shardings)
      compiled = train_step.lower(self.abstract, self.abstract_batch(c, self.mesh, False)).compile()
    flops = float((compiled.cost_analysis() or {}).get("flops", 0.0))
    writer = metrics.MetricWriter(self.workdir)
    start, last = int(state.step), {}
    bar = metrics.progress_bar(start, c.total_steps)
    tick, tick_step = time.perf_counter(), start
    try:
      for step in range(start + 1, c.total_steps + 1):
        batch = _global_batch(next(iterator), self.mesh)
        state, step_metrics = compiled(state, batch)
        bar.update(1)
        is_last = step == c.total_steps
        if step % c.log_every_steps == 0 or is_last:
          last = _checked(jax.device_get(step_metrics), step, self.ckpt)
          seconds = time.perf_counter() - tick
          rate = (step - tick_step) / max(seconds, 1e-9)
          last.update({"train/steps_per_sec": rate, "train/examples_per_sec": rate * c.batch_size,
                       "train/gflops_per_sec": rate * flops / 1e9})
          writer.write(step, last)
          bar.set_postfix(loss=f"{last['train/loss']:.4f}")
          tick, tick_step = time.perf_counter(), step
        if (c.eval_every_steps and step % c.eval_every_steps == 0) or is_last:
          scalars, _ = self.evaluate(state)
          writer.write(step, scalars)
          last.update(scalars)
          if jax.process_index() == 0:
            bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in scalars.items()))
        if (c.checkpoint_every_steps and step % c.checkpoint_every_steps == 0) or is_last:
          _checked(jax.device_get(step_metrics), step, self.ckpt)
          checkpoint.save(self.ckpt, state, iterator.get_state(), c)
      self.ckpt.wait_until_finished()
    finally:
      bar.close()
      writer.close()
    return last


def _checked(step_metrics: dict, step: int, ckpt) -> dict:
  """The metrics as floats; FloatingPointError (keeping saved checkpoints) on a NaN/inf loss."""
  out = {k: float(np.asarray(v)) for k, v in step_metrics.items()}
  if not np.isfinite(out["train/loss"]):
    ckpt.wait_until_finished()
    raise FloatingPointError(
        f"training loss is {out['train/loss']} at step {step}; stopped without saving this "
        f"state (last good checkpoint: step {ckpt.latest_step()} in {ckpt.directory}); lower "
        "optimizer.learning_rate or set optimizer.grad_clip_norm, then rerun to resume")
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir`) and returns the last metrics."""
  return Trainer(config, workdir).train()


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates the latest checkpoint; writes and returns `workdir/eval.json`."""
  trainer = Trainer(config, workdir)
  state = trainer.restore()
  scalars, routing = trainer.evaluate(state)
  result = {"step": int(state.step), **scalars, "routing": routing_report(routing, workdir)}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(result, f, indent=1)
  return result
