"""MoE layer core: top-k router x both dispatch paths vs a per-token reference, invariants,
gradients, property tests and config validation."""
from __future__ import annotations

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import moe_reference as ref
from moe_jax import moe
from moe_jax.moe import dispatch
from moe_jax.routing.top_k import token_choice_plan


def make_layer(dim=8, E=4, F=16, k=1, dispatch_mode="capacity", cf=1.0, bpr=True,
               renormalize=False, group_size=0, seed=0, **kw):
  c = moe.default_config()
  c.num_experts, c.hidden_dim, c.router.k = E, F, k
  c.dispatch, c.capacity_factor, c.group_size = dispatch_mode, cf, group_size
  c.router.bpr, c.router.renormalize = bpr, renormalize
  c.router.init_std = 1.0  # spread gates so routing is not trivially uniform
  for key, value in kw.items():
    node, *rest = key.split("__")
    (c[node].__setitem__(rest[0], value) if rest else c.__setitem__(node, value))
  layer = moe.MoELayer(dim, c, rngs=nnx.Rngs(seed))
  layer.eval()
  # Non-zero biases so that a wrongly-zeroed row shows up.
  e = layer.experts
  e.fc1_bias[...] = jax.random.normal(jax.random.key(seed + 1), e.fc1_bias.shape) * 0.1
  e.fc2_bias[...] = jax.random.normal(jax.random.key(seed + 2), e.fc2_bias.shape) * 0.1
  return layer


def reference_top_k(layer, x):
  """Numpy reference of a top-k MoE layer in eval mode: outputs, kept mask, aux losses."""
  c = layer.config
  xg = np.asarray(layer._groups(x)[0], np.float64)
  logits = xg @ np.asarray(layer.router.kernel[...], np.float64)
  gates = ref.softmax(logits)
  K, E = c.router.k, c.num_experts
  idx = np.argsort(-gates, axis=-1, kind="stable")[..., :K]
  w = np.take_along_axis(gates, idx, -1)
  if c.router.renormalize:
    w = w / w.sum(-1, keepdims=True)
  S = xg.shape[1]
  cap = None if c.dispatch == "dropless" else max(math.ceil(K * S * c.capacity_factor / E), 1)
  prio = gates.max(-1) if c.router.bpr else None  # BPR: raw max gate, before renormalising
  y, kept = ref.token_choice(xg, idx, w, prio, cap, ref.expert_params(layer))
  counts = np.stack([np.bincount(idx[g].ravel(), minlength=E) for g in range(len(idx))])
  top1 = np.stack([np.bincount(idx[g, :, 0], minlength=E) / S for g in range(len(idx))])
  losses = {
      "importance": np.mean([ref.cv2(gates[g].sum(0)) for g in range(len(gates))]),
      "load": np.mean([ref.cv2(c_) for c_ in counts]),
      "balance": np.mean(E * np.sum(top1 * gates.mean(1), -1)),
      "z_loss": np.mean(np.logaddexp.reduce(logits, axis=-1) ** 2),
  }
  return y.reshape(x.shape), kept, losses


@nnx.jit  # one compile per layer config instead of ~100 eager ops (~2x faster here)
def run(layer, x):
  return moe.capture_aux(layer)(x)


CASES = [
    dict(k=1, dispatch_mode="capacity", cf=1.0),
    dict(k=1, dispatch_mode="capacity", cf=0.5),
    dict(k=2, dispatch_mode="capacity", cf=1.0),
    dict(k=2, dispatch_mode="capacity", cf=0.75, bpr=False),
    dict(k=2, dispatch_mode="capacity", cf=1.25, renormalize=True, group_size=6),
    dict(k=1, dispatch_mode="dropless"),
    dict(k=3, dispatch_mode="dropless", renormalize=True, dropless__block_size=4),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_top_k_matches_per_token_reference(case):
  layer = make_layer(**case)
  x = jax.random.normal(jax.random.key(3), (3, 8, 8))
  y, aux = run(layer, x)
  want_y, kept, want_losses = reference_top_k(layer, x)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  (layer_aux,) = aux.layers.values()
  for name, want in want_losses.items():
    np.testing.assert_allclose(layer_aux.losses[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(layer_aux.metrics["dropped_fraction"], 1 - kept.mean(), atol=1e-6)
  weights = layer.config.router.loss_weights
  np.testing.assert_allclose(
      aux.total_loss, sum(weights[n] * v for n, v in want_losses.items()), rtol=1e-5)


def test_capacity_never_exceeded_and_k_distinct_experts():
  layer = make_layer(k=2, cf=0.5)
  x = jax.random.normal(jax.random.key(0), (4, 16, 8))
  plan = layer.route(x)
  C = dispatch.capacity(2, 16, 4, 0.5)
  rows = np.asarray(dispatch.capacity_rows(plan, C))
  kept_rows = rows[rows < 4 * 4 * C]
  assert len(np.unique(kept_rows)) == len(kept_rows), "two pairs share a buffer row"
  idx = np.asarray(plan.expert_index)
  for e in range(4):
    for g in range(4):
      assert np.sum((idx[g] == e) & (rows[g] < 4 * 4 * C)) <= C
  assert all(len(set(row)) == 2 for row in idx.reshape(-1, 2)), "a token reached an expert twice"


def test_bpr_drops_lowest_priority_first():
  layer = make_layer(k=1, cf=0.5, E=2)
  x = jax.random.normal(jax.random.key(5), (1, 16, 8))
  plan = layer.route(x)
  rows = np.asarray(dispatch.capacity_rows(plan, dispatch.capacity(1, 16, 2, 0.5)))[0, :, 0]
  prio, idx = np.asarray(plan.priority)[0], np.asarray(plan.expert_index)[0, :, 0]
  for e in range(2):
    mine = idx == e
    dropped, kept = rows[mine] >= 2 * 4, rows[mine] < 2 * 4
    if dropped.any() and kept.any():
      assert prio[mine][dropped].max() <= prio[mine][kept].min()


@pytest.mark.parametrize("k,gates,capacity_factor,want_rows", [
    # E=2, S=4, every first choice is expert 0; C = ceil(1 * 4 * 0.5 / 2) = 1. Renormalised
    # k=1 weights are all 1.0; the raw max gates 0.6, 0.9, 0.7, 0.55 put token 1 first: it
    # takes row (e*G + g)*C + rank = 0, the rest are dropped (row E*G*C = 2).
    (1, [[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.55, 0.45]], 0.5, [[2], [0], [2], [2]]),
    # E=3, S=3, top-2; C = ceil(2 * 3 * 0.5 / 3) = 1. Raw priorities 0.5, 0.45, 0.7 serve
    # t2, t0, t1; renormalised ones (0.526, 0.5625, 0.778) would serve t2, t1, t0. 1st choices:
    # t2 -> e2 (row 2), t0 -> e0 (row 0), t1 -> e0 (full). 2nd choices: t2 -> e1 (row 1),
    # t0 -> e1 (full), t1 -> e1 (full). Dropped = row 3.
    (2, [[0.5, 0.45, 0.05], [0.45, 0.35, 0.2], [0.1, 0.2, 0.7]], 0.5, [[0, 3], [3, 3], [2, 1]]),
])
def test_bpr_priority_is_the_raw_gate_with_renormalisation(k, gates, capacity_factor,
                                                           want_rows):
  gates = jnp.asarray([gates], jnp.float32)
  plan = token_choice_plan(gates, jnp.log(gates), k, renormalize=True, bpr=True)
  np.testing.assert_allclose(plan.priority, gates.max(-1))
  np.testing.assert_allclose(plan.combine_weights.sum(-1), 1.0, rtol=1e-6)
  S, E = gates.shape[1:]
  C = dispatch.capacity(k, S, E, capacity_factor)
  assert C == 1
  np.testing.assert_array_equal(dispatch.capacity_rows(plan, C)[0], want_rows)


def test_capacity_equals_dropless_when_nothing_dropped():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8))
  for k in (1, 2):
    cap = make_layer(k=k, cf=4.0 / k * 4)  # C >= S: nothing can drop
    drop = make_layer(k=k, dispatch_mode="dropless", dropless__block_size=3)
    y_cap, aux_cap = run(cap, x)
    y_drop, _ = run(drop, x)
    assert float(next(iter(aux_cap.layers.values())).metrics["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(y_cap, y_drop, rtol=1e-5, atol=1e-6)


def test_dropless_is_token_permutation_equivariant():
  layer = make_layer(k=2, dispatch_mode="dropless", dropless__block_size=4)
  x = jax.random.normal(jax.random.key(2), (1, 24, 8))
  perm = np.random.default_rng(0).permutation(24)
  np.testing.assert_allclose(layer(x)[:, perm], layer(x[:, perm]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_gradients_match_finite_differences(mode):
  layer = make_layer(k=2, dispatch_mode=mode, cf=0.75, shared_expert__enabled=True,
                     shared_expert__combine="gate")
  x = jax.random.normal(jax.random.key(4), (2, 6, 8))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def f(params, x):
    y, aux = moe.capture_aux(nnx.merge(graphdef, params, rest))(x)
    return jnp.sum(jnp.sin(y)) + 10 * aux.total_loss

  # Routing decisions are piecewise constant: step sizes stay far below the gate margins.
  # Under jit: one compile of the step and of its VJP instead of ~150 eager ops (~3x faster).
  check_grads(jax.jit(f), (params, x), order=1, modes=["rev"], eps=1e-3, atol=2e-2,
                            rtol=2e-2)


def test_train_mode_noise_changes_routing_and_eval_is_deterministic():
  layer = make_layer(k=1, router__noise_std=50.0)
  x = jax.random.normal(jax.random.key(6), (2, 32, 8))
  layer.eval()
  np.testing.assert_array_equal(layer.route(x).expert_index, layer.route(x).expert_index)
  layer.train()
  assert not np.array_equal(layer.route(x).expert_index, layer.route(x).expert_index)


def image_layer(kernel, E=2, k=1, **kw):
  """Per-image layer of width 2 with a hand-set router kernel `[2, E]` (logits = pooled @ W)."""
  layer = make_layer(dim=2, E=E, k=k, granularity="image", **kw)
  layer.router.kernel[...] = jnp.asarray(kernel, jnp.float32)
  return layer


# Per-token offsets that sum to zero: an image's mean token is its `mean` row.
OFFSETS = np.array([[0.1, -0.2], [-0.3, 0.1], [0.2, 0.1]])


def images_with_means(means):
  return jnp.asarray(np.asarray(means, np.float64)[:, None] + OFFSETS, jnp.float32)  # [B, 3, 2]


@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_per_image_capacity_counts_images_and_bpr_orders_images(mode):
  # 4 images of T=3 tokens, E=2, k=1, one group (images_per_group=0, no mesh). W = 2 I: image
  # means [3,0], [1,0], [0.5,0], [0,1] give logits [6,0], [2,0], [1,0], [0,2]: images 0-2 pick
  # expert 0 with raw gates 0.9975, 0.881, 0.731; image 3 picks expert 1 (0.881).
  # Capacity: C = ceil(K * images * cf / E) = ceil(1 * 4 * 1.0 / 2) = 2 images per expert, so
  # expert 0 keeps images 0 and 1 (highest priority) and drops image 2: 1 of 4 images (3 of 12
  # tokens) dropped. Dropless keeps all. (Old code: C = ceil(3 tokens / 2) = 2 of each image's
  # 3 tokens, dropping 1/3 of every image.)
  layer = image_layer(2.0 * np.eye(2), dispatch_mode=mode, cf=1.0)
  x = images_with_means([[3, 0], [1, 0], [0.5, 0], [0, 1]])
  assert dispatch.capacity(1, 4, 2, 1.0) == 2
  y, aux = run(layer, x)
  (layer_aux,) = aux.layers.values()
  gates = jax.nn.softmax(jnp.asarray([[6.0, 0], [2, 0], [1, 0], [0, 2]]))
  expert = [0, 0, 0, 1]
  every = layer.experts(jnp.broadcast_to(x.reshape(1, 12, 2), (2, 12, 2))).reshape(2, 4, 3, 2)
  kept = [True, True, mode == "dropless", True]
  want = np.stack([gates[b, e] * every[e, b] * kept[b] for b, e in enumerate(expert)])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(layer_aux.metrics["dropped_fraction"],
                             0.25 if mode == "capacity" else 0.0, atol=1e-7)
  np.testing.assert_allclose(layer_aux.example_load, np.eye(2)[expert])


def test_per_image_pooling_mean_or_cls_token():
  # Image 0: mean [1, 0] -> expert 0, but its token 0 is [1, 0] + [-2, 2] = [-1, 2] -> expert 1.
  x = images_with_means([[1, 0], [0, 1]]).at[0, 0].add(jnp.asarray([-2.0, 2.0]))
  x = x.at[0, 1].add(jnp.asarray([2.0, -2.0]))  # keep image 0's mean at [1, 0]
  for pooling, want in (("mean", [0, 1]), ("cls", [1, 1])):
    plan = image_layer(np.eye(2), image_pooling=pooling).route(x)
    np.testing.assert_array_equal(plan.expert_index[..., 0], [want], err_msg=pooling)


@pytest.mark.parametrize("images_per_group,groups", [(0, 1), (2, 2), (1, 4)])
def test_per_image_groups_hold_images_per_group_images(images_per_group, groups):
  plan = image_layer(np.eye(2), images_per_group=images_per_group).route(
      images_with_means(np.eye(2)[[0, 1, 0, 1]]))
  assert plan.expert_index.shape == (groups, 4 // groups, 1)


def test_per_image_images_per_group_must_divide_the_batch():
  with pytest.raises(ValueError, match="images_per_group=3"):
    image_layer(np.eye(2), images_per_group=3)(images_with_means(np.zeros((4, 2))))


@pytest.mark.parametrize("split,want", [
    # W = ln(3) I: means [1, 0] -> gates [0.75, 0.25]; [0, 1] -> [0.25, 0.75]. One group of 4.
    # Collapse, all 4 images on expert 0: importance = CV^2 of gate sums [3, 1] = var 1 / mean^2 4
    # = 0.25; load = CV^2 of counts [4, 0] = 4 / 4 = 1.0; balance = E * sum f P
    # = 2 * (1 * 0.75 + 0 * 0.25) = 1.5.
    ([0, 0, 0, 0], dict(importance=0.25, load=1.0, balance=1.5)),
    # Spread 2 / 2: sums [2, 2] -> 0; counts [2, 2] -> 0; balance 2 * (0.5*0.5 + 0.5*0.5) = 1.0.
    # (Old code: groups of one image each gave 0.25 / 1.0 / 1.5 for both.)
    ([0, 0, 1, 1], dict(importance=0.0, load=0.0, balance=1.0)),
])
def test_per_image_aux_losses_are_over_the_images_of_a_group(split, want):
  layer = image_layer(math.log(3.0) * np.eye(2), cf=2.0)
  _, aux = run(layer, images_with_means(np.eye(2)[split]))
  (layer_aux,) = aux.layers.values()
  for name, value in want.items():
    np.testing.assert_allclose(layer_aux.losses[name], value, atol=1e-6, err_msg=name)


def test_shared_expert_sum_adds_dense_mlp():
  layer = make_layer(k=1, cf=4.0, shared_expert__enabled=True)
  x = jax.random.normal(jax.random.key(8), (2, 5, 8))
  shared = layer.shared_expert
  routed = make_layer(k=1, cf=4.0)(x)  # same seed -> same router and experts
  want = routed + shared.fc2(jax.nn.gelu(shared.fc1(x)))
  np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # end-to-end, minutes: `-m slow`
@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(
    B=st.integers(1, 3), T=st.integers(1, 9), E=st.sampled_from([1, 2, 3, 5]),
    k=st.integers(1, 3), cf=st.sampled_from([0.3, 1.0, 2.0]),
    mode=st.sampled_from(["capacity", "dropless"]), ties=st.booleans(),
    scale=st.sampled_from([1.0, 1e4]))
def test_property_random_shapes_ties_extreme_logits(B, T, E, k, cf, mode, ties, scale):
  k = min(k, E)
  layer = make_layer(dim=4, E=E, F=8, k=k, dispatch_mode=mode, cf=cf)
  if ties:  # all gates equal: ties broken by expert index
    layer.router.kernel[...] = jnp.zeros_like(layer.router.kernel[...])
  layer.router.kernel[...] = layer.router.kernel[...] * scale
  x = jax.random.normal(jax.random.key(B * 100 + T), (B, T, 4))
  y, aux = run(layer, x)
  want, kept, _ = reference_top_k(layer, x)
  assert np.isfinite(np.asarray(y)).all()
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
  if mode == "dropless":
    assert kept.all()


def test_nan_inputs_propagate_to_outputs():
  """Documented behaviour: NaN tokens are routed somewhere and give NaN outputs, never a crash."""
  layer = make_layer(k=1, dispatch_mode="dropless")
  x = jnp.ones((1, 4, 8)).at[0, 1].set(jnp.nan)
  y = np.asarray(layer(x))
  assert np.isnan(y[0, 1]).all()


@pytest.mark.parametrize("field,value,match", [
    ("router.k", 5, "router.k"),
    ("capacity_factor", 0.0, "capacity_factor"),
    ("router.name", "nope", "router.name"),
    ("dispatch", "einsum", "dispatch"),
    ("num_experts", 0, "num_experts"),
    ("granularity", "pixel", "granularity"),
    ("router.loss_weights.typo", 1.0, "router.loss_weights"),
    ("shared_expert.combine", "concat", "shared_expert.combine"),
])
def test_invalid_config_raises_naming_the_field(field, value, match):
  c = moe.default_config()
  c.num_experts = 4
  c.update_from_flattened_dict({field: value})
  with pytest.raises(ValueError, match=match.replace(".", r"\.")):
    moe.MoELayer(8, c, rngs=nnx.Rngs(0))


def test_group_size_must_divide_tokens():
  layer = make_layer(group_size=5)
  with pytest.raises(ValueError, match="group_size"):
    layer(jnp.ones((2, 4, 8)))




def _layer_with_nan_token(router: str, dispatch: str = "capacity", **knobs):
  """(layer output `[2, 8, 4]`, aux) for a 4-expert layer whose input has one NaN token (image
  0, token 3); each image is one routing group."""
  c = moe.default_config(router)
  c.num_experts, c.hidden_dim, c.dispatch = 4, 8, dispatch
  c.update(knobs)
  layer = moe.MoELayer(4, c, rngs=nnx.Rngs(0))
  layer.eval()
  x = jax.random.normal(jax.random.key(0), (2, 8, 4)).at[0, 3].set(jnp.nan)
  y, aux = moe.capture_aux(layer)(x)
  return np.asarray(y), next(iter(aux.layers.values()))


@pytest.mark.parametrize("router,dispatch", [
    ("top_k", "capacity"), ("top_k", "dropless"), ("expert_choice", "capacity"),
    ("clusters", "capacity"), ("hash", "dropless"), ("random", "capacity")])
def test_a_nan_token_leaves_the_other_tokens_finite(router, dispatch):
  y, _ = _layer_with_nan_token(router, dispatch)
  finite = np.isfinite(y).all(-1)
  assert finite.sum() >= 15 and finite[1].all(), finite  # only token (0, 3) may be non-finite


def test_a_nan_token_makes_its_soft_moe_group_nan():
  # Soft MoE mixes every token of a group into every slot (the documented exception).
  y, _ = _layer_with_nan_token("soft")
  assert np.isnan(y[0]).all(-1).all() and np.isfinite(y[1]).all()


def test_check_finite_raises_on_a_nan_input():
  with pytest.raises(FloatingPointError, match="check_finite=True.*input holds NaN"):
    _layer_with_nan_token("top_k", check_finite=True)


def test_dropless_dropped_fraction_is_exactly_zero():
  _, aux = _layer_with_nan_token("top_k", "dropless")
  assert float(aux.metrics["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("grouped", [False, True])
def test_weighted_fc2_forward_unchanged_and_gradient_matches_autodiff(grouped):
  # The custom VJP of `w * (h W + b)` (no forward product in the weights' gradient) against
  # autodiff of the same formula; a zero weight (an empty capacity row) and, grouped, rows past
  # the groups' total (zero bias there, as the bank's take fills) included.
  from moe_jax.moe.experts import _matmul, weighted_linear
  keys = jax.random.split(jax.random.key(0), 5)
  E, F, D = 3, 16, 8
  kernel = jax.random.normal(keys[0], (E, F, D))
  if grouped:
    grouping, group_sizes, rows = ("blocked", 2), jnp.array([4, 0, 6], jnp.int32), (12,)
    bias = jax.random.normal(keys[1], (12, D)).at[10:].set(0.0)
  else:
    grouping, group_sizes, rows = None, None, (E, 5)
    bias = jax.random.normal(keys[1], (E, 1, D))
  h = jax.random.normal(keys[2], (*rows, F))
  w = jax.random.uniform(keys[3], rows).reshape(-1).at[1].set(0.0).reshape(rows)
  ct = jax.random.normal(keys[4], (*rows, D))
  ours = lambda h, k, b, w: weighted_linear(grouping, h, k, b, w, group_sizes)
  autodiff = lambda h, k, b, w: w[..., None] * (_matmul(grouping, h, k, group_sizes) + b)
  np.testing.assert_array_equal(ours(h, kernel, bias, w), autodiff(h, kernel, bias, w))
  for loss in (lambda y: jnp.sum(ct * y), jnp.sum):
    got, want = (jax.grad(lambda *a, f=f: loss(f(*a)), argnums=(0, 1, 2, 3))(h, kernel, bias, w)
                 for f in (ours, autodiff))
    for g, r in zip(got, want):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def _gemm_flops(loss):
  """XLA flops of fwd+bwd of `loss(layer(x))`, in units of one expert GEMM over all rows."""
  E, D, F, B, S = 4, 128, 256, 2, 128
  layer = make_layer(dim=D, E=E, F=F)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  grad = jax.grad(lambda p, x: loss(nnx.merge(graphdef, p, rest)(x)), argnums=(0, 1))
  flops = jax.jit(grad).lower(params, x).compile().cost_analysis()["flops"]
  rows = E * B * dispatch.capacity(1, S, E, 1.0)
  return flops / (2 * rows * D * F)


def test_sum_loss_gradient_runs_five_expert_gemms_like_a_dense_ffn():
  # sum(layer(x)) (any loss linear in the output) never reads the output, so its forward fc2
  # GEMM is dead code (issue 22); a loss that reads it needs all six (two forward, four backward).
  assert 4.9 < _gemm_flops(jnp.sum) < 5.3
  assert 5.9 < _gemm_flops(lambda y: jnp.sum(y**2)) < 6.3


def test_eval_capacity_factor_applies_in_eval_mode_only():
  """E=4, k=1, 16 tokens per group: capacity_factor 0.25 gives C = ceil(16 * 0.25 / 4) = 1 slot
  per expert, so at least 12 of 16 tokens drop; eval_capacity_factor 4.0 gives C = 16 in eval
  mode: nothing drops, and the output is that of a layer built with capacity_factor 4.0."""
  x = jax.random.normal(jax.random.key(3), (2, 16, 8))
  layer = make_layer(cf=0.25, eval_capacity_factor=4.0, router__noise_std=0.0)
  dropped = lambda aux: float(next(iter(aux.layers.values())).metrics["dropped_fraction"])
  y_eval, aux_eval = run(layer, x)
  assert dropped(aux_eval) == 0.0
  np.testing.assert_allclose(y_eval, run(make_layer(cf=4.0), x)[0], rtol=1e-6)
  layer.train()
  assert dropped(run(layer, x)[1]) >= 12 / 16
  with pytest.raises(ValueError, match=r"eval_capacity_factor=-1.0 must be >= 0"):
    make_layer(eval_capacity_factor=-1.0)
