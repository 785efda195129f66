r"""Ahead-of-time compilation of a train step for a device topology, from this (CPU) host.

The command is `python -m moe_jax.commands.aot` (see there). `compile_for_topology(config,
topology)` reports per-device memory (`compiled.memory_analysis()`), FLOPs
(`compiled.cost_analysis()`, which counts every loop body once, and `step_flops_per_device`
with the dots / convolutions of every loop iteration), the collectives of the compiled HLO
(counts by op, bytes per step: `moe_jax.parallel.hlo`, loops weighted by their trip counts), a
predicted step time `step flops / (chips * peak)`, and on TPU
generations with documented bandwidths a roofline (`roofline`: compute, HBM traffic and each
collective's bytes against the chip's peak, HBM and ICI bandwidth) plus the mesh axes that share
a physical torus axis (`split_torus_axes`). Nothing is
allocated: parameters, optimizer state and the batch are abstract (`jax.ShapeDtypeStruct` with
`NamedSharding`s), so paper-size models compile here.

Topologies:
- `cpu:N`: N simulated CPU devices (`set_cpu_device_count` sets XLA_FLAGS; it must run before
  JAX starts its backend). No peak.
- `v4:2x2x1`, `v5e:2x2`, `v5p:4x4x4`, `v6e:4x4`, ...: TPU topologies via
  `jax.experimental.topologies.get_topology_desc`, which needs libtpu — the optional extra
  `pip install -e '.[tpu]'` (pins `jax[tpu]` to the installed jax). It compiles on a CPU host.

The step is the trainer's (`moe_jax.train.step.make_train_step`) for `config.task` (any
`moe_jax.tasks.Task`: classification, vqa): the model of `config.model`, the task's loss plus the
MoE aux losses, the optimizer of `config.optimizer`, state shardings from
`moe_jax.parallel.sharding` on the mesh of `config.mesh` (-1 = remaining devices), and the
task's batch shapes (`Task.batch_shapes`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any, Iterator

from moe_jax.parallel.hlo import (all_to_all_bytes, collective_counts, collective_dcn_bytes,
                                  collective_executions, dot_conv_flops, loop_weights,
                                  reduction_elements_by_dtype, collective_wire_bytes,
                                  largest_collectives)

# Dense bf16 peak per chip, TFLOP/s, from the vendors' spec sheets (Google Cloud TPU system
# architecture pages: v4 275, v5e 197, v5p 459, v6e Trillium 918). HBM per chip, GiB, same source.
TPU_PEAK_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Per-chip bandwidths in GB/s (1e9 bytes/s), from the Cloud TPU system architecture pages
# (cloud.google.com/tpu/docs/v5p: HBM 2765 GBps, bidirectional inter-chip interconnect 1200 GBps
# per chip; cloud.google.com/tpu/docs/v5e: HBM 819 GBps, bidirectional ICI 400 GBps per chip).
# Generations without a documented figure here get no roofline (no guessed numbers).
TPU_HBM_GBPS = {"v5e": 819.0, "v5p": 2765.0}
TPU_ICI_GBPS = {"v5e": 400.0, "v5p": 1200.0}  # bidirectional: half of it leaves the chip
# Data-center network (between slices) per chip, GB/s: v5p "DCN bandwidth per chip 50 Gbps"
# (cloud.google.com/tpu/docs/v5p); v5e "per-host NIC 2 x 100 Gbps" for 8 chips per host
# (cloud.google.com/tpu/docs/v5e) = 25 Gbps per chip.
TPU_DCN_GBPS = {"v5e": 25 / 8, "v5p": 50 / 8}
_TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}
# How many of the largest collective instructions a report lists (with their JAX op names).
LARGEST_COLLECTIVES = 12


class TopologyError(ValueError):
  """A topology string that cannot be compiled for here (bad name, libtpu missing)."""


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given, e.g. "v5p:4x4x4" or "cpu:8"
  platform: str  # "cpu" or "tpu"
  generation: str | None  # "v5p", ... (TPU only)
  num_devices: int | None  # cpu:N only (TPU: known once the topology is loaded)


def parse_topology(name: str) -> Topology:
  kind, sep, shape = name.partition(":")
  if not sep or not shape:
    raise TopologyError(f"--topology={name!r}: use cpu:N or <tpu>:<shape> such as v5p:4x4x4")
  kind = kind.lower()
  if kind == "cpu":
    if not shape.isdigit() or int(shape) < 1:
      raise TopologyError(f"--topology={name!r}: cpu:N needs a device count N >= 1")
    return Topology(name, "cpu", None, int(shape))
  generation = _TPU_ALIASES.get(kind, kind)
  if generation not in TPU_PEAK_TFLOPS:
    raise TopologyError(f"--topology={name!r}: unknown TPU generation {kind!r}; use one of "
                        f"{sorted(TPU_PEAK_TFLOPS)} (or cpu:N)")
  if not re.fullmatch(r"\d+(x\d+)*", shape):
    raise TopologyError(f"--topology={name!r}: the shape must look like 2x2x1")
  return Topology(f"{generation}:{shape}", "tpu", generation, None)


def set_cpu_device_count(n: int) -> None:
  """Asks XLA for `n` host devices. Takes effect only before JAX starts its CPU backend."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def topology_devices(topology: Topology, num_slices: int = 1) -> list:
  """The devices of `topology`; for a TPU topology, `num_slices` copies of it joined by DCN
  (`get_topology_desc(..., num_slices=n)`: devices carry their `slice_index`). A `cpu:N`
  topology is N devices in all, simulated slices included (`moe_jax.parallel.mesh`)."""
  import jax

  if topology.platform == "cpu":
    devices = jax.devices("cpu")
    if len(devices) != topology.num_devices:
      raise TopologyError(
          f"--topology={topology.name}: JAX has {len(devices)} CPU devices; the device count is "
          "fixed when JAX starts, so run `python -m moe_jax.commands.aot` in a fresh process (it sets "
          "XLA_FLAGS=--xla_force_host_platform_device_count=N itself)")
    return devices
  if importlib.util.find_spec("libtpu") is None:
    raise TopologyError(
        f"--topology={topology.name} needs libtpu to compile for TPU. Install the optional "
        "extra: pip install -e '.[tpu]'  (= jax[tpu] at the installed jax version); "
        "or use --topology cpu:N")
  from jax.experimental import topologies
  try:
    extra = {"num_slices": num_slices} if num_slices > 1 else {}
    return list(topologies.get_topology_desc(topology.name, "tpu", **extra).devices)
  except Exception as e:  # libtpu rejects the shape: show its one-line reason
    first = next((l for l in str(e).splitlines() if l.strip()), type(e).__name__)
    raise TopologyError(f"--topology={topology.name}: libtpu cannot build it: {first}") from e


def num_chips(devices) -> int:
  """TPU v4 topologies list one device per TensorCore (2 per chip): count chips by coordinates."""
  coords = {(getattr(d, "slice_index", 0), *d.coords) for d in devices
            if getattr(d, "coords", None) is not None}
  return len(coords) or len(devices)


# ----------------------------------------------------------------------------- the train step


def _mesh(config, devices):
  """`config.mesh` over `devices` (validated by `moe_jax.parallel.mesh.build_mesh`).

  On a TPU torus, `jax.make_mesh` maps every logical axis onto whole physical axes; e.g.
  expert=8 on v5p:4x4x4 cannot be, so there the physical axes are split instead (as
  `mesh_utils.create_device_mesh(..., allow_split_physical_axes=True)`)."""
  import jax
  from jax.experimental import mesh_utils
  from jax.sharding import AxisType

  from moe_jax.parallel import mesh as mesh_lib
  from moe_jax.train import loop

  try:
    return mesh_lib.build_mesh(config.mesh, num_experts=loop.num_experts(config),
                               global_batch=config.batch_size, devices=devices)
  except NotImplementedError as e:  # validated already; only the torus assignment failed
    sizes = mesh_lib.mesh_shape(config.mesh, len(devices))
    print(f"note: {str(e).split('.')[0]}; splitting physical axes", flush=True)
    grid = mesh_utils.create_device_mesh(tuple(sizes.values()), devices,
                                         allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))


def lower_train_step(config, devices):
  """The trainer's own train step for `config`'s task (`moe_jax.train.step.make_train_step` with
  the task's loss, the optimizer, state shardings and batch shapes of `config`) lowered on a mesh
  of `devices`, from abstract inputs.

  Returns (lowered, mesh, info) where info has parameter counts and shapes.
  """
  import jax

  from moe_jax import tasks
  from moe_jax.parallel import sharding
  from moe_jax.train import loop, optim, state as state_lib, step as step_lib

  loop.validate_config(config)
  task = tasks.build_task(config)
  task.check()
  mesh = _mesh(config, devices)
  tx = optim.make_optimizer(config.optimizer, config.total_steps)
  abstract, shardings, defs = state_lib.abstract_state(config, tx, mesh)
  with jax.set_mesh(mesh):
    train_step = step_lib.make_train_step(
        defs, tx, optim.schedule(config.optimizer, config.total_steps), mesh, shardings, task.loss,
        **step_lib.options(config.optimizer), grad_reduce_dtype=config.mesh.grad_reduce_dtype)
    batch = task.abstract_batch(config.batch_size, sharding.batch_sharding(mesh), eval_=False)
    lowered = train_step.lower(abstract, batch)
  leaves = jax.tree.leaves(abstract.params)
  info = {"task": task.name, "params": int(sum(math.prod(x.shape) for x in leaves)),
          "param_bytes": int(sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)),
          "mesh": dict(mesh.shape), "batch_size": config.batch_size}
  return lowered, mesh, info


def split_torus_axes(mesh) -> dict[str, list[str]]:
  """Physical torus axis ("x", "y", "z") -> the mesh axes (of size > 1) whose neighbours differ
  along it, for each physical axis that more than one mesh axis shares (split between them).
  Empty for devices without torus coordinates (CPU)."""
  import numpy as np

  devices = mesh.devices
  if getattr(devices.flat[0], "coords", None) is None:
    return {}
  coords = np.array([d.coords for d in devices.flat]).reshape(devices.shape + (-1,))
  along = {}
  for i, name in enumerate(mesh.axis_names):
    if devices.shape[i] > 1:
      differs = np.diff(coords, axis=i) != 0
      along[name] = np.any(differs.reshape(-1, coords.shape[-1]), axis=0)
  split = {}
  for dim in range(coords.shape[-1]):
    names = [n for n, mask in along.items() if mask[dim]]
    if len(names) > 1:
      split["xyz"[dim] if dim < 3 else str(dim)] = names
  return split


def roofline(flops_per_device: float, bytes_accessed: float, wire_bytes: dict[str, float],
             generation: str, dcn_bytes: dict[str, float] | None = None) -> dict[str, Any] | None:
  """Lower-bound times per step on one chip of `generation`: compute at peak, HBM traffic
  (XLA's bytes accessed) at HBM bandwidth, each collective's sent bytes at the chip's outgoing
  ICI bandwidth (all links busy), and the bytes that cross slices (`dcn_bytes`) at the chip's DCN
  bandwidth (`dcn_s`; the ICI term still counts all bytes: an upper bound on the ICI part).
  `bound_s` is their max (perfect overlap), `serial_s` the sum (none). None when the
  generation's bandwidths are not documented here."""
  if generation not in TPU_HBM_GBPS:
    return None
  ici = TPU_ICI_GBPS[generation] * 1e9 / 2
  times = {"compute_s": flops_per_device / (TPU_PEAK_TFLOPS[generation] * 1e12),
           "hbm_s": bytes_accessed / (TPU_HBM_GBPS[generation] * 1e9)}
  collectives = {op: b / ici for op, b in wire_bytes.items() if b}
  dcn = {op: b / (TPU_DCN_GBPS[generation] * 1e9) for op, b in (dcn_bytes or {}).items() if b}
  parts = [times["compute_s"], times["hbm_s"], sum(collectives.values()), sum(dcn.values())]
  return {**times, "collective_s": collectives, "dcn_s": dcn, "bound_s": max(parts),
          "serial_s": sum(parts),
          "bottleneck": ("compute", "hbm", "collectives", "dcn")[parts.index(max(parts))],
          "hbm_gbps": TPU_HBM_GBPS[generation], "ici_gbps": TPU_ICI_GBPS[generation],
          "dcn_gbps": TPU_DCN_GBPS[generation]}


def hlo_counts(hlo: str, num_devices: int) -> dict[str, Any]:
  """What the compiled HLO text of an SPMD step says per device and step: collective
  instructions (`collectives`, a loop body's once) and their executions per step, bytes sent,
  reduced elements, the largest collectives, and dot / convolution FLOPs per step and with every
  loop body once; `loop_trip_counts` and `loops_without_trip_count` (bodies counted once: the
  per-step numbers are then lower bounds). See `moe_jax.parallel.hlo.loop_weights`."""
  loops = loop_weights(hlo)
  return {"collectives": collective_counts(hlo),
          "collective_executions_per_step": collective_executions(hlo),
          "all_to_all_operand_bytes_per_device": all_to_all_bytes(hlo),
          "collective_sent_bytes_per_device": collective_wire_bytes(hlo, num_devices),
          "all_reduce_elements_by_dtype": reduction_elements_by_dtype(hlo, num_devices),
          "largest_collectives": largest_collectives(hlo, num_devices, LARGEST_COLLECTIVES),
          "dot_conv_flops_per_device": dot_conv_flops(hlo),
          "dot_conv_flops_bodies_once": dot_conv_flops(hlo, per_step=False),
          "loop_trip_counts": loops.trip_counts,
          "loops_without_trip_count": list(loops.loops_without_trip_count)}


def _step_estimates(r: dict[str, Any], generation: str | None) -> dict[str, Any]:
  """`step_flops_per_device`: XLA's FLOPs (every loop body once) plus the dot / convolution
  FLOPs of the loop iterations XLA leaves out (elementwise FLOPs in loop bodies stay counted
  once); on TPU the predicted step time and roofline from it."""
  out = {"step_flops_per_device": r["flops_per_device"] + r["dot_conv_flops_per_device"]
         - r["dot_conv_flops_bodies_once"]}
  if generation is not None:
    peak = TPU_PEAK_TFLOPS[generation] * 1e12
    out["predicted_step_s"] = out["step_flops_per_device"] * r["devices"] / (r["chips"] * peak)
    out["roofline"] = roofline(out["step_flops_per_device"], r["bytes_accessed_per_device"],
                               r["collective_sent_bytes_per_device"], generation,
                               r.get("collective_dcn_bytes_per_device"))
  return out


def analyze(compiled, devices, topology: Topology, mesh=None, num_slices: int = 1) -> dict[str, Any]:
  """Memory, FLOPs, collectives and predicted step time of a compiled (SPMD) step."""
  mem = compiled.memory_analysis()
  memory = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
            for k in ("argument", "output", "alias", "temp", "generated_code")}
  # Peak live bytes per device: inputs + outputs not aliased to donated inputs + scratch.
  memory["total"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops_per_device = float(cost.get("flops", 0.0))
  hlo = compiled.as_text()
  chips = num_chips(devices) if topology.platform == "tpu" else len(devices)
  out = {"topology": topology.name, "devices": len(devices), "chips": chips,
         "device_kind": devices[0].device_kind, "memory_per_device": memory,
         "flops_per_device": flops_per_device, "flops_total": flops_per_device * len(devices),
         "bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
         **hlo_counts(hlo, len(devices)), "slices": num_slices,
         "split_torus_axes": {} if mesh is None else split_torus_axes(mesh)}
  if num_slices > 1 and mesh is not None:  # device assignment order = the mesh's devices
    from moe_jax.parallel import mesh as mesh_lib

    out["collective_dcn_bytes_per_device"] = collective_dcn_bytes(
        hlo, mesh_lib.device_slices(list(mesh.devices.flat), num_slices))
  if topology.platform == "tpu":
    out["peak_tflops_per_chip"] = TPU_PEAK_TFLOPS[topology.generation]
    out["hbm_gib_per_chip"] = TPU_HBM_GIB[topology.generation]
    out["memory_per_chip"] = memory["total"] * len(devices) // chips
  out.update(_step_estimates(out, topology.generation if topology.platform == "tpu" else None))
  return out


def recount(report: dict[str, Any], hlo: str) -> dict[str, Any]:
  """`report` (a `compile_for_topology` JSON) with everything read from the HLO text redone
  from `hlo` (that compile's `--dump_hlo`): no compile needed. Memory, XLA's FLOPs and bytes
  accessed stay the report's."""
  if report.get("slices", 1) > 1:
    raise ValueError(f"recount: the report is of {report['slices']} slices; its DCN bytes need "
                     "the mesh: recompile it with python -m moe_jax.commands.aot")
  topology = parse_topology(report["topology"])
  out = {**report, **hlo_counts(hlo, report["devices"])}
  out.update(_step_estimates(out, topology.generation if topology.platform == "tpu" else None))
  return out


@contextlib.contextmanager
def _timed(seconds: dict[str, dict[str, float]], phase: str) -> Iterator[None]:
  """Records the wall and CPU seconds (this process, all threads) of the block under `phase`."""
  wall, cpu = time.perf_counter(), time.process_time()
  yield
  seconds[phase] = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def compile_for_topology(config, topology: str | Topology,
                         hlo_path: str | None = None) -> dict[str, Any]:
  """Compiles the train step of `config` for `topology` and returns `analyze`'s report plus
  `seconds` (wall and CPU seconds of this process per phase: tracing + lowering the step, XLA's
  compile), and writes the compiled HLO text to `hlo_path` if given."""
  from moe_jax.parallel import mesh as mesh_lib

  topology = parse_topology(topology) if isinstance(topology, str) else topology
  slices = mesh_lib.num_slices(config.mesh)
  devices = topology_devices(topology, slices)
  seconds: dict[str, dict[str, float]] = {}
  with _timed(seconds, "trace_and_lower"):
    lowered, mesh, info = lower_train_step(config, devices)
  with _timed(seconds, "compile"):
    compiled = lowered.compile()
  if hlo_path:
    os.makedirs(os.path.dirname(hlo_path) or ".", exist_ok=True)
    with open(hlo_path, "w") as f:
      f.write(compiled.as_text())
  return {**info, **analyze(compiled, devices, topology, mesh, slices), "seconds": seconds}


def _gib(n: float) -> str:
  return f"{n / 2**30:.3f} GiB"


def format_report(r: dict[str, Any]) -> str:
  m = r["memory_per_device"]
  lines = [
      f"topology {r['topology']}: {r['devices']} devices ({r['device_kind']}), {r['chips']} "
      f"chips, mesh {r['mesh']}, global batch {r['batch_size']}",
      f"params: {r['params']:,} ({_gib(r['param_bytes'])})",
      f"memory per device: total {_gib(m['total'])} = arguments {_gib(m['argument'])} + outputs "
      f"{_gib(m['output'])} - aliased {_gib(m['alias'])} + temp {_gib(m['temp'])}",
      f"FLOPs per step per device: {r['step_flops_per_device']:.4g} (XLA's "
      f"{r['flops_per_device']:.4g} with every loop body once, plus the dots / convolutions of "
      f"the other iterations: {r['dot_conv_flops_per_device']:.4g} per step, "
      f"{r['dot_conv_flops_bodies_once']:.4g} bodies once)",
      "collectives: " + ", ".join(f"{op} {n}" for op, n in r["collectives"].items())
      + " (instructions, a loop body's once)",
      "collectives run per step: " + ", ".join(
          f"{op} {n}" for op, n in r["collective_executions_per_step"].items()),
      f"while loops: {len(r['loop_trip_counts'])} with a known trip count, "
      f"{len(r['loops_without_trip_count'])} without (their bodies counted once: "
      f"{', '.join(r['loops_without_trip_count']) or 'none'})",
      f"all-to-all operand bytes per device: {r['all_to_all_operand_bytes_per_device']:,}",
      "reduced elements per device by dtype (all-reduce and reduce-scatter operands): "
      + (", ".join(f"{t} {n:,}" for t, n in r["all_reduce_elements_by_dtype"].items())
         or "none"),
  ]
  if "predicted_step_s" in r:
    lines.append(f"memory per chip: {_gib(r['memory_per_chip'])} of {r['hbm_gib_per_chip']} GiB "
                 "HBM")
    lines.append(f"predicted step time: {r['predicted_step_s'] * 1e3:.3f} ms = step FLOPs / "
                 f"({r['chips']} chips x {r['peak_tflops_per_chip']:g} TFLOP/s bf16 peak), i.e. "
                 "at 100% MFU")
  else:
    lines.append("predicted step time: none (no peak FLOP/s for CPU)")
  sent = {op: b for op, b in r["collective_sent_bytes_per_device"].items() if b}
  lines.append("collective bytes sent per device: " + (", ".join(
      f"{op} {b / 2**20:.3f} MiB" for op, b in sent.items()) or "none"))
  if "collective_dcn_bytes_per_device" in r:
    dcn = {op: b for op, b in r["collective_dcn_bytes_per_device"].items() if b}
    lines.append(f"bytes sent across the {r['slices']} slices (DCN) per device: " + (", ".join(
        f"{op} {b / 2**20:.3f} MiB" for op, b in dcn.items()) or "none"))
  roof = r.get("roofline")
  if roof:
    per_op = ", ".join(f"{op} {t * 1e3:.3f}" for op, t in roof["collective_s"].items())
    lines.append(
        f"roofline per step (ms): compute {roof['compute_s'] * 1e3:.3f}, HBM "
        f"{roof['hbm_s'] * 1e3:.3f} ({r['bytes_accessed_per_device'] / 2**30:.3f} GiB at "
        f"{roof['hbm_gbps']:g} GB/s; XLA's bytes accessed, every loop body once), collectives {per_op or 'none'} (at {roof['ici_gbps'] / 2:g} "
        f"GB/s out of the chip)" + "".join(
            f", DCN {op} {t * 1e3:.3f}" for op, t in roof["dcn_s"].items())
        + (f" (at {roof['dcn_gbps']:g} GB/s)" if roof["dcn_s"] else "")
        + f"; bound {roof['bound_s'] * 1e3:.3f} ({roof['bottleneck']}), "
        f"serial {roof['serial_s'] * 1e3:.3f}")
  elif "predicted_step_s" in r:
    lines.append(f"roofline: none (no documented bandwidths for {r['topology']})")
  if r["split_torus_axes"]:
    lines.append("mesh axes sharing a physical torus axis: " + "; ".join(
        f"{dim}: {', '.join(names)}" for dim, names in r["split_torus_axes"].items()))
  if r.get("largest_collectives"):
    lines.append("largest collectives (MiB sent per device, group size, result, JAX op):")
    lines += [f"  {c['op']} {c['sent_bytes'] / 2**20:.1f} MiB, {c['group']} devices, "
              f"{c['shape']}, {c['op_name'] or '?'}" for c in r["largest_collectives"]]
  if r.get("seconds"):
    lines.append("seconds (wall / CPU): " + ", ".join(
        f"{phase} {t['wall']:.1f} / {t['cpu']:.1f}" for phase, t in r["seconds"].items()))
  return "\n".join(lines)
