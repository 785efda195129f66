"""Device mesh from config, validated before anything compiles: the one home of the mesh axis
names and of the rule that the batch is sharded over `data`, `fsdp` and `expert`, never `model`.

What each axis shards (defaults, `PARAM_RULES`): the batch and every routing group over
`data` x `fsdp` x `expert`; an expert bank's experts E over `expert` and its hidden dimension F
over `fsdp` (so with fsdp=8, expert=1 each device holds 1/8 of every expert, gathered where the
layer runs); every other parameter's largest dimension that `fsdp` divides over `fsdp`. Optimizer
moments follow their parameters. `model` (tensor parallelism) is not implemented: a mesh with
model > 1 is refused.
"""
from __future__ import annotations

import math

import jax
import ml_collections
from jax.sharding import AbstractMesh, AxisType, Mesh

DATA, FSDP, EXPERT, MODEL = "data", "fsdp", "expert", "model"
AXES = (DATA, FSDP, EXPERT, MODEL)
BATCH_AXES = (DATA, FSDP, EXPERT)  # the batch and routing groups; `model` never splits them

# Parameter sharding rules, (regex on the path "a/b/c", spec); see `moe_jax.parallel.sharding`.
# Expert banks (`moe_jax.moe.experts.ExpertBank`): E over `expert`, the hidden dimension F over
# `fsdp` (2-D: experts x hidden); fc2_bias `[E, D]` has no F.
PARAM_RULES = ((r"(^|/)experts/fc1_kernel$", (EXPERT, None, FSDP)),  # [E, D, F]
               (r"(^|/)experts/(fc1_bias|fc2_kernel)$", (EXPERT, FSDP)),  # [E, F], [E, F, D]
               (r"(^|/)experts(/|$)", (EXPERT,)),  # fc2_bias [E, D]
               (r".*", FSDP))  # the rest: its largest dimension that `fsdp` divides


def default_config() -> ml_collections.ConfigDict:
  """The `mesh` node: devices per axis (-1 = all remaining devices, at most one axis), the
  parameter sharding rules `param_rules` (format in `moe_jax.parallel.sharding`) and
  `grad_reduce_dtype`, the dtype gradients are summed over the batch shards in ("float32", or
  "bfloat16" for half the bytes; `moe_jax.parallel.grad_precision`)."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, model=1,
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


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Resolves -1 and checks that the axes cover exactly `num_devices`."""
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
                     f"are {num_devices}; set one axis to -1 or fix the sizes")
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
  return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices)
