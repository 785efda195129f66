"""Grouped matmul: blocked == ragged_dot == a per-row reference, forward and gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from moe_jax.moe import grouped_matmul


def reference(lhs, rhs, group_sizes):
  groups = np.asarray(grouped_matmul.row_groups(group_sizes, lhs.shape[0]))
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  for r, e in enumerate(groups):
    if e < rhs.shape[0]:
      out[r] = np.asarray(lhs[r], np.float64) @ np.asarray(rhs[e], np.float64)
  return out


@pytest.mark.parametrize("sizes", [[8, 0, 4, 12], [0, 0, 4, 0], [4, 4, 4, 4], [0, 0, 0, 0]])
def test_blocked_matches_reference_and_ragged_dot(sizes):
  block, P = 4, 32  # rows past sum(sizes) are padding
  key1, key2 = jax.random.split(jax.random.key(sum(sizes)))
  lhs = jax.random.normal(key1, (P, 6))
  rhs = jax.random.normal(key2, (4, 6, 5))
  gs = jnp.asarray(sizes)
  want = reference(lhs, rhs, gs)
  for backend in ("blocked", "ragged_dot"):
    got = grouped_matmul.gmm(lhs, rhs, gs, backend=backend, block_size=block)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=backend)


def test_blocked_gradients():
  gs = jnp.asarray([8, 0, 4, 12])
  lhs = jax.random.normal(jax.random.key(0), (28, 6))
  rhs = jax.random.normal(jax.random.key(1), (4, 6, 5))
  f = lambda l, r: jnp.sum(jnp.sin(grouped_matmul.gmm(l, r, gs, backend="blocked", block_size=4)))
  check_grads(f, (lhs, rhs), order=1, modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)
  g_blocked = jax.grad(f, argnums=(0, 1))(lhs, rhs)
  g_ragged = jax.grad(lambda l, r: jnp.sum(jnp.sin(
      grouped_matmul.gmm(l, r, gs, backend="ragged_dot"))), argnums=(0, 1))(lhs, rhs)
  for a, b in zip(g_blocked, g_ragged):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes", [[3, 0, 5, 9], [17, 1, 0, 2], [0, 0, 0, 37]])
def test_group_sizes_not_a_block_multiple(sizes):
  """Groups of any size: full tiles, the binary ladder and one masked tile per group."""
  P = 40
  lhs = jax.random.normal(jax.random.key(2), (P, 6))
  rhs = jax.random.normal(jax.random.key(3), (4, 6, 5))
  gs = jnp.asarray(sizes)
  got = grouped_matmul.gmm(lhs, rhs, gs, backend="blocked", block_size=2)
  np.testing.assert_allclose(got, reference(lhs, rhs, gs), rtol=1e-5, atol=1e-5)


def test_invalid_backend_and_block_size_are_errors():
  with pytest.raises(ValueError, match="block_size"):
    grouped_matmul.gmm(jnp.ones((6, 2)), jnp.ones((2, 2, 2)), jnp.asarray([4, 0]),
                       backend="blocked", block_size=0)
  with pytest.raises(ValueError, match="backend"):
    grouped_matmul.gmm(jnp.ones((6, 2)), jnp.ones((2, 2, 2)), jnp.asarray([4, 0]),
                       backend="megablox")


def test_blocked_gradients_over_every_tile_size():
  """Groups that use the largest tiles (512 rows forward, 1024 in the weight gradient), the
  128-row full tiles and masked remainders: gradients equal ragged_dot's."""
  gs = jnp.asarray([1100, 0, 129, 70, 255])
  P = 1600  # rows past the 1554 used stay zero
  lhs = jax.random.normal(jax.random.key(4), (P, 6))
  rhs = jax.random.normal(jax.random.key(5), (5, 6, 3))
  loss = lambda backend: lambda l, r: jnp.sum(jnp.sin(
      grouped_matmul.gmm(l, r, gs, backend=backend, block_size=16)))
  got = jax.grad(loss("blocked"), argnums=(0, 1))(lhs, rhs)
  want = jax.grad(loss("ragged_dot"), argnums=(0, 1))(lhs, rhs)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
