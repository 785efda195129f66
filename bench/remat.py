"""Compiled memory and step time of the train step per `model.remat_policy`, small ViMoE.

    python -m bench.remat [--quick] [--batch 128] [--depth 6] [--width 192] [--patch 4]

Every policy is the trainer's own jitted step (`bench.train_step.compiled_step`, one device,
float32) of `configs/vimoe_tiny_mnist.py` resized to `--depth/--width` (MoE in the last 2
blocks, 4 experts top-2 + shared expert), patch `--patch` on 28x28 digits (T = (28/patch)^2).
`residuals` are the bytes the forward pass keeps for the backward pass (every residual that
`jax.ad_checkpoint.print_saved_residuals` lists for the model's loss, before XLA fusion; the
parameters themselves not counted): backend-independent. `temp` is XLA's scratch memory of the
compiled step (`compiled.memory_analysis()`), FLOPs XLA's cost analysis (recomputation adds to
them); step time is timed in interleaved rounds on a fixed random batch.
"""
from __future__ import annotations

import contextlib
import io
import math
import re
import time

import jax.numpy as jnp
from flax import nnx
from jax import ad_checkpoint

from bench import common
from bench.train_step import compiled_step
from moe_jax.commands.common import load_config
from moe_jax.models import build_model, remat
from moe_jax.tasks.classification import classification_loss

# 'nothing_saveable' is the same policy as 'full'.
POLICIES = [p for p in remat.POLICIES if p != "nothing_saveable"]


def config(args, policy: str):
  c = load_config("configs/vimoe_tiny_mnist.py")
  c.batch_size, c.mesh.data = args.batch, 1
  c.model.depth, c.model.width, c.model.patch_size = args.depth, args.width, args.patch
  c.model.mlp_dim = c.model.moe.hidden_dim = 4 * args.width
  c.model.num_heads = max(args.width // 64, 1)
  c.model.remat_policy = policy
  return c


def residual_bytes(c) -> int:
  """Bytes of the residuals the model's training loss keeps for its backward pass."""
  model = build_model(c.model, rngs=nnx.Rngs(0))
  model.train()
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  size = c.data.image_size
  batch = {"image": jnp.zeros((c.batch_size, size, size, c.data.channels)),
           "label": jnp.zeros((c.batch_size,), jnp.int32)}
  loss = lambda p: classification_loss(nnx.merge(graph, p, rest, copy=True), batch)[0]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    ad_checkpoint.print_saved_residuals(loss, params)
  total = 0
  for line in out.getvalue().splitlines():  # e.g. "f32[128,49,192] from ... in ..."
    m = re.match(r"\s*(bool|[a-z]+(\d+))\[([\d,]*)\]", line)
    if m and "from the argument" not in line:
      itemsize = 1 if m.group(1) == "bool" else int(m.group(2)) // 8
      total += math.prod(int(d) for d in m.group(3).split(",") if d) * itemsize
  return total


def main():
  p = common.parser(__doc__.splitlines()[0], "bench/out/remat.json")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--depth", type=int, default=6)
  p.add_argument("--width", type=int, default=192)
  p.add_argument("--patch", type=int, default=4)
  args = common.parse(p)
  reps = args.reps or (3 if args.quick else 7)
  start = time.perf_counter()
  steps, stats = {}, {}
  for policy in POLICIES:
    steps[policy], compiled = compiled_step(config(args, policy))
    mem = compiled.memory_analysis()
    stats[policy] = {"residual_bytes": residual_bytes(config(args, policy)),
                     "temp_bytes": int(mem.temp_size_in_bytes),
                     "arg_bytes": int(mem.argument_size_in_bytes),
                     "flops": common.flops(compiled)}
  timings = common.time_interleaved(steps, reps=reps, warmup=1)
  base = stats["none"]
  records = []
  for policy, timing in timings.items():
    s = stats[policy]
    records.append({"policy": policy, **s,
                    "residuals_x_none": s["residual_bytes"] / base["residual_bytes"],
                    "temp_x_none": s["temp_bytes"] / base["temp_bytes"],
                    "flops_x_none": s["flops"] / base["flops"] if s["flops"] else None,
                    **timing.summary(), "time_x_none": timing.median / timings["none"].median})
  common.print_table(records, [("policy", "model.remat_policy", ""),
                               ("residual_bytes", "residuals", "bytes"),
                               ("residuals_x_none", "x none", ".3f"),
                               ("temp_bytes", "temp", "bytes"), ("temp_x_none", "x none", ".2f"),
                               ("flops_x_none", "FLOPs x none", ".2f"),
                               ("median_s", "step s", ".4f"), ("q1_s", "q1", ".4f"),
                               ("q3_s", "q3", ".4f"), ("time_x_none", "time x none", ".2f")],
                     title=f"ViMoE depth {args.depth} width {args.width} patch {args.patch} "
                           f"batch {args.batch}, 1 x CPU, float32")
  print(f"total {time.perf_counter() - start:.0f}s", flush=True)
  common.write_json(args.out, "remat", args, records)


if __name__ == "__main__":
  main()
