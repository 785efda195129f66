"""Grouped matrix multiply over expert-sorted rows (the dropless path's compute).

Backends:
- ``ragged_dot``: `jax.lax.ragged_dot`, a real grouped GEMM on TPU; on CPU (and in XLA's default
  GPU lowering) it expands to a zero-padded dense product, about E times the work.
- ``blocked``: a loop over groups reads each group's weight matrix once and multiplies the group's
  rows in tiles: as many of the largest tile (512 rows) as fit — a loop with a data-dependent
  trip count — then the binary decomposition of the rest down to 128 rows, then one masked tile
  (the smallest power-of-two multiple of `block_size` that covers what is left; rows outside the
  group are zeroed on the way in and not written on the way out). So most rows go through large,
  efficient matmuls, the work wasted per group is below one small tile (none when the dispatcher
  pads each group to a multiple of `block_size` and the remainder is a power of two), and rows past
  `sum(group_sizes)` are never visited and stay zero. The backward pass (custom VJP; nothing is
  differentiated through the loops) is the same loop for `d_lhs = gmm(d_out, rhs^T)` and a
  per-group sum of `lhs_tile^T @ d_out_tile` for `d_rhs` ("tgmm", with tiles up to 1024 rows:
  each tile costs a `[K, N]` accumulation, added in place into `d_rhs[e]`).
- ``auto``: ``ragged_dot`` on TPU, ``blocked`` elsewhere: the platform compiled for
  (`moe_jax.parallel.mesh.target_platform`, so an AOT compile for TPU gets ``ragged_dot``).

Alternatives measured on CPU (bench/gmm.py, bench/RESULTS.md): one loop over blocks reading
each block's weights by index (`lax.fori_loop` or `lax.scan` + `lax.cond`), a batched matmul over
`[E, max_blocks, ...]` (needs a static bound, so E times the work when groups are skewed), and
plain `block_size`-row blocks without the tile ladder.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_jax.parallel.grad_precision import f32_product_operands, sum_to_primal_type
from moe_jax.parallel.mesh import target_platform

# Tile sizes in rows (powers of two times block_size, capped by the row count). A group's rows are
# multiplied in full tiles — as many of the largest size as fit, then the binary decomposition of
# the rest down to the smallest "full" size — and what is left (fewer rows than that) in one
# masked tile of the smallest size that covers it. d_rhs accumulates a `[K, N]` sum per tile, so
# its largest tile is larger (fewer accumulations); its smallest full tile is not: a masked tile of
# 256 rows for a remainder of 129-255 cost more than the extra accumulation (bench/RESULTS.md).
TILES = dict(gmm=(512, 128), tgmm=(1024, 128))  # (largest tile, smallest full tile)


def row_groups(group_sizes: jax.Array, num_rows: int, first_row: jax.Array | int = 0) -> jax.Array:
  """The group of rows `[first_row, first_row + num_rows)`: `[E] -> [num_rows]` int32, E (out of
  range) for rows past the total."""
  ends = jnp.cumsum(group_sizes)
  rows = first_row + jnp.arange(num_rows)
  return jnp.searchsorted(ends, rows, side="right").astype(jnp.int32)


def _tile_sizes(block: int, num_rows: int, largest: int, smallest_full: int):
  """(full tile sizes, largest first; masked tile sizes, smallest first)."""
  ladder = [block]
  while ladder[-1] * 2 <= min(largest, num_rows):
    ladder.append(ladder[-1] * 2)
  ladder = [min(s, num_rows) for s in ladder]
  full = [s for s in ladder if s >= smallest_full] or ladder[-1:]
  masked = [s for s in ladder if s <= full[-1]]
  return full[::-1], masked


def _group_tiles(start, n, num_rows: int, block: int, kind: str, full_tile, masked_tile, carry):
  """Runs `full_tile(start, size, carry)` / `masked_tile(start, size, valid, carry)` over the
  tiles of the rows `[start, start + n)` (sizes static; `valid` rows of a masked tile count)."""
  full, masked = _tile_sizes(block, num_rows, *TILES[kind])
  top = full[0]
  carry = jax.lax.fori_loop(0, n // top, lambda i, c: full_tile(start + i * top, top, c), carry)
  start, rem = start + n // top * top, n % top
  for size in full[1:]:  # binary decomposition: at most one tile of each smaller full size
    take = _opaque(rem // size)
    carry = jax.lax.fori_loop(0, take, lambda i, c, s=start, z=size: full_tile(s + i * z, z, c),
                              carry)
    start, rem = start + take * size, rem - take * size
  # rem < full[-1]: one masked tile of the smallest size >= rem (none when rem == 0). Written as
  # loops of 0 or 1 trips, not lax.switch: XLA:CPU copies the whole carried output into and out
  # of every conditional (and rewrites loops it can prove run at most once into conditionals,
  # hence the optimization barrier on the trip counts). Loop bodies use the loop index (always 0
  # here), or XLA hoists their matmul out of the loop and runs it even for 0 trips.
  smaller = jnp.sum(jnp.asarray(masked[:-1]) < rem)  # index of the size to use
  for i, size in enumerate(masked):
    take = _opaque(((rem > 0) & (smaller == i)).astype(rem.dtype))
    carry = jax.lax.fori_loop(0, take, lambda i, c, s=start, z=size: masked_tile(s + i, z, rem, c),
                              carry)
  return carry


def _zeros_like_varying(shape: tuple[int, ...], dtype, like: jax.Array) -> jax.Array:
  """Zeros that vary over the same manual mesh axes as `like` (a loop carry must keep its type
  inside `shard_map`, and the products accumulated into it vary like the rows)."""
  return jnp.zeros(shape, dtype) + (like.ravel()[0] * 0).astype(dtype)


def _opaque(trip_count):
  return jax.lax.optimization_barrier(trip_count)


def _masked_slice(a: jax.Array, start, size: int, valid):
  """Rows `[start, start + size)` of `a` (shifted back to fit), zeroed outside the `valid` rows
  from `start`; also returns the slice start and the row mask."""
  begin = jnp.minimum(start, a.shape[0] - size)
  rows = begin + jnp.arange(size)
  mask = (rows >= start) & (rows < start + valid)
  tile = jax.lax.dynamic_slice_in_dim(a, begin, size)
  return jnp.where(mask[:, None], tile, jnp.zeros((), a.dtype)), begin, mask


def _gmm_loop(x: jax.Array, rhs: jax.Array, group_sizes: jax.Array, block: int,
              transpose_rhs: bool) -> jax.Array:
  """`out[r] = x[r] @ rhs[e]` (or `rhs[e].T`) for each row r of group e; zeros past the total."""
  x, rhs = jnp.asarray(x), jnp.asarray(rhs)
  P = x.shape[0]
  n_out = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))
  out_dtype = x.dtype
  offsets = jnp.cumsum(group_sizes) - group_sizes

  def group(e, out):
    w = rhs[e].astype(x.dtype)  # sliced (and cast) once per group, outside the tile loops
    prod = lambda tile: jax.lax.dot_general(tile, w, dims, preferred_element_type=jnp.float32)

    def full_tile(start, size, out):
      y = prod(jax.lax.dynamic_slice_in_dim(x, start, size))
      return jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), start, 0)

    def masked_tile(start, size, valid, out):
      tile, begin, mask = _masked_slice(x, start, size, valid)
      old = jax.lax.dynamic_slice_in_dim(out, begin, size)
      y = jnp.where(mask[:, None], prod(tile).astype(out.dtype), old)
      return jax.lax.dynamic_update_slice_in_dim(out, y, begin, 0)

    return _group_tiles(offsets[e], group_sizes[e], P, block, "gmm", full_tile, masked_tile, out)

  return jax.lax.fori_loop(0, rhs.shape[0], group, _zeros_like_varying((P, n_out), out_dtype, x))


def _tgmm_loop(x: jax.Array, g: jax.Array, group_sizes: jax.Array, block: int,
               num_groups: int, out_dtype) -> jax.Array:
  """`d_rhs[e] = sum over rows r of group e of outer(x[r], g[r])`: `[E, K, N]`.

  Each tile's product is added straight into `d_rhs[e]` (an in-place update of the loop carry):
  no per-group accumulator to zero and copy back.
  """
  x, g = jnp.asarray(x), jnp.asarray(g)
  P, K = x.shape
  N = g.shape[1]
  offsets = jnp.cumsum(group_sizes) - group_sizes
  dims = (((0,), (0,)), ((), ()))

  def group(e, d_rhs):
    def add(xt, gt, d_rhs):
      prod = jax.lax.dot_general(xt, gt, dims, preferred_element_type=jnp.float32)
      return d_rhs.at[e].add(prod.astype(out_dtype))

    def full_tile(start, size, d_rhs):
      return add(jax.lax.dynamic_slice_in_dim(x, start, size),
                 jax.lax.dynamic_slice_in_dim(g, start, size), d_rhs)

    def masked_tile(start, size, valid, d_rhs):
      xt, begin, _ = _masked_slice(x, start, size, valid)
      return add(xt, jax.lax.dynamic_slice_in_dim(g, begin, size), d_rhs)

    return _group_tiles(offsets[e], group_sizes[e], P, block, "tgmm", full_tile, masked_tile,
                        d_rhs)

  return jax.lax.fori_loop(0, num_groups, group,
                           _zeros_like_varying((num_groups, K, N), out_dtype, x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, block: int) -> jax.Array:
  return _gmm_loop(lhs, rhs, group_sizes, block, transpose_rhs=False)


def _blocked_fwd(lhs, rhs, group_sizes, block):
  return _blocked(lhs, rhs, group_sizes, block), (lhs, rhs, group_sizes)


def _blocked_bwd(block, residuals, d_out):
  lhs, rhs, group_sizes = residuals
  d_lhs = _gmm_loop(d_out, rhs, group_sizes, block, transpose_rhs=True)
  d_rhs = _tgmm_loop(lhs, d_out, group_sizes, block, rhs.shape[0], rhs.dtype)
  return d_lhs.astype(lhs.dtype), sum_to_primal_type(d_rhs, rhs), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


@jax.custom_vjp
def _ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """`jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype))` with `rhs`'s gradient in `rhs`'s dtype,
  from an f32-accumulated `ragged_dot_general` over the ragged rows (XLA's grouped `tgmm`)."""
  return jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes)


def _ragged_dot_fwd(lhs, rhs, group_sizes):
  return _ragged_dot(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _ragged_dot_bwd(residuals, d_out):
  lhs, rhs, group_sizes = residuals
  _, lhs_vjp = jax.vjp(lambda a: jax.lax.ragged_dot(a, rhs.astype(lhs.dtype), group_sizes), lhs)
  tgmm = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                           lhs_ragged_dimensions=(0,), rhs_group_dimensions=())
  d_rhs = jax.lax.ragged_dot_general(*f32_product_operands(lhs, d_out.astype(lhs.dtype)),
                                     group_sizes, tgmm,
                                     preferred_element_type=jnp.float32)
  return lhs_vjp(d_out)[0], sum_to_primal_type(d_rhs.astype(rhs.dtype), rhs), None


_ragged_dot.defvjp(_ragged_dot_fwd, _ragged_dot_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, backend: str = "auto",
        block_size: int = 16) -> jax.Array:
  """`lhs [P, K]` rows sorted by group, `rhs [E, K, N]`, `group_sizes [E]` -> `[P, N]`.

  Row r of group e gives `lhs[r] @ rhs[e]` in `lhs`'s dtype (`rhs` is cast to it; its gradient
  comes back in `rhs`'s own dtype, accumulated in f32); rows past `sum(group_sizes)` give zeros.
  The blocked
  backend takes any group sizes (with `sum(group_sizes) <= P`); `block_size` is its smallest
  tile, so groups padded to a multiple of it waste no work.
  """
  if backend == "auto":
    backend = "ragged_dot" if target_platform() == "tpu" else "blocked"
  if backend == "ragged_dot":
    return _ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))
  if backend != "blocked":
    raise ValueError(f"gmm backend={backend!r}: use 'auto', 'blocked' or 'ragged_dot'")
  if block_size < 1:
    raise ValueError(f"gmm: block_size={block_size} must be >= 1")
  return _blocked(lhs, rhs, group_sizes.astype(jnp.int32), block_size)
