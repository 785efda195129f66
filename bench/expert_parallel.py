"""Expert parallelism on 8 simulated CPU devices: all-to-all bytes and step time, EP=8 vs EP=1.

    python -m bench.expert_parallel [--quick] [--out bench/out/expert_parallel.json]

Runs itself in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 when JAX
does not already see 8 devices.

1. all-to-all bytes per MoE layer (token-choice top-k, capacity dispatch), read from the compiled
   HLO: the sum of the all-to-all operand sizes of the layer's forward (one all-to-all out to the
   experts, one back) on mesh (data = 8/EP, expert = EP). The compiled HLO is one device's
   program, so this is bytes per device. Analytic, with
     T   = global tokens per layer call (batch x tokens, over all devices),
     N   = 8 devices (the batch is split over data x expert),
     C   = ceil(k S cf / E) slots per expert and routing group of S tokens,
     per-device operand bytes  = 2 (T/N) k D bytes * (E C / (k S))   [E C/(k S) = cf if exact]
     bytes crossing devices    = 2 T k D bytes cf (EP-1)/EP          [all devices together]
   (each device keeps 1/EP of its buffer; the rest goes to the other EP-1 devices of its group).
   The backward pass has the same two all-to-alls transposed: fwd+bwd = 2x (checked).
   "HLO" = compiled by XLA:CPU; "StableHLO" = the lowered program before XLA's passes. They
   differ for bfloat16 experts: XLA:CPU runs bf16 in f32, so its all-to-alls carry f32.
2. Step time: fwd+bwd of a residual stack of MoE layers, the same global batch on EP=8
   (data=1, expert=8) and EP=1 (data=8: every device holds all experts), timed interleaved.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

DEVICES = 8
_ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "i32": 4, "ui32": 4, "i8": 1}


def stablehlo_all_to_all_bytes(text: str) -> int:
  """Operand bytes of the `stablehlo.all_to_all` ops of a lowered (pre-XLA) program: what the
  program asks to send, before a backend's own passes (XLA:CPU computes bf16 in f32)."""
  total = 0
  for operands in re.findall(r"stablehlo\.all_to_all.*?:\s*\((.*?)\)\s*->", text):
    for dims, dtype in re.findall(r"tensor<((?:\d+x)*)([a-z]+\d+)>", operands):
      total += _ITEMSIZE[dtype] * math.prod(int(d) for d in dims.split("x") if d)
  return total


def _reexec_with_devices() -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if f"--xla_force_host_platform_device_count={DEVICES}" in flags:
    return
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
             XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip())
  sys.exit(subprocess.call([sys.executable, "-m", "bench.expert_parallel", *sys.argv[1:]],
                           env=env))


def main() -> None:
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

  from bench import common
  from moe_jax import moe
  from moe_jax.aot import all_to_all_bytes, collective_counts

  p = common.parser(__doc__.splitlines()[0], "bench/out/expert_parallel.json")
  args = p.parse_args()
  assert jax.device_count() == DEVICES, jax.devices()

  def mesh_for(ep: int):
    return jax.make_mesh((DEVICES // ep, ep), ("data", "expert"),
                         axis_types=(AxisType.Auto,) * 2)

  def layer_config(E, k, F, cf, dtype):
    c = moe.default_config("top_k")
    c.num_experts, c.hidden_dim, c.router.k = E, F, k
    c.dispatch, c.capacity_factor, c.dtype = "capacity", cf, dtype
    return c

  class Stack(nnx.Module):
    def __init__(self, D, layers, config, rngs):
      self.layers = nnx.List([moe.MoELayer(D, config, rngs=rngs) for _ in range(layers)])

    def __call__(self, x):
      for layer in self.layers:
        x = x + layer(x)
      return x

  def placed(model, mesh, ep):
    """(graphdef, params, rest) with expert banks sharded over `expert` (EP>1) or replicated."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    def put(path, x):
      expert = ep > 1 and any(getattr(q, "key", None) == "experts" for q in path)
      return jax.device_put(x, NamedSharding(mesh, P("expert") if expert else P()))
    return (graphdef, jax.tree_util.tree_map_with_path(put, params),
            jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), rest))

  def compiled_fwd_bwd(model, x, mesh, ep, backward: bool):
    graphdef, params, rest = placed(model, mesh, ep)
    x = jax.device_put(x, NamedSharding(mesh, P(("data", "expert"))))
    ct = jax.device_put(jnp.ones_like(x) * 0.01, x.sharding)

    def loss(params, x):
      y, aux = moe.capture_aux(nnx.merge(graphdef, params, rest))(x)
      return jnp.sum(y * ct) + aux.total_loss

    fn = (lambda params, x: jax.value_and_grad(loss, argnums=(0, 1))(params, x)) if backward \
        else loss
    with jax.set_mesh(mesh):
      program = jax.jit(fn).lower(params, x).as_text()  # StableHLO, before XLA's passes
      return common.compile_fn(fn, params, x), program

  records: list[dict] = []

  # 1. all-to-all bytes per layer --------------------------------------------------------------
  D, F, E, k, B, S = (256, 512, 8, 2, 32, 64) if args.quick else (512, 1024, 8, 2, 64, 64)
  cases = [(ep, cf, dt) for ep in (2, 4, 8) for cf in (1.0, 1.25) for dt in ("float32",)]
  cases += [(8, 1.05, "float32"), (8, 1.0, "bfloat16")]
  if args.quick:
    cases = [(4, 1.0, "float32"), (8, 1.25, "float32"), (8, 1.05, "float32"),
             (8, 1.0, "bfloat16")]
  T = B * S
  rows = []
  for ep, cf, dtype in cases:
    layer = moe.MoELayer(D, layer_config(E, k, F, cf, dtype), rngs=nnx.Rngs(0))
    layer.eval()
    x = jax.random.normal(jax.random.key(1), (B, S, D), jnp.float32)
    mesh = mesh_for(ep)
    fwd, fwd_program = compiled_fwd_bwd(layer, x, mesh, ep, backward=False)
    both, _ = compiled_fwd_bwd(layer, x, mesh, ep, backward=True)
    nbytes = jnp.dtype(dtype).itemsize
    C = max(math.ceil(k * S * cf / E), 1)
    measured = all_to_all_bytes(fwd.hlo())
    analytic_device = 2 * (T // DEVICES) * k * D * nbytes * cf  # per-device operand bytes
    exact_device = 2 * (T // DEVICES) // S * E * C * D * nbytes  # with C rounded up
    wire = measured * DEVICES * (ep - 1) / ep
    analytic_wire = 2 * T * k * D * nbytes * cf * (ep - 1) / ep
    rec = {"section": "all_to_all_bytes", "EP": ep, "data": DEVICES // ep, "T": T, "S": S,
           "D": D, "E": E, "k": k, "cf": cf, "C": C, "dtype": dtype,
           "all_to_alls_fwd": collective_counts(fwd.hlo())["all-to-all"],
           "all_to_alls_fwd_bwd": collective_counts(both.hlo())["all-to-all"],
           "hlo_bytes_per_device_fwd": measured,
           "stablehlo_bytes_per_device_fwd": stablehlo_all_to_all_bytes(fwd_program),
           "hlo_bytes_per_device_fwd_bwd": all_to_all_bytes(both.hlo()),
           "analytic_bytes_per_device_fwd": analytic_device,
           "analytic_bytes_per_device_fwd_rounded_C": exact_device,
           "hlo_wire_bytes_fwd": wire, "analytic_wire_bytes_fwd": analytic_wire,
           "ratio_hlo_vs_analytic": measured / analytic_device}
    records.append(rec)
    rows.append(rec)
    print(f"  EP={ep} cf={cf} {dtype}: {measured} B/device vs {analytic_device:.0f} analytic",
          flush=True)
  common.print_table(rows, [
      ("EP", "EP", "d"), ("cf", "cf", "g"), ("C", "C", "d"), ("dtype", "dtype", ""),
      ("all_to_alls_fwd", "a2a ops fwd", "d"), ("all_to_alls_fwd_bwd", "a2a ops fwd+bwd", "d"),
      ("hlo_bytes_per_device_fwd", "HLO B/device fwd", "d"),
      ("analytic_bytes_per_device_fwd", "analytic B/device", ".0f"),
      ("ratio_hlo_vs_analytic", "HLO/analytic", ".4f"),
      ("stablehlo_bytes_per_device_fwd", "StableHLO B/device fwd", "d"),
      ("hlo_bytes_per_device_fwd_bwd", "HLO B/device fwd+bwd", "d"),
      ("hlo_wire_bytes_fwd", "HLO wire B fwd (all devices)", ".0f"),
      ("analytic_wire_bytes_fwd", "analytic wire B", ".0f")],
      title=f"all-to-all bytes per MoE layer forward: T={T} global tokens ({B}x{S}), D={D}, "
            f"E={E}, k={k}, 8 devices")

  # 2. step time EP=8 vs EP=1 --------------------------------------------------------------------
  D, F, E, k, B, S, L = (256, 512, 8, 2, 32, 64, 2) if args.quick else (512, 1024, 8, 2, 64, 64, 4)
  reps = args.reps or (3 if args.quick else 7)
  cf = 1.25
  stack = Stack(D, L, layer_config(E, k, F, cf, "float32"), nnx.Rngs(0))
  stack.eval()
  x = jax.random.normal(jax.random.key(1), (B, S, D), jnp.float32)
  compiled = {f"EP={ep}": compiled_fwd_bwd(stack, x, mesh_for(ep), ep, backward=True)[0]
              for ep in (1, 8)}
  timings = common.time_interleaved({n: c.call for n, c in compiled.items()}, reps=reps)
  base = timings["EP=1"].median
  rows = []
  for name, c in compiled.items():
    counts = collective_counts(c.hlo())
    rec = {"section": "step_time", "config": name, "mesh": f"data={DEVICES // int(name[3:])}, "
           f"expert={name[3:]}", "layers": L, "T": B * S, "D": D, "F": F, "E": E, "k": k,
           "cf": cf, **timings[name].summary(), "ratio_vs_ep1": timings[name].median / base,
           **{f"n_{op}": n for op, n in counts.items()}, **c.stats()}
    records.append(rec)
    rows.append(rec)
  common.print_table(rows, [
      ("config", "config", ""), ("mesh", "mesh", ""), ("median_s", "median s", ".3f"),
      ("q1_s", "q1", ".3f"), ("q3_s", "q3", ".3f"), ("n", "n", "d"),
      ("ratio_vs_ep1", "time / EP=1", ".2f"), ("n_all-to-all", "all-to-all", "d"),
      ("n_all-reduce", "all-reduce", "d"), ("n_all-gather", "all-gather", "d"),
      ("temp_bytes", "temp", "bytes"), ("flops", "XLA flops/device", ".3g")],
      title=f"fwd+bwd of {L} MoE layers (residual), T={B * S} global tokens, D={D}, F={F}, "
            f"E={E}, k={k}, cf={cf}, 8 simulated CPU devices")
  common.write_json(args.out, "expert_parallel", args, records)


if __name__ == "__main__":
  _reexec_with_devices()
  main()
