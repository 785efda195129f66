"""Scaling: data and expert parallelism on 1, 2, 4 and 8 devices, all-to-all bytes, AOT pods.

    python -m bench.scaling [--quick] [--sections a2a devices pods] [--out bench/out/scaling.json]

Runs itself in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (and the
huge-page malloc of `common.use_thp_malloc`) when JAX does not already see 8 devices.

Sections:
1. ``a2a``: all-to-all bytes per MoE layer (token-choice top-k, capacity dispatch), read from
   the compiled HLO: the sum of the all-to-all operand sizes of the layer's forward (one
   all-to-all out to the experts, one back) on mesh (data = 8/EP, expert = EP). The compiled HLO
   is one device's program, so this is bytes per device. Analytic, with
     T   = global tokens per layer call (batch x tokens, over all devices),
     N   = 8 devices (the batch is split over data x expert),
     C   = ceil(k S cf / E) slots per expert and routing group of S tokens,
     per-device operand bytes  = 2 (T/N) k D bytes * (E C / (k S))   [E C/(k S) = cf if exact]
     bytes crossing devices    = 2 T k D bytes cf (EP-1)/EP          [all devices together]
   (each device keeps 1/EP of its buffer; the rest goes to the other EP-1 devices of its group).
   The backward pass has the same two all-to-alls transposed: fwd+bwd = 2x (checked).
   "HLO" = compiled by XLA:CPU; "StableHLO" = the lowered program before XLA's passes. They
   differ for bfloat16 experts: XLA:CPU runs bf16 in f32, so its all-to-alls carry f32.
2. ``devices``: weak scaling. fwd+bwd of a residual stack of MoE layers with a fixed number of
   tokens per device on n = 1, 2, 4, 8 devices: data parallel (data=n: every device holds every
   expert), expert parallel (expert=n: one n-th of the experts each) and, on 8, data=2 x
   expert=4. All configurations are timed in the same interleaved rounds. The simulated devices
   share this machine's cores, so n devices do n times the work of one on the same cores: the
   ideal time is n x t(1 device), and `t / (n t1)` above 1 is the price of the layout, the copies
   and the collectives (not of an interconnect). Per device: XLA FLOPs, temp and argument memory,
   all-to-all bytes (vs the formula above, fwd+bwd = 4 (T/N) k D bytes (EC/kS) per layer) and
   all-reduce bytes (vs the bytes of the gradients that are replicated over a batch axis).
3. ``dropless_ep``: one MoE layer's fwd+bwd (top-k, bf16 experts) on 8 chips of TPU v5p
   (v5p:2x2x2, mesh expert=8), AOT-compiled from this host (needs libtpu): capacity cf=1.25
   against dropless two ways, the CPU fallback (capacity buffers with room for every token,
   cf = E/k) and the TPU path (ragged all-to-all + ragged dot) with receive windows of
   f = 8 (= EP: the worst-case buffer, one round always), 2 (the default), 1.25 and 1 times a
   device's P dispatch rows (rounded up to 16). Per device: XLA FLOPs, temp, dense all-to-all
   operand bytes, ragged-all-to-all buffer bytes (the window buffers: an upper bound, what
   arrives is data-dependent) and the rows a ragged exchange actually moves (N k routed rows +
   at most E (block_size - 1) rows of block padding, (5 D + 3) bf16 values each over fwd and bwd).
   XLA's FLOPs count a while loop's body once (`HloCostAnalysis::HandleWhile`: "compute the
   cost of a single iteration"), so the ragged rows are one round's, and a ragged dot as the
   dense product over all its rows (`HandleRaggedDot`: `GetDotFlops` of the full lhs shape),
   rows past the group sizes included.
4. ``pods``: the trainer's ViMoE step compiled ahead of time for TPU pod topologies
   (`python -m moe_jax.commands.aot ... --json`, one subprocess each): per-chip memory, FLOPs
   and the step time at 100% MFU. Needs libtpu (`pip install -e '.[tpu]'`); skipped with a note
   otherwise.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile

DEVICES = 8
SECTIONS = ("a2a", "devices", "dropless_ep", "pods")
# (config, topology, overrides): the AOT pod configurations of the `pods` section.
PODS_QUICK = [("configs/vimoe_tiny_mnist.py", "v5p:2x2x1", ["--config.mesh.expert=4"])]
PODS = [
    ("configs/vimoe_imagenet.py:S/16", "v5p:2x2x1",
     ["--config.mesh.expert=4", "--config.batch_size=256"]),
    ("configs/vimoe_imagenet.py:dense-B/16", "v5p:4x4x4", []),
    ("configs/vimoe_imagenet.py:B/16", "v5p:4x4x4", ["--config.mesh.expert=8"]),
]


def _reexec_with_devices() -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if f"--xla_force_host_platform_device_count={DEVICES}" in flags:
    return
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
             XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip())
  sys.exit(subprocess.call([sys.executable, "-m", "bench.scaling", *sys.argv[1:]], env=env))


def run_pods(args, records: list[dict]) -> None:
  """AOT-compiles each pod configuration in its own process (TPU topologies need libtpu)."""
  from bench import common

  if importlib.util.find_spec("libtpu") is None:
    note = "skipped: libtpu is not installed (pip install -e '.[tpu]')"
    print(f"pods: {note}", flush=True)
    records.append({"section": "pods", "skipped": note})
    return
  rows = []
  for config, topology, overrides in (PODS_QUICK if args.quick else PODS):
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "aot.json")
      cmd = [sys.executable, "-m", "moe_jax.commands.aot", f"--config={config}",
             f"--topology={topology}", f"--json={out}", *overrides]
      print("  " + " ".join(cmd[2:]), flush=True)
      env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
      if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        records.append({"section": "pods", "config": config, "topology": topology,
                        "error": tail[0] if tail else f"exit {proc.returncode}"})
        print(f"  failed: {records[-1]['error']}", flush=True)
        continue
      with open(out) as f:
        report = json.load(f)
    m = report["memory_per_device"]
    path, _, variant = config.partition(":")
    rec = {"section": "pods", "config": os.path.basename(path) + (f":{variant}" if variant else ""),
           "topology": topology,
           "overrides": " ".join(overrides), "mesh": "x".join(f"{k}={v}" for k, v in
                                                              report["mesh"].items() if v > 1),
           "batch": report["batch_size"], "params": report["params"],
           "memory_per_chip": report["memory_per_chip"], "temp_per_device": m["temp"],
           "hbm_gib_per_chip": report["hbm_gib_per_chip"],
           "flops_per_chip": report["flops_total"] / report["chips"],
           "predicted_step_ms": report["predicted_step_s"] * 1e3,
           "all_to_all": report["collectives"]["all-to-all"],
           "all_to_all_bytes": report["all_to_all_operand_bytes_per_device"],
           "all_reduce": report["collectives"]["all-reduce"],
           "all_gather": report["collectives"]["all-gather"]}
    records.append(rec)
    rows.append(rec)
  common.print_table(rows, [
      ("config", "model", ""), ("topology", "topology", ""), ("mesh", "mesh", ""),
      ("batch", "batch", "d"), ("params", "params", ",d"),
      ("memory_per_chip", "memory/chip", "bytes"), ("temp_per_device", "temp/device", "bytes"),
      ("flops_per_chip", "FLOPs/chip/step", ".3g"),
      ("predicted_step_ms", "step ms @100% MFU", ".3g"), ("all_to_all", "all-to-all", "d"),
      ("all_to_all_bytes", "a2a B/device", ",d"), ("all_reduce", "all-reduce", "d"),
      ("all_gather", "all-gather", "d")],
      title="AOT-compiled train steps (the trainer's own step) on TPU topologies")


def main() -> None:
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import AxisType

  from bench import common
  from moe_jax import moe
  from moe_jax.parallel import mesh as mesh_lib, sharding
  from moe_jax.parallel.hlo import (all_to_all_bytes, collective_bytes, collective_counts,
                                    stablehlo_all_to_all_bytes)

  p = common.parser(__doc__.splitlines()[0], "bench/out/scaling.json")
  p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
  args = common.parse(p)
  assert jax.device_count() == DEVICES, jax.devices()

  def mesh_for(ep: int, data: int | None = None):
    """Mesh (data, expert) over the first data x ep devices (data: the rest of the 8)."""
    data = DEVICES // ep if data is None else data
    return jax.make_mesh((data, ep), (mesh_lib.DATA, mesh_lib.EXPERT),
                         axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:data * ep])

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

  def placed(model, mesh):
    """(graphdef, params, rest): parameters sharded by the trainer's rules (expert banks over
    `expert`), the rest replicated."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return (graphdef, jax.device_put(params, sharding.tree_shardings(params, mesh)),
            jax.device_put(rest, sharding.replicated(mesh)))

  def compiled_fwd_bwd(model, x, mesh, backward: bool):
    graphdef, params, rest = placed(model, mesh)
    x = jax.device_put(x, sharding.batch_sharding(mesh))
    ct = jax.device_put(jnp.ones_like(x) * 0.01, x.sharding)

    def loss(params, x):
      y, aux = moe.capture_aux(nnx.merge(graphdef, params, rest))(x)
      return jnp.sum(y * ct) + aux.total_loss

    fn = (lambda params, x: jax.value_and_grad(loss, argnums=(0, 1))(params, x)) if backward \
        else loss
    with jax.set_mesh(mesh):
      program = jax.jit(fn).lower(params, x).as_text()  # StableHLO, before XLA's passes
      return common.compile_fn(fn, params, x), program

  def grad_bytes_replicated_over_batch(model, mesh) -> int:
    """Bytes per device of the parameter gradients that the batch-split axes must all-reduce:
    each parameter's shard, where some batch axis of size > 1 does not shard it."""
    total = 0
    for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
      sharded_over = {a for a in sharding.param_spec(path, x.shape, mesh) if a is not None}
      if math.prod(n for a, n in mesh.shape.items() if a not in sharded_over) > 1:
        total += x.size * x.dtype.itemsize // math.prod(mesh.shape[a] for a in sharded_over)
    return total

  def run_a2a(args, records):
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
      fwd, fwd_program = compiled_fwd_bwd(layer, x, mesh, backward=False)
      both, _ = compiled_fwd_bwd(layer, x, mesh, backward=True)
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


  def run_devices(args, records):
    # Tokens per device fixed: Bd images of S tokens; n devices route n x Bd images.
    D, F, E, k, Bd, S, L = (256, 512, 8, 2, 4, 64, 2) if args.quick else (512, 1024, 8, 2, 8, 64, 4)
    cf, reps = 1.25, args.reps or (3 if args.quick else 5)
    C = max(math.ceil(k * S * cf / E), 1)
    stack = Stack(D, L, layer_config(E, k, F, cf, "float32"), nnx.Rngs(0))
    stack.eval()
    meshes = [("1 device", 1, 1)]
    for n in (2, 4, 8):
      meshes += [(f"DP {n}", n, 1), (f"EP {n}", 1, n)]
    meshes.append(("DP 2 x EP 4", 2, 4))
    compiled, meta = {}, {}
    for name, data, ep in meshes:
      n = data * ep
      x = jax.random.normal(jax.random.key(1), (n * Bd, S, D), jnp.float32)
      mesh = mesh_for(ep, data)
      compiled[name] = compiled_fwd_bwd(stack, x, mesh, backward=True)[0]
      meta[name] = (data, ep, n, mesh)
      print(f"  compiled {name}", flush=True)
    timings = common.time_interleaved({n: c.call for n, c in compiled.items()}, reps=reps)
    t1 = timings["1 device"].median
    rows = []
    for name, c in compiled.items():
      data, ep, n, mesh = meta[name]
      hlo = c.hlo()
      tokens = n * Bd * S
      a2a_analytic = (4 * (tokens // n) * k * D * 4 * E * C / (k * S) * L) if ep > 1 else 0
      rec = {"section": "devices", "config": name, "devices": n, "data": data, "expert": ep,
             "tokens": tokens, "tokens_per_device": Bd * S, "layers": L, "D": D, "F": F, "E": E,
             "k": k, "cf": cf, **timings[name].summary(), "t_over_n_t1": timings[name].median /
             (n * t1), "tokens_per_s": tokens / timings[name].median,
             **{f"n_{op}": cnt for op, cnt in collective_counts(hlo).items()},
             "a2a_bytes_per_device": all_to_all_bytes(hlo), "a2a_bytes_analytic": a2a_analytic,
             "all_reduce_bytes_per_device": collective_bytes(hlo, "all-reduce"),
             "grad_bytes_replicated": grad_bytes_replicated_over_batch(stack, mesh),
             **c.stats()}
      records.append(rec)
      rows.append(rec)
    common.print_table(rows, [
        ("config", "mesh", ""), ("median_s", "median s", ".3f"), ("q1_s", "q1", ".3f"),
        ("q3_s", "q3", ".3f"), ("t_over_n_t1", "t / (n t1)", ".2f"),
        ("flops", "XLA FLOPs/device", ".3g"), ("temp_bytes", "temp/device", "bytes"),
        ("arg_bytes", "args/device", "bytes"), ("n_all-to-all", "a2a", "d"),
        ("a2a_bytes_per_device", "a2a B/device", ",d"), ("a2a_bytes_analytic", "analytic", ",.0f"),
        ("n_all-reduce", "all-reduce", "d"),
        ("all_reduce_bytes_per_device", "all-reduce B/device", ",d"),
        ("grad_bytes_replicated", "replicated grads B", ",d")],
        title=f"weak scaling: fwd+bwd of {L} MoE layers, {Bd * S} tokens per device ({Bd}x{S}), "
              f"D={D}, F={F}, E={E}, k={k}, cf={cf}; simulated CPU devices sharing "
              f"{os.cpu_count()} cores (ideal t = n t1)")

  def run_dropless_ep(args, records):
    from moe_jax import aot

    if importlib.util.find_spec("libtpu") is None:
      note = "skipped: libtpu is not installed (pip install -e '.[tpu]')"
      print(f"dropless_ep: {note}", flush=True)
      records.append({"section": "dropless_ep", "skipped": note})
      return
    D, F, E, k, B, S = (256, 512, 8, 1, 16, 64) if args.quick else (768, 3072, 32, 1, 64, 197)
    devices = aot.topology_devices(aot.parse_topology("v5p:2x2x2"))
    mesh = jax.make_mesh((1, 8), (mesh_lib.DATA, mesh_lib.EXPERT), devices=devices,
                         axis_types=(AxisType.Auto,) * 2)
    abstract = lambda tree, shardings: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    N = B * S // 8  # tokens per device
    block = moe.default_config("top_k").dropless.block_size
    routed_rows = N * k + E * (block - 1)  # at most, with block padding
    P_rows = -(-routed_rows // block) * block  # dispatch rows per device
    default_factor = moe.default_config("top_k").dropless.ragged_buffer_factor
    rows = []
    runs = [("capacity cf=1.25", "capacity", 1.25, None),
            ("dropless: CPU fallback (cf=E/k)", "capacity", E / k, None)]
    ep = mesh.shape[mesh_lib.EXPERT]
    runs += [(f"dropless: ragged (TPU), f={f:g}" + (" (default)" if f == default_factor else "")
              + (" = EP: worst-case buffer" if f == ep else ""), "dropless", 1.0, f)
             for f in (float(ep), default_factor, 1.25, 1.0)]
    for name, dispatch, cf, factor in runs:
      c = layer_config(E, k, F, cf, "bfloat16")
      c.dispatch = dispatch
      if factor is not None:
        c.dropless.ragged_buffer_factor = factor
      layer = nnx.eval_shape(lambda: moe.MoELayer(D, c, rngs=nnx.Rngs(0)))
      layer.eval()
      graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
      params = abstract(params, sharding.tree_shardings(params, mesh))
      rest = abstract(rest, jax.tree.map(lambda _: sharding.replicated(mesh), rest))
      x = jax.ShapeDtypeStruct((B, S, D), jnp.float32, sharding=sharding.batch_sharding(mesh))

      def loss(params, x):
        y, aux = moe.capture_aux(nnx.merge(graphdef, params, rest))(x)
        return jnp.mean(y.astype(jnp.float32) ** 2) + aux.total_loss

      with jax.set_mesh(mesh):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
      hlo, cost = compiled.as_text(), compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      ragged = dispatch == "dropless"
      rec = {"section": "dropless_ep", "config": name, "D": D, "F": F, "E": E, "k": k,
             "tokens_per_device": N, "cf": cf, "flops": float(cost["flops"]),
             "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
             "n_all_to_all": collective_counts(hlo)["all-to-all"],
             "n_ragged_all_to_all": collective_counts(hlo)["ragged-all-to-all"],
             "a2a_bytes": all_to_all_bytes(hlo),
             "ragged_buffer_bytes": collective_bytes(hlo, "ragged-all-to-all"),
             "window_rows": moe.expert_parallel.window_rows(factor, P_rows, ep) if ragged else None,
             # The TPU kernels, not the CPU ones: ragged dots (XLA's op, or the Mosaic kernel
             # libtpu lowers it to: a custom call with a ragged_dot_tiling attribute); loops
             # (rounds, searchsorted).
             "n_ragged_dot": len(re.findall(r" ragged-dot\(|ragged_dot_tiling=", hlo)),
             "n_while": len(re.findall(r" while\(", hlo)),
             # bf16 rows: forward D + 1 columns out (the row weight), D back; backward x and dy
             # rows out (2 D + 1), dx back (D + 1).
             "ragged_moved_bytes_max": (5 * D + 3) * routed_rows * 2 if ragged else 0,
             # Expert FLOPs of the rows a grouped matmul must visit: 2 matmuls, forward, the
             # forward recomputed in the backward, and 2 backward products.
             "routed_expert_flops_max": 16 * D * F * routed_rows if ragged else None}
      records.append(rec)
      rows.append(rec)
      print(f"  {name}: {rec['flops']:.3g} FLOPs, temp {rec['temp_bytes']:,} B", flush=True)
    common.print_table(rows, [
        ("config", "dispatch", ""), ("flops", "XLA FLOPs/device", ".3g"),
        ("temp_bytes", "temp/device", "bytes"), ("n_all_to_all", "a2a", "d"),
        ("a2a_bytes", "a2a B/device", ",d"), ("n_ragged_all_to_all", "ragged a2a", "d"),
        ("ragged_buffer_bytes", "ragged buffers B/device", ",d"), ("window_rows", "window R", "d"),
        ("n_ragged_dot", "ragged dots", "d"), ("n_while", "while loops", "d"),
        ("ragged_moved_bytes_max", "ragged rows moved B/device (max)", ",d"),
        ("routed_expert_flops_max", "expert FLOPs of routed rows (max)", ".3g")],
        title=f"dropless expert parallelism, one MoE layer fwd+bwd: D={D}, F={F}, E={E}, k={k}, "
              f"{N} tokens per device, bf16, TPU v5p 2x2x2 (expert=8), AOT")

  records: list[dict] = []
  if "a2a" in args.sections:
    run_a2a(args, records)
  if "devices" in args.sections:
    run_devices(args, records)
  if "dropless_ep" in args.sections:
    run_dropless_ep(args, records)
  if "pods" in args.sections:
    run_pods(args, records)
  common.write_json(args.out, "scaling", args, records)


if __name__ == "__main__":
  _reexec_with_devices()
  main()
