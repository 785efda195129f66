"""MoEC cluster router (Xie et al., AAAI 2023): cosine routing over experts grouped in clusters,
a cluster-variance loss, and cluster-level expert dropout."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moe_jax.routing import losses, ops
from moe_jax.routing.base import TokenChoiceRouter, fail
from moe_jax.routing.plan import RoutingPlan
from moe_jax.routing.soft import _l2_normalize
from moe_jax.routing.top_k import token_choice_plan, token_choice_plan_config


class RouterStep(nnx.Variable):
  """Train-mode call counter of a router (drives the expert-dropout resampling schedule)."""


class RouterKey(nnx.Variable):
  """Fixed key of a router's expert-dropout masks."""


def surviving_experts(key: jax.Array, num_experts: int, num_clusters: int,
                      rate: float) -> jax.Array:
  """Cluster-level expert dropout mask `[E]` (True = alive): each expert dropped with
  probability `rate`, but the expert with the largest draw of every cluster always survives."""
  u = jax.random.uniform(key, (num_clusters, num_experts // num_clusters))
  alive = (u >= rate) | (u == jnp.max(u, axis=1, keepdims=True))
  return alive.reshape(num_experts)


def in_top_clusters(logits: jax.Array, num_clusters: int, k: int) -> jax.Array:
  """`[G, S, E]` True where the expert lies in one of the token's k clusters, ranked by their best
  logit (at k=1: the cluster of the token's top-1 expert)."""
  G, S, E = logits.shape
  best = jnp.max(logits.reshape(G, S, num_clusters, E // num_clusters), axis=-1)
  chosen = jnp.sum(jax.nn.one_hot(ops.top_k(best, k)[1], num_clusters, dtype=jnp.int32), -2)
  return jnp.repeat(chosen > 0, E // num_clusters, axis=-1)


class ClusterRouter(TokenChoiceRouter):
  """`x [G, S, D] -> token-choice plan`; logits = cos(W x, e_j) / tau, learnable e_j and tau.

  Experts form `num_clusters` clusters of contiguous experts. In train mode, with
  `expert_dropout > 0`, experts are dropped per cluster (each cluster keeps at least one; the
  mask is redrawn every `resample_every` train calls) and a token re-routes *inside its cluster*
  (MoEC's cluster-level dropout; SPECS.md): it first picks its K clusters from the full routing
  distribution, ranked by their best expert (at K=1 the cluster of its top-1 expert before
  dropout), then its best K surviving experts inside those clusters (without dropout this is
  plain top-K: the top-K experts always lie in the top-K clusters). At K=1 a token whose expert
  survives keeps it; one whose expert was dropped moves to its cluster's best survivor, never to
  another cluster.
  Combine weights, BPR priorities and the losses use the gates renormalised over all survivors
  (softmax of the logits with dropped experts at -inf). The paper leaves open how a displaced
  token is re-routed; cluster-first is the choice that keeps the cluster structure it relies on.
  """

  loss_weights = dict(balance=0.01, variance=0.01)  # MoEC gate-loss weight 0.01

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    c = token_choice_plan_config()
    c.seed = 0  # Key of the expert-dropout masks.
    c.clusters = ml_collections.ConfigDict(dict(
        num_clusters=2,
        proj_dim=32,  # Router projection h = W x.
        temperature=0.07,  # Initial learnable temperature of the cosine logits.
        lambda_var=1.0,  # Weight of the cluster-variance term inside l_aux.
        expert_dropout=0.0,  # Cluster-level expert dropout rate (train only).
        resample_every=1,  # Steps between redraws of the dropped-expert mask.
    ))
    return c

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict) -> None:
    super().validate(config)
    c, E, k = config.router.clusters, config.num_experts, config.router.k
    G = c.num_clusters
    if G < 1 or E % G:
      fail("router.clusters.num_clusters", f"={G} must divide num_experts={E}")
    if not 0.0 <= c.expert_dropout < 1.0:
      fail("router.clusters.expert_dropout", f"={c.expert_dropout} must be in [0, 1)")
    if c.resample_every < 1:
      fail("router.clusters.resample_every", f"={c.resample_every} must be >= 1")
    if c.expert_dropout > 0 and k > G:
      fail("router.k", f"={k} must be <= router.clusters.num_clusters={G} with expert dropout "
           "(only one expert per cluster is sure to survive)")
    if c.temperature <= 0:
      fail("router.clusters.temperature", f"={c.temperature} must be > 0")

  def __init__(self, dim: int, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    r, c = config.router, config.router.clusters
    self.num_experts, self.num_clusters = config.num_experts, c.num_clusters
    self.k, self.renormalize, self.bpr = r.k, r.renormalize, r.bpr
    self.lambda_var, self.dropout_rate = c.lambda_var, c.expert_dropout
    self.resample_every = c.resample_every
    self.proj = nnx.Param(jax.random.normal(rngs.params(), (dim, c.proj_dim), jnp.float32)
                          / jnp.sqrt(dim))
    self.expert_embedding = nnx.Param(
        jax.random.normal(rngs.params(), (self.num_experts, c.proj_dim), jnp.float32))
    self.log_temperature = nnx.Param(jnp.log(jnp.asarray(c.temperature, jnp.float32)))
    self.step = RouterStep(jnp.zeros((), jnp.int32))
    self.mask_key = RouterKey(jax.random.key_data(jax.random.key(r.seed)))
    self.deterministic = False

  def alive(self) -> jax.Array:
    """The current expert-dropout mask `[E]`."""
    key = jax.random.fold_in(jax.random.wrap_key_data(self.mask_key[...]),
                             self.step[...] // self.resample_every)
    return surviving_experts(key, self.num_experts, self.num_clusters, self.dropout_rate)

  def __call__(self, x: jax.Array) -> RoutingPlan:
    h = jnp.einsum("gsd,dp->gsp", x.astype(jnp.float32), self.proj[...])
    cosine = jnp.einsum("gsp,ep->gse", _l2_normalize(h, -1),
                        _l2_normalize(self.expert_embedding[...], -1))
    logits = cosine / jnp.exp(self.log_temperature[...])
    clusters = self.num_clusters
    alive = selectable = jnp.ones((self.num_experts,), bool)
    if not self.deterministic and self.dropout_rate > 0:
      alive = self.alive()
      selectable = alive & in_top_clusters(logits, clusters, self.k)
      self.step[...] = self.step[...] + 1
    logits = jnp.where(alive, logits, -jnp.inf)
    gates = jax.nn.softmax(logits, axis=-1)
    plan = token_choice_plan(jnp.where(selectable, gates, 0.0), logits, self.k,
                             self.renormalize, self.bpr)
    return plan.replace(
        aux_losses={"balance": losses.balance_loss(gates, plan.expert_index),
                    "variance": self.lambda_var * losses.cluster_variance_loss(gates, clusters)},
        metrics={**plan.metrics, "router_entropy": losses.router_entropy(gates),
                 "cluster_load": plan.metrics["load"].reshape(clusters, -1).sum(-1),
                 "dropped_experts": jnp.sum(~alive).astype(jnp.float32)})
