"""Reference HGA on a batch-sharded mesh: the graph built per device vs. left to XLA's partitioner.

    python -m bench.hga_sharding [--quick] [--batch 8] [--sizes 110,25,144,144] [--width 64]

HGA's graph aggregation forward + input gradient (`jax.vjp` of `(x_agg, gate)`, what a train
step runs) on `--batch` images sharded
over 8 simulated CPU devices (mesh fsdp=4 x expert=2, the batch over both), two cases:
- `per_device`: `hga.ReferenceHGA.aggregate`, each device building its own images' graphs
  (`attention.map_batch_shards`);
- `partitioner`: the same per-image code (`hga._reference_aggregate`) jitted on the sharded batch
  as it ran before, XLA's SPMD partitioner deciding (it gathers the batch for `top_k` and the
  graph's scatter-add).
Printed per case: collectives of the compiled program, bytes sent per device
(`hlo.collective_wire_bytes`), and the time in interleaved rounds.
"""
from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench import common  # noqa: E402
from moe_jax.parallel import hlo, mesh as mesh_lib, sharding  # noqa: E402
from moe_jax.vlm import hga  # noqa: E402


def main():
  p = common.parser(__doc__.splitlines()[0], "bench/out/hga_sharding.json")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--sizes", default="110,25,144,144", help="tokens per group (encoder)")
  p.add_argument("--width", type=int, default=64)
  args = common.parse(p)
  sizes = (9, 4, 6, 2) if args.quick else tuple(int(s) for s in args.sizes.split(","))
  groups = hga.group_ids(sizes)
  layer = hga.build_hga(args.width, hga.hga_config(), rngs=nnx.Rngs(0))
  aggregates = {"per_device": lambda x: layer.aggregate(x, groups),
                "partitioner": lambda x: hga._reference_aggregate(x, groups, layer.c)}
  rng = np.random.default_rng(0)
  x, cotangent = (rng.normal(size=(args.batch, sum(sizes), args.width)).astype(np.float32)
                  for _ in range(2))
  mesh_config = mesh_lib.default_config()
  mesh_config.data, mesh_config.fsdp, mesh_config.expert = 1, 4, 2
  mesh = mesh_lib.build_mesh(mesh_config, num_experts=4, global_batch=args.batch)
  calls, records = {}, []
  with jax.set_mesh(mesh):
    x, cotangent = jax.device_put((x, cotangent), sharding.batch_sharding(mesh))
    for name, aggregate in aggregates.items():
      def forward_backward(x, cotangent, aggregate=aggregate):
        out, vjp = jax.vjp(aggregate, x)
        return out, vjp((cotangent, np.ones(cotangent.shape[:2] + (1,), np.float32)))[0]
      compiled = jax.jit(forward_backward).lower(x, cotangent).compile()
      text = compiled.as_text()
      calls[name] = lambda compiled=compiled: compiled(x, cotangent)
      records.append({"case": name, **{f"n_{op}": n for op, n in
                                       hlo.collective_counts(text).items() if n},
                      "sent_bytes": sum(hlo.collective_wire_bytes(text, 8).values())})
    timings = common.time_interleaved(calls, reps=args.reps or (3 if args.quick else 7))
  for r in records:
    r.update(timings[r["case"]].summary())
    r["time_x_per_device"] = timings[r["case"]].median / timings["per_device"].median
  common.print_table(records, [("case", "graph built", ""), ("n_all-gather", "all-gathers", ""),
                               ("n_all-reduce", "all-reduces", ""),
                               ("sent_bytes", "sent / device", "bytes"),
                               ("median_s", "fwd+bwd s", ".4f"), ("q1_s", "q1", ".4f"),
                               ("q3_s", "q3", ".4f"), ("time_x_per_device", "x per_device", ".2f")],
                     title=f"reference HGA, batch {args.batch} over 8 CPU devices, groups {sizes}, "
                           f"width {args.width}, float32")
  common.write_json(args.out, "hga_sharding", args, records)


if __name__ == "__main__":
  main()
