"""Expert parallelism: run a dispatch path per device inside `jax.shard_map`.

Under a mesh (`jax.set_mesh(mesh)`) with more than one device, the layer's dispatch runs on each
device's own routing groups: groups are sharded over the batch axes
(`moe_jax.parallel.mesh.batch_axes`: data, fsdp, expert) and expert weights over `expert`
(their `fsdp` shards are gathered on the way in, so gradients are reduce-scattered on the way
out). Every buffer-based path builds local buffers `[E, N, D]` (all E experts, this device's
tokens); `ExpertsOverAllToAll` sends each expert's slice to the device that holds it
(`all_to_all` over `expert` only), runs the local experts on `[E / EP, EP * N, D]` and sends the
results back. Soft MoE and expert choice group tokens per routing group exactly as on one device,
so sharded == unsharded.

Dropless token choice (`ragged_dropless(mesh)`: an expert axis > 1 on a platform whose XLA
implements `ragged-all-to-all`, TPU and GPU): `ExpertsOverRaggedAllToAll` sends each device
exactly the expert-sorted rows routed to its experts (`jax.lax.ragged_all_to_all`), runs them
through the grouped matmul and sends them back, so the bytes moved and the FLOPs are those of
the routed rows. XLA:CPU lacks the collective; there `dropless_as_capacity` runs capacity
buffers with room for every token (nothing dropped, E/k times the rows of cf = 1).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moe_jax.moe import grouped_matmul
from moe_jax.moe.experts import ExpertBank
from moe_jax.parallel.mesh import EXPERT, batch_axes, batch_shards, target_platform
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


class ExpertsOverRaggedAllToAll:
  """Stands in for the ExpertBank inside shard_map on the dropless path:
  `grouped(x [P, D], group_sizes [E]) -> [P, D]` over this device's expert-sorted rows, each
  expert's rows computed on the device that holds it (experts `[i E_l, (i+1) E_l)` on device i
  of the `expert` axis, `E_l = E / EP`).

  The receive buffer has room for `EP * P` rows (every row of every device could be routed to
  this device's experts), so nothing is ever dropped; only routed rows (and the dispatcher's
  block padding) cross devices and reach the grouped matmul.
  """

  def __init__(self, local: ExpertBank):
    self.local = local
    self.dtype = local.dtype

  def grouped(self, x: jax.Array, group_sizes: jax.Array, backend: str, block_size: int,
              row_weights: jax.Array | None = None) -> jax.Array:
    """`row_weights [P]` (see `ExpertBank.grouped`) travel as an extra last column of the rows."""
    width = x.shape[-1]
    if row_weights is not None:
      x = jnp.concatenate([x, row_weights[:, None].astype(x.dtype)], axis=-1)
    ep, me = jax.lax.axis_size(EXPERT), jax.lax.axis_index(EXPERT)
    local_experts = group_sizes.shape[0] // ep
    sizes = group_sizes.astype(jnp.int32).reshape(ep, local_experts)  # [destination, E_l]
    send = sizes.sum(1)
    send_offsets = jnp.cumsum(send) - send  # where each destination's rows start in x
    every = jax.lax.all_gather(sizes, EXPERT)  # [source, destination, E_l]
    totals = every.sum(2)
    # Rows land on a destination in source order: after those of the sources before us.
    land_offsets = (jnp.cumsum(totals, axis=0) - totals)[me]  # [destination]
    from_source = every[:, me]  # [source, E_l]: rows this device gets, by source and expert
    recv = from_source.sum(1)
    recv_offsets = jnp.cumsum(recv) - recv
    rows = ep * x.shape[0]
    received = jax.lax.ragged_all_to_all(
        x, jnp.zeros((rows,) + x.shape[1:], x.dtype), send_offsets, send, land_offsets, recv,
        axis_name=EXPERT)
    # Received rows are source-major (each source's rows expert-sorted): sort them by expert.
    segment = grouped_matmul.row_groups(from_source.reshape(-1), rows)  # ep*E_l past the end
    expert = jnp.where(segment < ep * local_experts, segment % local_experts, local_experts)
    order = jnp.argsort(expert, stable=True)
    received = received[order]
    weights = None if row_weights is None else received[:, width]
    y = self.local.grouped(received[:, :width], from_source.sum(0), backend, block_size, weights)
    y = y[jnp.argsort(order)]
    back_offsets = jax.lax.all_gather(send_offsets, EXPERT)[:, me]  # [source]
    return jax.lax.ragged_all_to_all(y, jnp.zeros((x.shape[0], y.shape[-1]), y.dtype),
                                     recv_offsets, recv, back_offsets, send, axis_name=EXPERT)


# Platforms whose XLA implements ragged-all-to-all (XLA:CPU does not: UNIMPLEMENTED at run time).
RAGGED_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")


def expert_shards(mesh: jax.sharding.AbstractMesh | None) -> int:
  """Size of the mesh's `expert` axis (1 without a mesh)."""
  return 1 if mesh is None else mesh.shape.get(EXPERT, 1)


def ragged_dropless(mesh: jax.sharding.AbstractMesh | None) -> bool:
  """Whether dropless token choice under `mesh` uses `ExpertsOverRaggedAllToAll`: an expert axis
  > 1, compiled for a platform of `RAGGED_PLATFORMS` (the target's, also under AOT)."""
  return expert_shards(mesh) > 1 and target_platform() in RAGGED_PLATFORMS


def dropless_as_capacity(num_experts: int, k: int) -> tuple[str, float]:
  """(mode, capacity_factor) that stand in for dropless where buffers crossing devices need
  static shapes: every expert gets room for all S tokens of a group (a token's K experts are
  distinct), so still no token is dropped."""
  return "capacity", num_experts / k


def dispatch(dispatch_fn: Callable[..., tuple[jax.Array, dict]], plan: RoutingPlan,
             groups: jax.Array, experts: ExpertBank, mesh: jax.sharding.AbstractMesh, *,
             ragged: bool = False, **kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`dispatch_fn(plan, groups [G, S, D], experts, **kwargs)` run per device under `mesh`;
  `ragged`: the experts exchange rows with `ExpertsOverRaggedAllToAll` (dropless dispatch)."""
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
    wrapper = ExpertsOverRaggedAllToAll if ragged else ExpertsOverAllToAll
    y, metrics = dispatch_fn(plan, groups, wrapper(local) if ep > 1 else local, **kwargs)
    return y, jax.tree.map(lambda m: jax.lax.pmean(m, axes), metrics)

  return jax.shard_map(per_device, mesh=mesh,
                       in_specs=(plan_specs, P(axes), param_specs, rest_specs),
                       out_specs=(P(axes), P()))(plan, groups, params, rest)
