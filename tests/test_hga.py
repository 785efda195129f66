"""MoCHA's Hierarchical Group Attention: the reference variant against a numpy port of the
reference code (ties, groups of different sizes), exactly k neighbours, group isolation, and the
sharded graph: each device builds its own images' graphs."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from moe_jax.parallel import hlo, mesh as mesh_lib, sharding
from moe_jax.vlm import hga


def _reference_hga_numpy(x: np.ndarray, groups: np.ndarray, k: int = 10,
                         cross_weight: float = 0.7) -> np.ndarray:
  """A numpy port of the reference code (Pbhgit/MoCHA llava/model/hga.py: build_innovative_graph_v3
  + innovative_graph_propagation_v3), one image `x [T, H]` at a time, edge lists and all."""
  x = x.astype(np.float64)
  N = x.shape[0]
  temp = 1 / np.linalg.norm(x, axis=1).mean()
  normed = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  sim = normed @ normed.T * np.exp(temp)
  np.fill_diagonal(sim, -np.inf)
  intra_k = int(k * cross_weight)
  cross_k = k - intra_k

  def topk(values, n):  # torch.topk with ties to the lower index
    idx = np.argsort(-values, axis=1, kind="stable")[:, :n]
    return np.take_along_axis(values, idx, 1), idx

  rows, cols, vals = [], [], []
  for g in np.unique(groups):
    group_mask = groups == g
    group_size = group_mask.sum()
    group_indices = np.flatnonzero(group_mask)
    valid_intra_k = min(intra_k, group_size - 1 if group_size > 1 else 0)
    valid_cross_k = min(cross_k, N - group_size)
    intra_sim = np.where(group_mask[:, None] & group_mask[None, :], sim, -np.inf)[group_indices]
    cross_sim = np.where(group_mask[:, None] & ~group_mask[None, :], sim, -np.inf)[group_indices]
    for s, n in ((intra_sim, valid_intra_k), (cross_sim, valid_cross_k)):
      if n > 0:
        v, i = topk(s, n)
        rows.append(np.repeat(group_indices, n))
        cols.append(i.reshape(-1))
        vals.append(v.reshape(-1))
  row, col, val = map(np.concatenate, (rows, cols, vals))
  weight = (val - val.min()) / (val.max() - val.min() + 1e-8)
  row, col = np.concatenate([row, col]), np.concatenate([col, row])
  weight = np.concatenate([weight, weight])
  w_sum = np.zeros(N)
  np.add.at(w_sum, row, weight)
  w_norm = weight / (w_sum + 1e-8)[row]
  x_agg = np.zeros_like(x)
  np.add.at(x_agg, row, x[col] * w_norm[:, None])
  gate = 1 / (1 + np.exp(-10 * (np.abs(x - x_agg).mean(1, keepdims=True) - 0.2)))
  x_new = (1 - gate) * x + gate * x_agg
  mean, var = x_new.mean(1, keepdims=True), x_new.var(1, keepdims=True)
  return (x_new - mean) / np.sqrt(var + 1e-5)


def _rel_l2(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs_with_ties(sizes: tuple[int, ...], batch: int) -> np.ndarray:
  """`[batch, sum(sizes), 6]` normal tokens; duplicated tokens inside a group and across groups
  give tied similarities."""
  rng = np.random.default_rng(sum(sizes))
  T = sum(sizes)
  x = rng.normal(size=(batch, T, 6)).astype(np.float32)
  x[:, 1] = x[:, 0]
  x[:, T - 1] = x[:, 0]
  x[1, 2:4] = x[1, 5]
  return x


@pytest.mark.parametrize("sizes", [(9, 4, 6, 2), (12, 3), (1, 5, 8)])
def test_reference_hga_equals_a_numpy_port_of_the_reference_code_with_ties(sizes):
  x = _inputs_with_ties(sizes, 2)
  groups = hga.group_ids(sizes)
  layer = hga.build_hga(6, hga.hga_config(), rngs=nnx.Rngs(0))
  assert nnx.state(layer, nnx.Param) == nnx.State({})  # parameter-free, as the reference
  got = jax.jit(lambda x: layer(x, groups))(jnp.asarray(x))
  for b in range(2):
    assert _rel_l2(got[b], _reference_hga_numpy(x[b], groups)) <= 1e-6


def test_reference_hga_keeps_exactly_k_neighbours_under_ties():
  # 9 identical tokens: every similarity ties. A token of the group of 5 keeps
  # int(10 * 0.7) = 7 -> min(7, 4) = 4 group-mates and min(3, 4) = 3 across; one of the group of
  # 4 keeps min(7, 3) = 3 and 3.
  assert hga.split_k(10, 0.7) == (7, 3) and hga.split_k(10, 0.75) == (7, 3)
  groups = hga.group_ids((5, 4))
  row, col, _ = hga.reference_edges(jnp.ones((2, 9, 4)), groups, 10, 0.7)
  col = np.asarray(col)
  for t in range(9):
    picked = col[:, row == t]
    assert t not in picked
    for b in range(2):
      assert len(set(picked[b])) == picked.shape[1]
  counts = np.bincount(row, minlength=9)
  np.testing.assert_array_equal(counts, [7] * 5 + [6] * 4)
  # ties go to the lower index: token 0 keeps tokens 1..4 in its group and 5, 6, 7 across
  np.testing.assert_array_equal(np.sort(col[0, row == 0]), [1, 2, 3, 4, 5, 6, 7])
  # all kept similarities are equal, so min-max gives every edge weight 0: nothing moves
  np.testing.assert_array_equal(hga.reference_weights(jnp.ones((1, 9, 4)), groups, 10, 0.7), 0.0)


@pytest.mark.parametrize("kind,k", [("reference", 7), ("learned", 10)])
def test_without_cross_group_terms_groups_do_not_mix(kind, k):
  # reference: cross_weight 1 keeps all k = 7 neighbours inside the group; learned: no cross term
  cross_weight = 1.0 if kind == "reference" else 0.0
  c = ml_collections.ConfigDict(dict(hga.hga_config(), kind=kind, k=k, cross_weight=cross_weight))
  layer = hga.build_hga(8, c, rngs=nnx.Rngs(0))
  groups = hga.group_ids((5, 3))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8))
  y = layer(x, groups)
  y2 = layer(x.at[:, 5:].set(jax.random.normal(jax.random.key(1), (2, 3, 8))), groups)
  np.testing.assert_allclose(y[:, :5], y2[:, :5], atol=1e-5)
  assert not np.allclose(y[:, 5:], y2[:, 5:])
  if kind == "learned":  # with the cross term, group 0 sees group 1
    layer.cross_weight = 0.7
    assert not np.allclose(layer(x, groups)[:, :5], y[:, :5], atol=1e-4)


def test_reference_hga_on_a_mesh_builds_each_devices_graphs_without_collectives():
  # Batch 8 over fsdp=4 x expert=2. Before: XLA all-gathered the whole batch for the graph's
  # 4 top_k and for its scatter's transpose (5 all-gathers) and all-reduced the [B, T, T] graph
  # of its scatter-add.
  sizes = (6, 3)
  groups = hga.group_ids(sizes)
  x = _inputs_with_ties(sizes, 8)
  cotangent = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
  layer = hga.build_hga(6, hga.hga_config(), rngs=nnx.Rngs(0))

  def forward_backward(x, cotangent):
    y, vjp = jax.vjp(lambda x: layer(x, groups), x)
    return y, vjp(cotangent)[0]

  single = jax.jit(forward_backward)(x, cotangent)
  c = mesh_lib.default_config()
  c.data, c.fsdp, c.expert = 1, 4, 2
  mesh = mesh_lib.build_mesh(c, num_experts=4)
  with jax.set_mesh(mesh):
    args = jax.device_put((x, cotangent), sharding.batch_sharding(mesh))
    compiled = jax.jit(forward_backward).lower(*args).compile()
    y, grad = compiled(*args)
  assert set(hlo.collective_counts(compiled.as_text()).values()) == {0}
  assert y.sharding.shard_shape(y.shape) == (1, sum(sizes), 6)
  for b in range(8):
    assert _rel_l2(y[b], _reference_hga_numpy(x[b], groups)) <= 1e-6
  np.testing.assert_allclose(y, single[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grad, single[1], rtol=1e-6, atol=1e-6)
