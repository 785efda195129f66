"""Expert parallelism: run a dispatch path per device inside `jax.shard_map`.

Under a mesh (`jax.set_mesh(mesh)`) with more than one device, the layer's dispatch runs on each
device's own routing groups: groups are sharded over the batch axes
(`moe_jax.parallel.mesh.batch_axes`: data, fsdp, expert) and expert weights over `expert`.
Every buffer-based path builds local buffers `[E, N, D]` (all E experts, this device's tokens);
`ExpertsOverAllToAll` sends each expert's slice to the device that holds it (`all_to_all` over
`expert` only), runs the local experts on `[E / EP, EP * N, D]` and sends the results back. Soft
MoE and expert choice group tokens per routing group exactly as on one device, so sharded ==
unsharded.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moe_jax.moe.experts import ExpertBank
from moe_jax.parallel.mesh import EXPERT, batch_axes, batch_shards
from moe_jax.routing.plan import RoutingPlan


def check_divisible(n: int, what: str, mesh: jax.sharding.AbstractMesh) -> None:
  """Raises a ValueError unless `n` (the size of the batch-sharded `what`) splits over the mesh."""
  shards = batch_shards(mesh)
  if n % shards:
    raise ValueError(f"MoE: {what}={n} cannot be split over the {shards} devices of mesh axes "
                     f"{batch_axes(mesh)}; make it divisible by {shards}")


class ExpertsOverAllToAll:
  """Stands in for the ExpertBank inside shard_map: `[E, N, D] -> [E, N, D]` via all_to_all."""

  def __init__(self, local: ExpertBank):
    self.local = local
    self.dtype = local.dtype

  def __call__(self, x: jax.Array, row_weights: jax.Array | None = None) -> jax.Array:
    """`x [E, N, D]` (and `row_weights [E, N]`, see `ExpertBank.__call__`) -> `[E, N, D]`; the
    local experts see `[E / EP, EP * N, D]`. The weights travel as an extra last column of the
    rows, so one all-to-all goes out and one comes back (and their two transposes)."""
    if row_weights is not None:
      x = jnp.concatenate([x, row_weights[..., None].astype(x.dtype)], axis=-1)
    x = jax.lax.all_to_all(x, EXPERT, split_axis=0, concat_axis=1, tiled=True)
    if row_weights is not None:
      x, row_weights = x[..., :-1], x[..., -1]
    y = self.local(x, row_weights)
    return jax.lax.all_to_all(y, EXPERT, split_axis=1, concat_axis=0, tiled=True)


def expert_shards(mesh: jax.sharding.AbstractMesh | None) -> int:
  """Size of the mesh's `expert` axis (1 without a mesh)."""
  return 1 if mesh is None else mesh.shape.get(EXPERT, 1)


def dispatch(dispatch_fn: Callable[..., tuple[jax.Array, dict]], plan: RoutingPlan,
             groups: jax.Array, experts: ExpertBank, mesh: jax.sharding.AbstractMesh,
             **kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`dispatch_fn(plan, groups [G, S, D], experts, **kwargs)` run per device under `mesh`."""
  axes = batch_axes(mesh)
  check_divisible(groups.shape[0], "number of routing groups (batch*tokens/group_size)", mesh)
  ep = expert_shards(mesh)
  if experts.num_experts % ep:
    raise ValueError(f"MoE: num_experts={experts.num_experts} must be divisible by the mesh "
                     f"axis {EXPERT!r}={ep}")
  if ep > 1 and experts.dropout.rate > 0:
    raise ValueError("MoE: dropout_rate > 0 is not supported with expert parallelism yet; set "
                     "dropout_rate=0 or an expert axis of size 1")
  graphdef, params, rest = nnx.split(experts, nnx.Param, ...)
  param_specs = jax.tree.map(lambda _: P(EXPERT) if ep > 1 else P(), params)
  rest_specs = jax.tree.map(lambda _: P(), rest)
  plan = plan.replace(aux_losses={}, metrics={})
  plan_specs = jax.tree.map(lambda _: P(axes), plan)

  def per_device(plan, groups, params, rest):
    local = nnx.merge(graphdef, params, rest, copy=True)
    y, metrics = dispatch_fn(plan, groups, ExpertsOverAllToAll(local) if ep > 1 else local,
                             **kwargs)
    return y, jax.tree.map(lambda m: jax.lax.pmean(m, axes), metrics)

  return jax.shard_map(per_device, mesh=mesh,
                       in_specs=(plan_specs, P(axes), param_specs, rest_specs),
                       out_specs=(P(axes), P()))(plan, groups, params, rest)
