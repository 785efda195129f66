"""Device mesh from config, validated before anything compiles: the one home of the mesh axis
names and of the rule that the batch is sharded over `data`, `fsdp` and `expert`, never `model`.

What each axis shards (defaults, `PARAM_RULES`): the batch and every routing group over
`data` x `fsdp` x `expert`; an expert bank's experts E over `expert` and its hidden dimension F
over `fsdp` (so with fsdp=8, expert=1 each device holds 1/8 of every expert, gathered where the
layer runs); every other parameter's largest dimension that `fsdp` divides over `fsdp`. Optimizer
moments follow their parameters. `model` (tensor parallelism) is not implemented: a mesh with
model > 1 is refused.

Multi-slice (hybrid) meshes: `dcn_data`, `dcn_fsdp`, `dcn_expert` (default 1) split an axis
over slices joined by the data-center network; the fields `data`, `fsdp`, `expert` are then the
sizes *within* a slice (over ICI), and the mesh axis has ici x dcn devices, the DCN factor
outermost (`jax.experimental.mesh_utils.create_hybrid_device_mesh`). Slices are the devices'
`slice_index` (multi-slice TPU), else their processes; a single process without slices (CPU)
simulates them as consecutive blocks of devices in id order. The usual choice is `dcn_data`:
only the data-parallel gradient all-reduce crosses DCN.
"""
from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh

DATA, FSDP, EXPERT, MODEL = "data", "fsdp", "expert", "model"
AXES = (DATA, FSDP, EXPERT, MODEL)
# mesh field -> the axis it splits over slices (DCN); `model` never crosses slices.
DCN_FIELDS = {"dcn_data": DATA, "dcn_fsdp": FSDP, "dcn_expert": EXPERT}
BATCH_AXES = (DATA, FSDP, EXPERT)  # the batch and routing groups; `model` never splits them

# Parameter sharding rules, (regex on the path "a/b/c", spec); see `moe_jax.parallel.sharding`.
# Expert banks (`moe_jax.moe.experts.ExpertBank`): E over `expert`, the hidden dimension F over
# `fsdp` (2-D: experts x hidden); fc2_bias `[E, D]` has no F.
PARAM_RULES = ((r"(^|/)experts/fc1_kernel$", (EXPERT, None, FSDP)),  # [E, D, F]
               (r"(^|/)experts/(fc1_bias|fc2_kernel)$", (EXPERT, FSDP)),  # [E, F], [E, F, D]
               (r"(^|/)experts(/|$)", (EXPERT,)),  # fc2_bias [E, D]
               # Depthwise convolution kernels [h, w, 1, C] (ConvNeXt) stay replicated: XLA's
               # SPMD partitioner turns a grouped convolution with sharded features into a
               # full-batch convolution on every device (all-gathered input, all-reduced output).
               (r"(^|/)dwconv/kernel$", ()),
               (r".*", FSDP))  # the rest: its largest dimension that `fsdp` divides


def default_config() -> ml_collections.ConfigDict:
  """The `mesh` node: devices per axis (-1 = all remaining devices, at most one axis), the
  parameter sharding rules `param_rules` (format in `moe_jax.parallel.sharding`) and
  `grad_reduce_dtype`, the dtype gradients are summed over the batch shards in ("float32", or
  "bfloat16" for half the bytes; `moe_jax.parallel.grad_precision`)."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, model=1,
                                        dcn_data=1, dcn_fsdp=1, dcn_expert=1,
                                        param_rules=PARAM_RULES, grad_reduce_dtype="float32"))


def batch_axes(mesh: AbstractMesh | Mesh) -> tuple[str, ...]:
  """The axes of `mesh` that the batch (and every routing group) is sharded over."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_shards(mesh: AbstractMesh | Mesh) -> int:
  """Number of batch shards: the product of the sizes of `batch_axes(mesh)`."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def target_platform() -> str:
  """The platform of the program being traced: the current mesh's devices' (`jax.set_mesh`;
  "tpu" when AOT-compiling for a TPU topology from a CPU host), else the host's backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return jax.default_backend() if device is None else device.platform


def dcn_shape(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Slices per axis (`dcn_*` fields; 1 for `model` and for absent fields)."""
  dcn = {a: 1 for a in AXES}
  for field, axis in DCN_FIELDS.items():
    n = config.get(field, 1)
    if not isinstance(n, int) or n < 1:
      raise ValueError(f"mesh.{field}={n!r}: the number of slices along `{axis}` must be an "
                       "integer >= 1")
    dcn[axis] = n
  return dcn


def num_slices(config: ml_collections.ConfigDict) -> int:
  return math.prod(dcn_shape(config).values())


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Axis sizes over all `num_devices` (ICI size x DCN slices): resolves -1 in the per-slice
  sizes and checks that they cover exactly the devices of each slice."""
  dcn = dcn_shape(config)
  slices = math.prod(dcn.values())
  if num_devices % slices:
    raise ValueError(f"mesh: {num_devices} devices cannot form {slices} slices (dcn_* = "
                     f"{ {f: dcn[a] for f, a in DCN_FIELDS.items()} }); make the product of the "
                     "mesh.dcn_* fields divide the device count")
  ici = ici_shape(config, num_devices // slices)
  return {a: ici[a] * dcn[a] for a in AXES}


def ici_shape(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Per-slice axis sizes: resolves -1 and checks that they cover exactly the `num_devices` of
  a slice."""
  sizes = {a: int(config.get(a, 1)) for a in AXES}
  free = [a for a, n in sizes.items() if n == -1]
  if len(free) > 1 or any(n == 0 or n < -1 for n in sizes.values()):
    raise ValueError(f"mesh: sizes {sizes} must be positive, with at most one -1 (= the rest)")
  fixed = math.prod(n for n in sizes.values() if n != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh: {num_devices} devices cannot be split into {sizes}; make the "
                       f"fixed axes' product ({fixed}) divide the device count")
    sizes[free[0]] = num_devices // fixed
  if sizes[MODEL] != 1:
    raise ValueError(f"mesh.model={sizes[MODEL]}: tensor parallelism over `model` is not "
                     "implemented; set mesh.model=1 (shard with mesh.fsdp / mesh.expert instead)")
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh: axes {sizes} cover {math.prod(sizes.values())} devices but there "
                     f"are {num_devices} (per slice); set one axis to -1 or fix the sizes")
  return sizes


def build_mesh(config: ml_collections.ConfigDict, *, num_experts: int | None = None,
               global_batch: int | None = None, devices=None) -> Mesh:
  """The mesh of `config` (axes `AXES`), checked against the model and batch."""
  devices = devices if devices is not None else jax.devices()
  sizes = mesh_shape(config, len(devices))
  if sizes[EXPERT] > 1 and num_experts is None:
    raise ValueError(f"mesh.expert={sizes[EXPERT]} > 1 but the model has no MoE layers; set "
                     "mesh.expert=1")
  if num_experts is not None and num_experts % sizes[EXPERT]:
    raise ValueError(f"mesh.expert={sizes[EXPERT]} must divide model.moe.num_experts="
                     f"{num_experts}")
  abstract = AbstractMesh(tuple(sizes.values()), AXES)
  shards = batch_shards(abstract)
  if global_batch is not None and global_batch % shards:
    axes = batch_axes(abstract)
    raise ValueError(f"batch_size={global_batch} must be divisible by the {shards} batch shards "
                     f"(mesh {'*'.join(axes)} = {'*'.join(str(sizes[a]) for a in axes)})")
  axis_types = (AxisType.Auto,) * len(AXES)
  if num_slices(config) == 1:
    return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=axis_types, devices=devices)
  ici = ici_shape(config, len(devices) // num_slices(config))
  grid = hybrid_device_grid(tuple(ici.values()), tuple(dcn_shape(config).values()), devices)
  return Mesh(grid, AXES, axis_types=axis_types)


def _has_slice_index(devices) -> bool:
  return all(getattr(d, "slice_index", None) is not None for d in devices)


def device_slices(devices, slices: int) -> list[int]:
  """The slice of each of `devices` (as `hybrid_device_grid` groups them): `slice_index`, else
  the process, else (one process, no slices) the block of consecutive ids."""
  if _has_slice_index(devices):
    return [d.slice_index for d in devices]
  if len({d.process_index for d in devices}) > 1:
    return [d.process_index for d in devices]
  rank = {d.id: i for i, d in enumerate(sorted(devices, key=lambda d: d.id))}
  return [rank[d.id] * slices // len(devices) for d in devices]


def hybrid_device_grid(ici: tuple[int, ...], dcn: tuple[int, ...], devices) -> np.ndarray:
  """Devices `[ici[i] * dcn[i] for i]`, slice-major along each axis: slices from the devices'
  `slice_index`, else from their processes (`mesh_utils.create_hybrid_device_mesh`); one process
  without slices (CPU) takes consecutive blocks of devices in id order as its slices."""
  slices = math.prod(dcn)
  has_slices = _has_slice_index(devices)
  if has_slices or len({d.process_index for d in devices}) > 1:
    try:
      return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                  process_is_granule=not has_slices,
                                                  allow_split_physical_axes=True)
    except ValueError as e:
      raise ValueError(f"mesh.dcn_*: {slices} slices of {math.prod(ici)} devices do not match "
                       f"the devices ({str(e).splitlines()[0]})") from None
  grid = np.array(sorted(devices, key=lambda d: d.id), dtype=object).reshape(dcn + ici)
  # Axis i of the result = (dcn axis i, ici axis i), the slice index outermost.
  n = len(ici)
  return grid.transpose([j for i in range(n) for j in (i, n + i)]).reshape(
      [d * i for d, i in zip(dcn, ici)])
