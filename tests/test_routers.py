"""Expert choice, Soft MoE, MoEC clusters, hash and random routers vs numpy references,
their invariants, gradients and config errors."""
from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import moe_reference as ref
from moe_jax import moe
from moe_jax.routing import ROUTERS, RoutingPlan, TokenChoiceRouter, fail, losses
from moe_jax.routing import clusters as clusters_lib
from moe_jax.routing.expert_choice import expert_choice_capacity
from moe_jax.routing.top_k import TopKRouter, token_choice_plan

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import compare_routers  # noqa: E402
import moec_imagenet  # noqa: E402


def make_layer(router, E=4, k=1, dim=8, F=16, **kw):
  c = moe.default_config(router)
  c.num_experts, c.hidden_dim = E, F
  if "k" in c.router:  # token-choice routers
    c.router.k = k
  if "init_std" in c.router:
    c.router.init_std = 1.0
  for key, value in kw.items():
    node = c
    *parents, leaf = key.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  layer = moe.MoELayer(dim, c, rngs=nnx.Rngs(0))
  layer.eval()
  e = layer.experts
  e.fc1_bias[...] = jax.random.normal(jax.random.key(1), e.fc1_bias.shape) * 0.1
  e.fc2_bias[...] = jax.random.normal(jax.random.key(2), e.fc2_bias.shape) * 0.1
  return layer


@nnx.jit  # one compile per layer config instead of ~100 eager ops
def forward(layer, x):
  return moe.capture_aux(layer)(x)


def run(layer, x):
  y, aux = forward(layer, x)
  return np.asarray(y), next(iter(aux.layers.values()))


X = jax.random.normal(jax.random.key(3), (3, 8, 8))


@pytest.mark.parametrize("cf", [0.5, 1.0, 2.0])
def test_expert_choice_matches_reference_and_every_expert_takes_c_tokens(cf):
  layer = make_layer("expert_choice", capacity_factor=cf)
  y, aux = run(layer, X)
  x = np.asarray(X, np.float64)
  probs = ref.softmax(x @ np.asarray(layer.router.kernel[...], np.float64))
  p = ref.expert_params(layer)
  G, S, E = probs.shape
  C = min(max(round(cf * S / E), 1), S)
  want = np.zeros_like(x)
  taken = np.zeros((G, S), int)
  for g in range(G):
    for e in range(E):
      chosen = np.argsort(-probs[g, :, e], kind="stable")[:C]
      assert len(chosen) == C
      for t in chosen:
        want[g, t] += probs[g, t, e] * ref.expert_ffn(p, e, x[g, t])
        taken[g, t] += 1
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  plan = layer.route(X)
  assert plan.token_index.shape == (G, E, C)
  hist = np.bincount(taken.ravel(), minlength=E + 1) / taken.size
  np.testing.assert_allclose(aux.metrics["experts_per_token"], hist, atol=1e-6)
  np.testing.assert_allclose(aux.metrics["dropped_fraction"], hist[0], atol=1e-6)


@pytest.mark.parametrize("slots", [1, 2])
def test_soft_moe_matches_reference_and_weights_are_normalised(slots):
  layer = make_layer("soft", router__soft__slots_per_expert=slots)
  y, aux = run(layer, X)
  x = np.asarray(X, np.float64)
  phi = np.asarray(layer.router.phi[...], np.float64)
  xn = x / np.sqrt((x**2).sum(-1, keepdims=True) + 1e-6)
  phin = phi / np.sqrt((phi**2).sum(0, keepdims=True) + 1e-6)
  logits = float(layer.router.scale[...]) * xn @ phin  # [G, S, E*P]
  dispatch = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  combine = ref.softmax(logits)
  p = ref.expert_params(layer)
  G, S, _ = x.shape
  want = np.zeros_like(x)
  for g in range(G):
    slot_in = dispatch[g].T @ x[g]  # [E*P, D]
    slot_out = np.stack([ref.expert_ffn(p, m // slots, slot_in[m]) for m in range(4 * slots)])
    want[g] = combine[g] @ slot_out
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  plan = layer.route(X)
  np.testing.assert_allclose(plan.dispatch_weights.sum(1), 1.0, atol=1e-5)
  np.testing.assert_allclose(plan.combine_weights.sum((2, 3)), 1.0, atol=1e-5)


def cluster_reference(layer, x):
  x = np.asarray(x, np.float64)
  h = x @ np.asarray(layer.router.proj[...], np.float64)
  emb = np.asarray(layer.router.expert_embedding[...], np.float64)
  hn = h / np.sqrt((h**2).sum(-1, keepdims=True) + 1e-6)
  en = emb / np.sqrt((emb**2).sum(-1, keepdims=True) + 1e-6)
  return ref.softmax(hn @ en.T / np.exp(float(layer.router.log_temperature[...])))


@pytest.mark.parametrize("k,mode", [(1, "capacity"), (2, "capacity"), (2, "dropless")])
def test_clusters_match_reference(k, mode):
  layer = make_layer("clusters", E=4, k=k, dispatch=mode, router__clusters__num_clusters=2)
  y, aux = run(layer, X)
  gates = cluster_reference(layer, X)
  idx = np.argsort(-gates, axis=-1, kind="stable")[..., :k]
  w = np.take_along_axis(gates, idx, -1)
  S = X.shape[1]
  cap = None if mode == "dropless" else max(math.ceil(k * S * 1.0 / 4), 1)
  want, _ = ref.token_choice(np.asarray(X, np.float64), idx, w, w[..., 0], cap,
                             ref.expert_params(layer))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  top1 = np.stack([np.bincount(i[:, 0], minlength=4) / S for i in idx])
  balance = np.mean(4 * np.sum(top1 * gates.mean(1), -1))
  me = gates.mean(1).reshape(3, 2, 2)
  variance = np.mean(4 * np.var(me, axis=-1, ddof=1).mean(-1))
  np.testing.assert_allclose(aux.losses["balance"], balance, rtol=1e-5)
  np.testing.assert_allclose(aux.losses["variance"], variance, rtol=1e-5, atol=1e-8)


def test_cluster_variance_loss_by_hand():
  # One group, E=4 in 2 clusters; mean routing probs me = [0.1, 0.3 | 0.2, 0.4].
  probs = jnp.asarray([[[0.1, 0.3, 0.2, 0.4], [0.1, 0.3, 0.2, 0.4]]])
  # Unbiased variances: cluster 1 ((0.1-0.2)^2 + (0.3-0.2)^2) / 1 = 0.02, cluster 2 also 0.02.
  # E * mean over clusters = 4 * 0.02 = 0.08.
  from moe_jax.routing.losses import cluster_variance_loss
  np.testing.assert_allclose(cluster_variance_loss(probs, 2), 0.08, rtol=1e-6)


def test_cluster_expert_dropout():
  layer = make_layer("clusters", E=8, k=1, router__clusters__num_clusters=4,
                     router__clusters__expert_dropout=0.5, router__clusters__resample_every=3)
  layer.train()
  x = jax.random.normal(jax.random.key(0), (4, 32, 8))
  masks = []
  for _ in range(6):
    alive = np.asarray(layer.router.alive())
    plan = layer.route(x)
    used = np.unique(np.asarray(plan.expert_index))
    assert alive[used].all(), "a dropped expert received tokens"
    assert alive.reshape(4, 2).any(1).all(), "a cluster lost all its experts"
    masks.append(alive)
  assert all((m == masks[0]).all() for m in masks[:3]) and all((m == masks[3]).all() for m in masks[3:])
  assert any(not (masks[0] == m).all() for m in
             [np.asarray(clusters_lib.surviving_experts(jax.random.key(s), 8, 4, 0.5))
              for s in range(5)])
  assert (~np.stack(masks)).any(), "nothing was ever dropped at rate 0.5"
  layer.eval()
  assert np.asarray(layer.router.alive()).shape == (8,)
  plan = layer.route(x)
  assert len(np.unique(np.asarray(plan.expert_index))) > 4  # eval: every expert available


@pytest.mark.parametrize("k", [1, 2])
def test_cluster_dropout_never_moves_a_token_to_another_cluster(k):
  """E=8 in 4 clusters of 2, dropout 0.5: a displaced token stays in its cluster (0 moves)."""
  layer = make_layer("clusters", E=8, k=k, router__clusters__num_clusters=4,
                     router__clusters__expert_dropout=0.5)
  x = jax.random.normal(jax.random.key(0), (4, 32, 8))
  full = np.asarray(layer.route(x).expert_index)  # eval: no dropout
  cluster_rank = np.asarray(cluster_reference(layer, x)).reshape(4, 32, 4, 2).max(-1)
  top_clusters = np.sort(np.argsort(-cluster_rank, axis=-1, kind="stable")[..., :k], -1)
  layer.train()
  displaced = 0
  for _ in range(5):  # 5 different masks
    alive = np.asarray(layer.router.alive())
    assert alive.reshape(4, 2).any(1).all(), "a cluster lost all its experts"
    got = np.asarray(layer.route(x).expert_index)
    assert alive[got].all(), "a dropped expert received tokens"
    # Every choice lies in one of the token's top-k clusters, ranked before dropout.
    assert (got[..., :, None] // 2 == top_clusters[..., None, :]).any(-1).all()
    moved = ~alive[full[..., 0]]  # tokens whose first choice was dropped
    displaced += int(moved.sum())
    if k == 1:
      assert int(np.sum(got[moved, 0] // 2 != full[moved, 0] // 2)) == 0, "cross-cluster move"
      np.testing.assert_array_equal(got[~moved], full[~moved])  # a surviving choice is kept
  assert displaced > 50, displaced


def hash_reference(S, E, k, seed):
  first = [((s * 2654435761 + seed) % 2**32) % E for s in range(S)]
  return np.array([[(f + j) % E for j in range(k)] for f in first])


@pytest.mark.parametrize("router", ["hash", "random"])
@pytest.mark.parametrize("k,mode", [(1, "capacity"), (2, "dropless")])
def test_baselines_match_reference(router, k, mode):
  layer = make_layer(router, k=k, dispatch=mode, capacity_factor=2.0)
  y, _ = run(layer, X)
  G, S, _ = X.shape
  idx = np.asarray(layer.route(X).expert_index)
  if router == "hash":
    np.testing.assert_array_equal(idx, np.broadcast_to(hash_reference(S, 4, k, 0), (G, S, k)))
  assert all(len(set(t)) == k for t in idx.reshape(-1, k))
  cap = None if mode == "dropless" else math.ceil(k * S * 2.0 / 4)
  want, _ = ref.token_choice(np.asarray(X, np.float64), idx, np.full(idx.shape, 1 / k), None, cap,
                             ref.expert_params(layer))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_random_router_draws_fresh_experts_in_train_mode_only():
  layer = make_layer("random", k=1)
  np.testing.assert_array_equal(layer.route(X).expert_index, layer.route(X).expert_index)
  layer.train()
  assert not np.array_equal(layer.route(X).expert_index, layer.route(X).expert_index)


@pytest.mark.parametrize("router,kw", [("expert_choice", {}), ("soft", {}),
                                       ("clusters", dict(router__clusters__num_clusters=2))])
def test_gradients(router, kw):
  layer = make_layer(router, k=1, **kw)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def f(params, x):
    y, aux = moe.capture_aux(nnx.merge(graphdef, params, rest, copy=True))(x)
    return jnp.sum(jnp.sin(y)) + aux.total_loss

  # Under jit: one compile of the step and of its VJP instead of ~150 eager ops (~3x faster).
  check_grads(jax.jit(f), (params, X[:1, :6]), order=1, modes=["rev"], eps=1e-3, atol=2e-2,
              rtol=2e-2)


@pytest.mark.parametrize("router,kw,field", [
    ("clusters", dict(router__clusters__num_clusters=3), "router.clusters.num_clusters"),
    ("soft", dict(router__soft__slots_per_expert=0), "router.soft.slots_per_expert"),
    ("clusters", dict(router__clusters__expert_dropout=1.0), "router.clusters.expert_dropout"),
    ("soft", dict(dispatch="dropless"), "dispatch"),
])
def test_invalid_router_configs(router, kw, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    make_layer(router, **kw)


def test_expert_choice_capacity_formula():
  assert expert_choice_capacity(16, 4, 1.0) == 4
  assert expert_choice_capacity(16, 4, 0.01) == 1
  assert expert_choice_capacity(16, 4, 100.0) == 16


class CosineRouter(TokenChoiceRouter):
  """A router from outside the package: top-k of softmax(cos(x, w_e) / temperature), BPR."""

  loss_weights = dict(balance=0.02)

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    c = super().default_config()
    c.temperature = 0.5
    return c

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict) -> None:
    super().validate(config)
    if config.router.temperature <= 0:
      fail("router.temperature", f"={config.router.temperature} must be > 0")

  def __init__(self, dim: int, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.k, self.temperature = config.router.k, config.router.temperature
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (dim, config.num_experts)))

  def __call__(self, x: jax.Array) -> RoutingPlan:
    w = self.kernel[...] / jnp.linalg.norm(self.kernel[...], axis=0)
    logits = jnp.einsum("gsd,de->gse", x / jnp.linalg.norm(x, axis=-1, keepdims=True), w)
    gates = jax.nn.softmax(logits / self.temperature, axis=-1)
    plan = token_choice_plan(gates, logits, self.k, False, True)
    return plan.replace(aux_losses={"balance": losses.balance_loss(gates, plan.expert_index)})


@pytest.fixture
def mine(monkeypatch):
  """`CosineRouter` registered as "mine" for one test."""
  monkeypatch.setattr(ROUTERS, "_entries", dict(ROUTERS._entries))
  ROUTERS.register("mine", CosineRouter)
  return "mine"


def cosine_reference(layer, x, k, capacity):
  x = np.asarray(x, np.float64)
  w = np.asarray(layer.router.kernel[...], np.float64)
  cos = (x / np.linalg.norm(x, axis=-1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0))
  gates = ref.softmax(cos / 0.5)
  idx = np.argsort(-gates, axis=-1, kind="stable")[..., :k]
  weights = np.take_along_axis(gates, idx, -1)
  y, _ = ref.token_choice(x, idx, weights, weights[..., 0], capacity, ref.expert_params(layer))
  top1 = np.stack([np.bincount(i[:, 0], minlength=4) / x.shape[1] for i in idx])
  return y, np.mean(4 * np.sum(top1 * gates.mean(1), -1))


@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_a_router_from_outside_the_package_is_one_class_and_one_registry_line(mine, mode):
  c = moe.default_config(mine)
  assert c.router.to_dict() == dict(name="mine", k=1, temperature=0.5,
                                    loss_weights=dict(balance=0.02))
  moe.validate(c)
  layer = make_layer(mine, k=2, dispatch=mode)
  y, aux = run(layer, X)
  cap = None if mode == "dropless" else math.ceil(2 * 8 / 4)
  want, balance = cosine_reference(layer, X, 2, cap)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux.weighted_loss, 0.02 * balance, rtol=1e-5)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def f(params, x):
    y, aux = moe.capture_aux(nnx.merge(graphdef, params, rest, copy=True))(x)
    return jnp.sum(jnp.sin(y)) + aux.total_loss

  check_grads(jax.jit(f), (params, X[:1, :6]), order=1, modes=["rev"], eps=1e-3, atol=2e-2,
              rtol=2e-2)
  assert np.abs(jax.jit(jax.grad(f))(params, X)["router"]["kernel"][...]).max() > 0
  with pytest.raises(ValueError, match=r"^MoE config: router\.temperature=0\.0 must be > 0$"):
    make_layer(mine, router__temperature=0.0)


def test_layer_takes_a_router_instance(mine):
  c = moe.default_config(mine)
  c.num_experts, c.hidden_dim = 4, 16
  router = CosineRouter(8, c, rngs=nnx.Rngs(7))
  layer = moe.MoELayer(8, c, rngs=nnx.Rngs(0), router=router)
  layer.eval()
  assert layer.router is router
  y, _ = run(layer, X)
  np.testing.assert_allclose(y, cosine_reference(layer, X, 1, 2)[0], rtol=1e-5, atol=1e-5)
  top_k = moe.default_config()
  top_k.num_experts, top_k.hidden_dim = 4, 16
  injected = TopKRouter(8, top_k, rngs=nnx.Rngs(7))
  layer = moe.MoELayer(8, top_k, rngs=nnx.Rngs(0), router=injected)
  np.testing.assert_array_equal(layer.router.kernel[...], injected.kernel[...])
  assert not np.array_equal(layer.router.kernel[...],
                            moe.MoELayer(8, top_k, rngs=nnx.Rngs(0)).router.kernel[...])
  with pytest.raises(ValueError, match="router.temperature"):  # checked against its class
    moe.MoELayer(8, top_k, rngs=nnx.Rngs(0), router=router)
  with pytest.raises(ValueError, match=r"router=.*Linear.*Router subclass"):
    moe.MoELayer(8, top_k, rngs=nnx.Rngs(0), router=nnx.Linear(8, 4, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("router,fields", [
    ("top_k", "bpr init_std k noise_std renormalize loss_weights.balance loss_weights.importance "
              "loss_weights.load loss_weights.z_loss"),
    ("expert_choice", "init_std loss_weights.z_loss"),
    ("soft", "soft.slots_per_expert"),
    ("clusters", "bpr clusters.expert_dropout clusters.lambda_var clusters.num_clusters "
                 "clusters.proj_dim clusters.resample_every clusters.temperature k renormalize "
                 "seed loss_weights.balance loss_weights.variance"),
    ("hash", "k seed"),
    ("random", "k seed"),
])
def test_router_node_holds_only_the_knobs_its_router_reads(router, fields):
  got = moe.default_config(router).router.to_dict()
  flat = {f"{k}.{leaf}" if isinstance(v, dict) else k
          for k, v in got.items() if k != "name" for leaf in (v if isinstance(v, dict) else [k])}
  assert flat == set(fields.split())
  if router == "top_k":  # the defaults of before, V-MoE loss weights
    assert got == dict(
        name="top_k", k=1, noise_std=1.0, renormalize=False, bpr=True, init_std=0.02,
        loss_weights=dict(importance=0.005, load=0.005, balance=0.0, z_loss=0.0))


def test_configs_that_set_router_knobs_build_valid_moe_nodes():
  for variant in ("reference", "small"):
    m = moec_imagenet.get_config(variant).model.moe
    moe.validate(m)
    assert m.router.name == "clusters" and m.router.clusters.expert_dropout == 0.5
    assert m.router.loss_weights.to_dict() == dict(balance=0.01, variance=0.01)
  for name, model in compare_routers.get_config("full").strategies.items():
    if "moe" in model:
      moe.validate(model.moe)
