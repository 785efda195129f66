"""Expert parallelism: run a dispatch path per device inside `jax.shard_map`.

Under a mesh (`jax.set_mesh(mesh)`) with more than one device, the layer's dispatch runs on each
device's own routing groups: groups are sharded over the batch axes
(`moe_jax.parallel.mesh.batch_axes`: data, fsdp, expert) and expert weights over `expert`
(their hidden dimension F enters split over `fsdp`, as `mesh.PARAM_RULES` stores it, and is
all-gathered inside, so the gradient's sum over `fsdp` is a reduce-scatter to the shard). Every buffer-based path builds local buffers `[E, N, D]` (all E experts, this device's
tokens); `ExpertsOverAllToAll` sends each expert's slice to the device that holds it
(`all_to_all` over `expert` only), runs the local experts on `[E / EP, EP * N, D]` and sends the
results back. Soft MoE and expert choice group tokens per routing group exactly as on one device,
so sharded == unsharded.

Dropless token choice (`ragged_dropless(mesh)`: an expert axis > 1 on a platform whose XLA
implements `ragged-all-to-all`, TPU and GPU): `ExpertsOverRaggedAllToAll` sends each device
exactly the expert-sorted rows routed to its experts (`jax.lax.ragged_all_to_all`), runs them
through the grouped matmul and sends them back, so the bytes moved and the FLOPs are those of
the routed rows. Its receive buffer is bounded (`dropless.ragged_buffer_factor` x the rows of a
device); rows past it go in further rounds, never dropped. XLA:CPU lacks the collective; there
`dropless_as_capacity` runs capacity buffers with room for every token (nothing dropped, E/k
times the rows of cf = 1).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moe_jax.moe import grouped_matmul
from moe_jax.moe.experts import ExpertBank
from moe_jax.parallel.grad_precision import sum_to_primal_type
from moe_jax.parallel.mesh import EXPERT, FSDP, batch_axes, batch_shards, target_platform
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


# The name scope of the rounds' while loops (in the compiled program's op names).
ROUNDS_SCOPE = "ragged_rounds"

# Receive windows are a whole number of these rows: for TPU v5p, XLA compiled a ragged dot over
# 2580 rows (not a multiple of 16, the bf16 sublane tile) to a dense product per local expert
# (2.1x the FLOPs of the grouped kernel it used at 2592 rows; bench/RESULTS.md).
WINDOW_ROW_TILE = 16


def window_rows(buffer_factor: float, rows: int, expert_shards: int) -> int:
  """The receive window R: `ceil(f P)` rows (f = buffer_factor, P = rows) rounded up to
  `WINDOW_ROW_TILE`, at most `EP P` (every row of every device: always one round)."""
  tile = WINDOW_ROW_TILE
  return min(-(-math.ceil(buffer_factor * rows) // tile) * tile, expert_shards * rows)

# The row exchange of `ExpertsOverRaggedAllToAll`: a module attribute, so that tests on XLA:CPU
# (which lacks the collective) can put an emulation of its documented semantics in its place.
exchange_rows = jax.lax.ragged_all_to_all


class ExpertsOverRaggedAllToAll:
  """Stands in for the ExpertBank inside shard_map on the dropless path:
  `grouped(x [P, D], group_sizes [E]) -> [P, D_out]` over this device's expert-sorted rows, each
  expert's rows computed on the device that holds it (experts `[i E_l, (i+1) E_l)` on device i
  of the `expert` axis, `E_l = E / EP`).

  Receive buffer: a window of `R = ceil(f P)` rows (rounded up to `WINDOW_ROW_TILE`, at most
  EP P), `f = buffer_factor` (`dropless.ragged_buffer_factor`, default 2.0). Every device knows
  the whole count matrix `[source, destination, E_l]` (one all_gather of the group sizes). The
  rows a destination receives form one stream, source-major (each source's part expert-sorted,
  as it sits in the source's rows); round r delivers positions `[r R, (r+1) R)` of every
  destination's stream at once: each source sends each destination the part of its rows for it
  that falls in that window (offsets and sizes from the count matrix, the same arithmetic on
  every device) with one `ragged_all_to_all`; the destination sorts the window's rows by
  expert, runs the grouped matmul on them (the window's group sizes) and a second
  `ragged_all_to_all` writes the results back into the sources' output rows (it keeps the rows
  it does not write, so the output accumulates over the rounds). Rounds:
  `ceil(max_d received_d / R)`, the max over the mesh (every device runs the same number, so
  the collectives line up), a traced value.

  Imbalance never drops a row: a destination that receives more than R rows takes more rounds
  (latency: two exchanges and one grouped matmul per round, on every device); balanced routing
  (a device receives about P rows: its share of every device's rows, block padding included)
  fits one round with f >= 1, and f = 2 leaves room for a destination receiving twice its share;
  f >= EP is always one round (the worst case, every row of every device routed here). MaxText
  sizes its receive buffers alike (`ragged_buffer_factor` x the balanced size) but drops the rows
  past them; here they wait for the next round.

  Gradients (custom VJP; `lax.while_loop` has none, and a scan over the worst-case number of
  rounds would save worst-case residuals): the backward runs the same rounds. The x rows and the
  output cotangent's rows go to the expert devices together, the local grouped computation is
  recomputed and differentiated there (`jax.vjp`), its weight gradients accumulate over the
  rounds (summed over the other batch axes once, at the end) and the rows' gradients go back.
  Residuals: x and the weights only, no per-round activations; the price is the recomputed
  expert forward (one forward's FLOPs more, as with remat) and the x rows crossing once more.
  """

  def __init__(self, local: ExpertBank, buffer_factor: float):
    self.local = local
    self.dtype = local.dtype
    self.buffer_factor = buffer_factor

  def grouped(self, x: jax.Array, group_sizes: jax.Array, backend: str, block_size: int,
              row_weights: jax.Array | None = None) -> jax.Array:
    """`row_weights [P]` (see `ExpertBank.grouped`) travel as an extra last column of the rows."""
    width = x.shape[-1]
    if row_weights is not None:
      x = jnp.concatenate([x, row_weights[:, None].astype(x.dtype)], axis=-1)
    graphdef, params, rest = nnx.split(self.local, nnx.Param, ...)

    def local_grouped(params, rows: jax.Array, sizes: jax.Array) -> jax.Array:
      """This device's experts on expert-sorted window rows `[R, D(+1)]` -> `[R, D_out]`."""
      weights = None if row_weights is None else rows[:, width]
      return nnx.merge(graphdef, params, rest).grouped(rows[:, :width], sizes, backend,
                                                       block_size, weights)

    window = window_rows(self.buffer_factor, x.shape[0], jax.lax.axis_size(EXPERT))
    out = jax.ShapeDtypeStruct((self.local.fc2_kernel.shape[-1],), jnp.dtype(self.dtype))
    return _in_rounds(local_grouped, window, out, x, params, group_sizes.astype(jnp.int32))


def _manual_axes(x: jax.Array) -> frozenset:
  """The manual mesh axes `x` varies over inside `shard_map`."""
  return jax.typeof(x).manual_axis_type.varying


def _vary_like(tree, like: jax.Array):
  """`tree`'s arrays typed as varying over every manual mesh axis that `like` varies over."""
  axes = _manual_axes(like)
  return jax.tree.map(
      lambda a: jax.lax.pcast(a, tuple(sorted(axes - _manual_axes(a))), to="varying"), tree)


def _exclusive_cumsum(a: jax.Array, axis: int) -> jax.Array:
  return jnp.cumsum(a, axis) - a


class RaggedLayout(NamedTuple):
  """Where every device's rows go, from the count matrix; the same on every device. Shapes
  `[source, destination]` (indices on the `expert` axis), E_l local experts."""
  counts: jax.Array  # [source, destination, E_l]: rows s sends d for d's expert e
  totals: jax.Array  # [source, destination]
  stream_start: jax.Array  # [source, destination]: where s's rows start in d's received stream
  send_start: jax.Array  # [source, destination]: where s's rows for d start in s's own rows
  rounds: jax.Array  # []: ceil(max_d received_d / R)


def ragged_layout(counts: jax.Array, window: int) -> RaggedLayout:
  """`counts [source, destination, E_l]` and the window R -> the `RaggedLayout` of the exchange."""
  totals = counts.sum(2)
  rounds = -(-jnp.max(totals.sum(0)) // window)
  return RaggedLayout(counts, totals, _exclusive_cumsum(totals, 0),
                      _exclusive_cumsum(totals, 1), rounds.astype(jnp.int32))


def ragged_round(layout: RaggedLayout, r: jax.Array, window: int):
  """Round r's pieces, each `[source, destination]`: the rows s sends d, where they start in s's
  rows and where they land in d's window (offsets 0 for empty pieces)."""
  lo = r * window
  start = jnp.clip(layout.stream_start, lo, lo + window)
  size = jnp.clip(layout.stream_start + layout.totals, lo, lo + window) - start
  at_source = jnp.where(size > 0, layout.send_start + start - layout.stream_start, 0)
  at_window = jnp.where(size > 0, start - lo, 0)
  return size, at_source, at_window


def _window_by_expert(layout: RaggedLayout, me: jax.Array, r: jax.Array, window: int):
  """(the order `[R]` that sorts destination `me`'s round-r window rows by local expert, rows
  past those it receives last; the window's group sizes `[E_l]`)."""
  from_source = layout.counts[:, me]  # [source, E_l]
  local_experts = from_source.shape[1]
  segment = grouped_matmul.row_groups(from_source.reshape(-1), window, r * window)
  expert = jnp.where(segment < from_source.size, segment % local_experts, local_experts)
  sizes = jnp.zeros((local_experts + 1,), jnp.int32).at[expert].add(1)[:local_experts]
  return jnp.argsort(expert, stable=True), sizes


def _start_rounds(window: int, x: jax.Array, group_sizes: jax.Array):
  """(this device's index on `expert`, the layout, an exchange of round r's rows to the experts,
  the exchange of their results back)."""
  ep, me = jax.lax.axis_size(EXPERT), jax.lax.axis_index(EXPERT)
  layout = ragged_layout(jax.lax.all_gather(group_sizes.reshape(ep, -1), EXPERT), window)
  rounds = layout.rounds
  axes = tuple(sorted(_manual_axes(rounds)))
  layout = layout._replace(rounds=jax.lax.pmax(rounds, axes) if axes else rounds)

  def to_experts(r, operand):
    """This device's rows `[P, W]` -> its round-r window `[R, W]` (zeros past what it gets)."""
    size, at_source, at_window = ragged_round(layout, r, window)
    buffer = _vary_like(jnp.zeros((window, operand.shape[1]), operand.dtype), operand)
    return exchange_rows(operand, buffer, at_source[me], size[me], at_window[me], size[:, me],
                         axis_name=EXPERT)

  def back(r, results, out):
    """Window rows `results [R, W]` written into their sources' rows `out [P, W]`."""
    size, at_source, at_window = ragged_round(layout, r, window)
    return exchange_rows(results, out, at_window[:, me], size[:, me], at_source[:, me],
                         size[me], axis_name=EXPERT)

  return me, layout, to_experts, back


def _unsort(sorted_rows: jax.Array, order: jax.Array) -> jax.Array:
  return jnp.zeros_like(sorted_rows).at[order].set(sorted_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _in_rounds(local_grouped: Callable, window: int, out: jax.ShapeDtypeStruct, x: jax.Array,
               params, group_sizes: jax.Array) -> jax.Array:
  """`local_grouped(params, rows [R, W], sizes [E_l]) -> [R, D_out]` over every device's rows
  `x [P, W]`, in rounds of R-row windows (see `ExpertsOverRaggedAllToAll`): `[P, D_out]`."""
  me, layout, to_experts, back = _start_rounds(window, x, group_sizes)
  params = _vary_like(params, x)

  def one_round(carry):
    r, y = carry
    order, sizes = _window_by_expert(layout, me, r, window)
    results = local_grouped(params, to_experts(r, x)[order], sizes)
    return r + 1, back(r, _unsort(results, order), y)

  y = _vary_like(jnp.zeros((x.shape[0],) + out.shape, out.dtype), x)
  with jax.named_scope(ROUNDS_SCOPE):
    return jax.lax.while_loop(lambda c: c[0] < layout.rounds, one_round, (jnp.int32(0), y))[1]


def _in_rounds_fwd(local_grouped, window, out, x, params, group_sizes):
  return _in_rounds(local_grouped, window, out, x, params, group_sizes), (x, params, group_sizes)


def _in_rounds_bwd(local_grouped, window, out, residuals, dy):
  x, params, group_sizes = residuals
  me, layout, to_experts, back = _start_rounds(window, x, group_sizes)
  width = x.shape[1]
  # x and dy rows travel together, in one exchange (in the wider dtype; both are the experts'
  # compute dtype on the layer's path).
  both = jnp.concatenate([x, dy], axis=1, dtype=jnp.result_type(x, dy))
  varying = _vary_like(params, x)  # summed over the other batch axes once, after the rounds

  def one_round(carry):
    r, dx, d_params = carry
    order, sizes = _window_by_expert(layout, me, r, window)
    received = to_experts(r, both)[order]
    rows, d_rows = received[:, :width].astype(x.dtype), received[:, width:].astype(dy.dtype)
    _, vjp = jax.vjp(lambda p, received_rows: local_grouped(p, received_rows, sizes), varying,
                     rows)
    d_params_round, d_window = vjp(d_rows)
    d_params = jax.tree.map(jnp.add, d_params, d_params_round)
    return r + 1, back(r, _unsort(d_window, order), dx), d_params

  init = (jnp.int32(0), _vary_like(jnp.zeros_like(x), x),
          jax.tree.map(lambda p: _vary_like(jnp.zeros_like(p), x), varying))
  with jax.named_scope(ROUNDS_SCOPE):
    _, dx, d_params = jax.lax.while_loop(lambda c: c[0] < layout.rounds, one_round, init)
  return dx, jax.tree.map(sum_to_primal_type, d_params, params), None


_in_rounds.defvjp(_in_rounds_fwd, _in_rounds_bwd)


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


# The hidden dimension F of an expert bank's parameters, which `mesh.PARAM_RULES` shards over
# `fsdp`: fc1_kernel [E, D, F], fc1_bias [E, F], fc2_kernel [E, F, D] (fc2_bias [E, D] has none).
BANK_HIDDEN_AXIS = {"fc1_kernel": 2, "fc1_bias": 1, "fc2_kernel": 1}


def fsdp_hidden_axis(path: tuple, shape: tuple[int, ...], fsdp: int) -> int:
  """The axis of an expert-bank parameter (`path` in the bank's state) that enters the MoE
  shard_map split over `fsdp`: its F when `fsdp` > 1 divides it, else -1 (whole)."""
  names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  axis = next((BANK_HIDDEN_AXIS[n] for n in names if n in BANK_HIDDEN_AXIS), -1)
  return axis if fsdp > 1 and axis >= 0 and shape[axis] % fsdp == 0 else -1


def bank_spec(rank: int, over_experts: bool, hidden_axis: int) -> P:
  """shard_map spec of an expert-bank parameter: E over `expert` (when EP > 1), F over `fsdp`
  (`hidden_axis` >= 0)."""
  spec = [EXPERT if over_experts else None] + [None] * (rank - 1)
  if hidden_axis >= 0:
    spec[hidden_axis] = FSDP
  return P(*spec)


def dispatch(dispatch_fn: Callable[..., tuple[jax.Array, dict]], plan: RoutingPlan,
             groups: jax.Array, experts: ExpertBank, mesh: jax.sharding.AbstractMesh, *,
             ragged_buffer_factor: float | None = None,
             **kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`dispatch_fn(plan, groups [G, S, D], experts, **kwargs)` run per device under `mesh`;
  `ragged_buffer_factor`: the experts exchange rows with `ExpertsOverRaggedAllToAll` and a
  receive window of that factor times the rows (dropless dispatch); None: `ExpertsOverAllToAll`."""
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
  fsdp = mesh.shape.get(FSDP, 1)
  hidden_axes = jax.tree_util.tree_map_with_path(
      lambda path, x: fsdp_hidden_axis(path, x.shape, fsdp), params)
  param_specs = jax.tree.map(lambda x, axis: bank_spec(len(x.shape), ep > 1, axis),
                             params, hidden_axes)
  rest_specs = jax.tree.map(lambda _: P(), rest)
  plan = plan.replace(aux_losses={}, metrics={})
  plan_specs = jax.tree.map(lambda _: P(axes), plan)

  def per_device(plan, groups, params, rest):
    # Gathered here (not before the shard_map), so the gradient's sum over `fsdp` is the
    # transpose of this all_gather: a reduce-scatter to the shard, not an all-reduce.
    params = jax.tree.map(
        lambda x, axis: x if axis < 0 else jax.lax.all_gather(x, FSDP, axis=axis, tiled=True),
        params, hidden_axes)
    local = nnx.merge(graphdef, params, rest, copy=True)
    if ep > 1:
      local = (ExpertsOverAllToAll(local) if ragged_buffer_factor is None else
               ExpertsOverRaggedAllToAll(local, ragged_buffer_factor))
    y, metrics = dispatch_fn(plan, groups, local, **kwargs)
    return y, jax.tree.map(lambda m: jax.lax.pmean(m, axes), metrics)

  return jax.shard_map(per_device, mesh=mesh,
                       in_specs=(plan_specs, P(axes), param_specs, rest_specs),
                       out_specs=(P(axes), P()))(plan, groups, params, rest)
