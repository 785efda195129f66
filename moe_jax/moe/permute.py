"""Row permutations whose backward pass is also a gather (no scatter-add on the hot path).

A dispatch moves token rows into expert buffers and back. Written as plain `x[index]`, the backward
pass of each move is a scatter-add, which XLA's CPU and GPU backends run far slower than a gather.
When every source row is read by at most R output rows and we know which ones (the *inverse
index*), the transpose is again a gather: `dsrc[n] = sum_r dout[inverse[n, r]]`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _take_rows(src: jax.Array, index: jax.Array) -> jax.Array:
  """`src [N, D]`, `index [...]` -> `[..., D]`; out-of-range indices read zeros."""
  return jnp.take(src, index, axis=0, mode="fill", fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=())
def gather_rows(src: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """`out[m] = src[index[m]]` (zeros where index is out of range) with a gather backward.

  Args:
    src: `[N, D]`.
    index: `[M]` int.
    inverse: `[N, R]` int: for each row of `src`, the positions m that read it (padded with
      out-of-range values). Every m with an in-range `index[m]` must appear exactly once.
  Returns:
    `[M, D]`.
  """
  del inverse
  return _take_rows(src, index)


def _gather_rows_fwd(src, index, inverse):
  return _take_rows(src, index), (index, inverse)


def _gather_rows_bwd(residuals, d_out):
  index, inverse = residuals
  d_src = jnp.sum(_take_rows(d_out, inverse), axis=1)
  return d_src, None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)
