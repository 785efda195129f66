r"""Ahead-of-time compilation of a train step for a device topology, from this (CPU) host.

The command is `python -m moe_jax.commands.aot` (see there). `compile_for_topology(config,
topology)` reports per-device memory (`compiled.memory_analysis()`), FLOPs
(`compiled.cost_analysis()`), the collectives of the compiled HLO (counts by op,
`moe_jax.parallel.hlo`) and a predicted step time `flops / (chips * peak)`. Nothing is
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

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

from moe_jax.parallel.hlo import all_to_all_bytes, collective_counts

# Dense bf16 peak per chip, TFLOP/s, from the vendors' spec sheets (Google Cloud TPU system
# architecture pages: v4 275, v5e 197, v5p 459, v6e Trillium 918). HBM per chip, GiB, same source.
TPU_PEAK_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
_TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}


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


def topology_devices(topology: Topology) -> list:
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
    return list(topologies.get_topology_desc(topology.name, "tpu").devices)
  except Exception as e:  # libtpu rejects the shape: show its one-line reason
    first = next((l for l in str(e).splitlines() if l.strip()), type(e).__name__)
    raise TopologyError(f"--topology={topology.name}: libtpu cannot build it: {first}") from e


def num_chips(devices) -> int:
  """TPU v4 topologies list one device per TensorCore (2 per chip): count chips by coordinates."""
  coords = {tuple(d.coords) for d in devices if getattr(d, "coords", None) is not None}
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
        **step_lib.options(config.optimizer))
    batch = task.abstract_batch(config.batch_size, sharding.batch_sharding(mesh), eval_=False)
    lowered = train_step.lower(abstract, batch)
  leaves = jax.tree.leaves(abstract.params)
  info = {"task": task.name, "params": int(sum(math.prod(x.shape) for x in leaves)),
          "param_bytes": int(sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)),
          "mesh": dict(mesh.shape), "batch_size": config.batch_size}
  return lowered, mesh, info


def analyze(compiled, devices, topology: Topology) -> dict[str, Any]:
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
         "collectives": collective_counts(hlo),
         "all_to_all_operand_bytes_per_device": all_to_all_bytes(hlo)}
  if topology.platform == "tpu":
    peak = TPU_PEAK_TFLOPS[topology.generation] * 1e12
    out["peak_tflops_per_chip"] = TPU_PEAK_TFLOPS[topology.generation]
    out["predicted_step_s"] = out["flops_total"] / (chips * peak)
    out["hbm_gib_per_chip"] = TPU_HBM_GIB[topology.generation]
    out["memory_per_chip"] = memory["total"] * len(devices) // chips
  return out


def compile_for_topology(config, topology: str | Topology,
                         hlo_path: str | None = None) -> dict[str, Any]:
  """Compiles the train step of `config` for `topology` and returns `analyze`'s report (and
  writes the compiled HLO text to `hlo_path` if given)."""
  topology = parse_topology(topology) if isinstance(topology, str) else topology
  devices = topology_devices(topology)
  lowered, _, info = lower_train_step(config, devices)
  compiled = lowered.compile()
  if hlo_path:
    os.makedirs(os.path.dirname(hlo_path) or ".", exist_ok=True)
    with open(hlo_path, "w") as f:
      f.write(compiled.as_text())
  return {**info, **analyze(compiled, devices, topology)}


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
      f"FLOPs per step: {r['flops_per_device']:.4g} per device, {r['flops_total']:.4g} total",
      "collectives: " + ", ".join(f"{op} {n}" for op, n in r["collectives"].items()),
      f"all-to-all operand bytes per device: {r['all_to_all_operand_bytes_per_device']:,}",
  ]
  if "predicted_step_s" in r:
    lines.append(f"memory per chip: {_gib(r['memory_per_chip'])} of {r['hbm_gib_per_chip']} GiB "
                 "HBM")
    lines.append(f"predicted step time: {r['predicted_step_s'] * 1e3:.3f} ms = total FLOPs / "
                 f"({r['chips']} chips x {r['peak_tflops_per_chip']:g} TFLOP/s bf16 peak), i.e. "
                 "at 100% MFU")
  else:
    lines.append("predicted step time: none (no peak FLOP/s for CPU)")
  return "\n".join(lines)
