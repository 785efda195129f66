"""Device mesh from config, validated before anything compiles."""
from __future__ import annotations

import math

import jax
import ml_collections
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "expert", "model")


def default_config() -> ml_collections.ConfigDict:
  """The `mesh` node: devices per axis; -1 = all remaining devices (at most one axis)."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, model=1))


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
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh: axes {sizes} cover {math.prod(sizes.values())} devices but there "
                     f"are {num_devices}; set one axis to -1 or fix the sizes")
  return sizes


def build_mesh(config: ml_collections.ConfigDict, *, num_experts: int | None = None,
               global_batch: int | None = None, devices=None) -> Mesh:
  """The mesh of `config` (axes data, fsdp, expert, model), checked against the model and batch."""
  devices = devices if devices is not None else jax.devices()
  sizes = mesh_shape(config, len(devices))
  if sizes["expert"] > 1 and num_experts is None:
    raise ValueError(f"mesh.expert={sizes['expert']} > 1 but the model has no MoE layers; set "
                     "mesh.expert=1")
  if num_experts is not None and num_experts % sizes["expert"]:
    raise ValueError(f"mesh.expert={sizes['expert']} must divide model.moe.num_experts="
                     f"{num_experts}")
  shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  if global_batch is not None and global_batch % shards:
    raise ValueError(f"batch_size={global_batch} must be divisible by the {shards} batch shards "
                     f"(mesh data*fsdp*expert = {sizes['data']}*{sizes['fsdp']}*{sizes['expert']})")
  return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices)
