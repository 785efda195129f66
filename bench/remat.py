"""Compiled memory and step time of the train step per `model.remat_policy`, small ViMoE.

    python -m bench.remat [--quick] [--batch 128] [--depth 6] [--width 192] [--patch 4]

Every policy is the trainer's own jitted step (`bench.train_step.compiled_step`, one device,
float32) of `configs/vimoe_tiny_mnist.py` resized to `--depth/--width` (MoE in the last 2
blocks, 4 experts top-2 + shared expert), patch `--patch` on 28x28 digits (T = (28/patch)^2).
`temp` is XLA's scratch memory of the compiled step (`compiled.memory_analysis()`: the
activations kept for the backward pass live there), FLOPs XLA's cost analysis (recomputation
adds to them); step time is timed in interleaved rounds on a fixed random batch.
"""
from __future__ import annotations

import time

from bench import common
from bench.train_step import compiled_step
from moe_jax.commands.common import load_config
from moe_jax.models import remat

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
    stats[policy] = {"temp_bytes": int(mem.temp_size_in_bytes),
                     "arg_bytes": int(mem.argument_size_in_bytes),
                     "flops": common.flops(compiled)}
  timings = common.time_interleaved(steps, reps=reps, warmup=1)
  base = stats["none"]
  records = []
  for policy, timing in timings.items():
    s = stats[policy]
    records.append({"policy": policy, **s, "temp_x_none": s["temp_bytes"] / base["temp_bytes"],
                    "flops_x_none": s["flops"] / base["flops"] if s["flops"] else None,
                    **timing.summary(), "time_x_none": timing.median / timings["none"].median})
  common.print_table(records, [("policy", "model.remat_policy", ""),
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
