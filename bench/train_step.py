"""Train-step time of ViMoE vs its dense twin (same width/depth), MFU against a measured matmul peak.

    python -m bench.train_step [--quick] [--config configs/vimoe_tiny_mnist.py] [--batch 128]
    python -m bench.train_step --config configs/vimoe_imagenet.py --size B/16 --batch 256 --dtype bfloat16

Every variant is the trainer's own jitted step (`moe_jax.train.step.make_train_step`, state
sharded on the config's mesh over all local devices), timed in the same interleaved rounds on a
fixed random batch: ViMoE, ViMoE without its shared expert, ViMoE with per-image routing, and
the dense ViT twin. FLOPs per step are XLA's cost analysis of the compiled step (per device;
the dropless path's loops are undercounted there); MFU = FLOPs per step per device / step time
/ peak, where the peak is the measured throughput of a large square matmul of the same dtype.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from moe_jax.commands.common import load_config


def variants(args) -> dict:
  """name -> full training config (dense twin: model.name='vit', the MoE node unused)."""
  base = load_config(args.config + (f":{args.size}" if args.size else ""))
  out = {}
  for name in ("vimoe", "no_shared", "per_image", "dense"):
    c = base.copy_and_resolve_references()
    c.batch_size = args.batch
    c.model.dtype = c.model.moe.dtype = args.dtype
    if name == "no_shared":
      c.model.moe.shared_expert.enabled = False
    elif name == "per_image":
      c.model.moe.granularity, c.model.moe.group_size = "image", 0
    elif name == "dense":
      c.model.name = "vit"
    out[name] = c
  return out


def compiled_step(config):
  """(zero-argument callable running one step on a fixed batch, the compiled step)."""
  from moe_jax import tasks
  from moe_jax.parallel import sharding
  from moe_jax.train import loop, optim, state as state_lib, step as step_lib
  task = tasks.build_task(config)
  mesh = loop.build_mesh(config)
  tx = optim.make_optimizer(config.optimizer, config.total_steps)
  state, shardings, defs = state_lib.create_state(config, tx, mesh)
  abstract = task.abstract_batch(config.batch_size, sharding.batch_sharding(mesh), eval_=False)
  rng = np.random.default_rng(0)
  batch = {k: jax.device_put(rng.integers(0, config.model.num_classes, s.shape).astype(s.dtype)
                             if k == "label" else rng.standard_normal(s.shape).astype(s.dtype),
                             s.sharding) for k, s in abstract.items()}
  with jax.set_mesh(mesh):
    step = step_lib.make_train_step(defs, tx, optim.schedule(config.optimizer, config.total_steps),
                                    mesh, shardings, task.loss,
                                    **step_lib.options(config.optimizer))
    compiled = step.lower(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                      sharding=x.sharding), state),
                          abstract).compile()
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)  # the state is donated: thread it through
    return metrics

  return run, compiled


def matmul_peak(dtype: str, n: int) -> float:
  """Measured FLOP/s of an `[n, n] @ [n, n]` matmul on one device."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  t = common.time_it(f, a, warmup=1, repeats=5)["median_s"]
  return 2 * n ** 3 / t


def main():
  p = common.parser(__doc__.splitlines()[0], "bench/out/train_step.json")
  p.add_argument("--config", default="configs/vimoe_tiny_mnist.py")
  p.add_argument("--size", default=None, help="config variant, e.g. B/16 for vimoe_imagenet")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--matmul", type=int, default=None, help="peak matmul size (default by backend)")
  args = common.parse(p)
  reps = args.reps or (3 if args.quick else 10)
  start = time.perf_counter()
  steps, flops = {}, {}
  for name, config in variants(args).items():
    steps[name], compiled = compiled_step(config)
    flops[name] = common.flops(compiled) or 0.0
  timings = common.time_interleaved(steps, reps=reps, warmup=2)
  n = args.matmul or (2048 if jax.default_backend() == "cpu" else 8192)
  peak = matmul_peak(args.dtype, n)
  records = []
  for name, timing in timings.items():
    s = timing.summary()
    records.append({"variant": name, **s, "x_dense": s["median_s"] / timings["dense"].median,
                    "flops_per_step": flops[name],
                    "mfu": flops[name] / s["median_s"] / peak if flops[name] else None})
  common.print_table(records, [("variant", "variant", ""), ("median_s", "median s", ".4f"),
                               ("q1_s", "q1", ".4f"), ("q3_s", "q3", ".4f"),
                               ("x_dense", "x dense", ".2f"),
                               ("flops_per_step", "XLA flops/step/device", ".3g"),
                               ("mfu", "MFU", ".1%")],
                     title=f"{args.config}:{args.size or ''} batch {args.batch} {args.dtype}, "
                           f"{jax.device_count()} x {jax.devices()[0].device_kind}, "
                           f"matmul peak {peak / 1e12:.3f} TFLOP/s (n={n})")
  print(f"total {time.perf_counter() - start:.0f}s", flush=True)
  common.write_json(args.out, "train_step", args, records, {"matmul_peak_flops": peak})


if __name__ == "__main__":
  main()
