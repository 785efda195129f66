"""Auxiliary routing losses and routing metrics (pure functions, float32).

Shapes: gates / probs `[G, S, E]` (probabilities over experts), logits `[G, S, E]`,
expert_index `[G, S, K]`. Losses are averaged over routing groups G.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import ops


def cv_squared(x: jax.Array, axis: int = -1) -> jax.Array:
  """Squared coefficient of variation var(x) / mean(x)^2 along `axis` (population variance)."""
  mean = jnp.mean(x, axis=axis)
  return jnp.var(x, axis=axis) / (mean**2 + 1e-9)


def importance_loss(gates: jax.Array) -> jax.Array:
  """V-MoE importance loss CV(sum_t g_t)^2, mean over groups."""
  return jnp.mean(cv_squared(jnp.sum(gates, axis=-2)))


def load_loss(logits: jax.Array, noisy_logits: jax.Array, noise_std: float, k: int) -> jax.Array:
  """V-MoE load loss CV(load)^2, mean over groups.

  With noise (noise_std > 0) the load of expert e is the smooth `sum_t P(e in top-k of t)`, where
  P is the probability that fresh noise lifts the clean logit over the token's k-th largest noisy
  logit. Without noise it is the (non-differentiable) count of top-k assignments.
  """
  E = logits.shape[-1]
  if noise_std > 0:
    threshold = ops.top_k(noisy_logits, k)[0][..., -1:]
    prob = jax.scipy.stats.norm.sf((threshold - logits) / noise_std)
  else:
    prob = jnp.sum(jax.nn.one_hot(ops.top_k(logits, k)[1], E, dtype=logits.dtype), axis=-2)
  return jnp.mean(cv_squared(jnp.sum(prob, axis=-2)))


def expert_fractions(expert_index: jax.Array, num_experts: int) -> jax.Array:
  """Fraction of tokens whose top-1 choice is each expert: `[G, S, K] -> [G, E]`."""
  return jnp.mean(jax.nn.one_hot(expert_index[..., 0], num_experts, dtype=jnp.float32), axis=-2)


def balance_loss(probs: jax.Array, expert_index: jax.Array) -> jax.Array:
  """Switch balance loss `E * sum_e f_e * P_e` (f: top-1 fractions, P: mean prob); 1 if uniform."""
  E = probs.shape[-1]
  f = expert_fractions(expert_index, E)
  P = jnp.mean(probs, axis=-2)
  return jnp.mean(E * jnp.sum(f * P, axis=-1))


def z_loss(logits: jax.Array) -> jax.Array:
  """Router z-loss mean(logsumexp(logits)^2)."""
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


def cluster_variance_loss(probs: jax.Array, num_clusters: int) -> jax.Array:
  """MoEC `E * Var_clu`: mean over clusters of the unbiased variance of `me` inside the cluster.

  `me_j` is the mean routing probability of expert j over the group's tokens (mean rather than
  sum, so the loss does not grow with the group size, like the Switch balance term). Experts form
  `num_clusters` clusters of contiguous experts.
  """
  E = probs.shape[-1]
  me = jnp.mean(probs, axis=-2).reshape(*probs.shape[:-2], num_clusters, E // num_clusters)
  var = jnp.var(me, axis=-1, ddof=1) if E // num_clusters > 1 else jnp.zeros(me.shape[:-1])
  return jnp.mean(E * jnp.mean(var, axis=-1))


def router_entropy(probs: jax.Array) -> jax.Array:
  """Mean per-token entropy (nats) of the routing distribution."""
  return jnp.mean(-jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-30)), axis=-1))


def assignment_load(expert_index: jax.Array, num_experts: int) -> jax.Array:
  """Fraction of all (token, choice) assignments that go to each expert: `-> [E]`."""
  counts = jnp.zeros((num_experts,), jnp.float32).at[expert_index.reshape(-1)].add(1.0)
  return counts / expert_index.size
