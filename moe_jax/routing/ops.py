"""Routing primitives that stay local to each device under a mesh.

GSPMD does not partition `lax.top_k` along batch dimensions: on a mesh it all-gathers the
gates first. Routing groups never interact, so under a mesh we run it per device instead.
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from moe_jax.parallel.mesh import batch_axes, batch_shards


def current_mesh() -> jax.sharding.AbstractMesh | None:
  """The mesh set with `jax.set_mesh`, or None when absent or a single device."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` over the last axis of `x [G, ...]`, per device when G is batch-sharded."""
  mesh = current_mesh()
  if mesh is None or x.shape[0] % batch_shards(mesh):
    return jax.lax.top_k(x, k)
  spec = P(batch_axes(mesh))
  return jax.shard_map(lambda v: tuple(jax.lax.top_k(v, k)), mesh=mesh, in_specs=spec,
                       out_specs=(spec, spec))(x)
