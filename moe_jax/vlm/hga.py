"""Hierarchical Group Attention (MoCHA): fuses the connector tokens of several encoders.

The groups are the encoders: `groups [T]` gives each token of `x [B, T, H]` its encoder index.
Both variants aggregate `x_agg` from the token's own group (intra) and from the other groups
(inter), then mix with a per-token gate `g [B, T, 1]`:  `y = LayerNorm((1 - g) x + g x_agg)`.

- `reference` (the paper's code): cosine-similarity graph; a token keeps its top `k_intra`
  neighbours in its own group and its top `k_inter` among the other groups' tokens (itself
  excluded); kept similarities, clipped at 0, cross ones times `cross_weight`, are normalised to
  sum to 1 per token and aggregate `x_agg`; `g = sigmoid(gate_scale * (mean_d|x - x_agg| -
  gate_threshold))`. No parameters besides the LayerNorm.
- `learned`: multi-head attention restricted to the own group plus `cross_weight` times
  attention restricted to the other groups; `g = sigmoid(Linear([x, x_agg]))`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

KINDS = ("reference", "learned", "none")


def hga_config() -> ml_collections.ConfigDict:
  """The paper's reference HGA settings."""
  return ml_collections.ConfigDict(dict(
      kind="reference",  # 'reference' | 'learned' | 'none' (tokens go to the LM as they are)
      k_intra=7, k_inter=3, cross_weight=0.7,
      gate_scale=10.0, gate_threshold=0.2,  # reference gate
      num_heads=4))  # learned variant


def group_ids(sizes: tuple[int, ...]) -> np.ndarray:
  """Token -> group index `[sum(sizes)]` for groups of consecutive tokens."""
  return np.repeat(np.arange(len(sizes)), sizes)


def _top_k_mask(scores: jax.Array, allowed: np.ndarray, k: int) -> jax.Array:
  """`[B, T, T]` bool: for each row, its `k` largest `scores` among `allowed [T, T]` entries
  (all of them where a row allows fewer than k)."""
  k = min(k, int(allowed.sum(-1).max()))
  if k < 1:
    return jnp.zeros(scores.shape, bool)
  masked = jnp.where(allowed, scores, -jnp.inf)
  kth = jax.lax.top_k(masked, k)[0][..., -1:]  # -inf where a row has fewer than k allowed
  return allowed & (masked >= kth)


def reference_weights(x: jax.Array, groups: np.ndarray, k_intra: int, k_inter: int,
                      cross_weight: float) -> jax.Array:
  """Aggregation weights `[B, T, T]` of the reference HGA (rows sum to 1, or 0 if nothing kept)."""
  xn = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
  sim = jnp.einsum("btd,bsd->bts", xn, xn)
  same = groups[:, None] == groups[None, :]
  not_self = ~np.eye(len(groups), dtype=bool)
  intra = _top_k_mask(sim, same & not_self, k_intra)
  inter = _top_k_mask(sim, ~same, k_inter)
  w = jnp.maximum(sim, 0.0) * (intra + cross_weight * inter)
  return w / jnp.maximum(w.sum(-1, keepdims=True), 1e-6)


class _GroupMix(nnx.Module):
  """Shared output: `LayerNorm((1 - g) x + g x_agg)` from a subclass's `aggregate` and `norm`."""

  def aggregate(self, x: jax.Array, groups: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """`(x_agg [B, T, H], gate [B, T, 1])`."""
    raise NotImplementedError

  def __call__(self, x: jax.Array, groups: np.ndarray) -> jax.Array:
    """`x [B, T, H]`, `groups [T]` (static) -> `[B, T, H]`."""
    x_agg, g = self.aggregate(x, groups)
    return self.norm((1.0 - g) * x + g * x_agg)


class ReferenceHGA(_GroupMix):
  """The paper's similarity-graph HGA with its adaptive gate."""

  def __init__(self, width: int, c: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.c = ml_collections.FrozenConfigDict(c)
    self.norm = nnx.LayerNorm(width, rngs=rngs)

  def aggregate(self, x: jax.Array, groups: np.ndarray) -> tuple[jax.Array, jax.Array]:
    c = self.c
    x = x.astype(jnp.float32)
    x_agg = reference_weights(x, groups, c.k_intra, c.k_inter, c.cross_weight) @ x
    diff = jnp.mean(jnp.abs(x - x_agg), axis=-1, keepdims=True)
    return x_agg, jax.nn.sigmoid(c.gate_scale * (diff - c.gate_threshold))


class LearnedHGA(_GroupMix):
  """Attention within the own group plus `cross_weight` x attention across groups; learned gate."""

  def __init__(self, width: int, c: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    if width % c.num_heads:
      raise ValueError(f"model.hga.num_heads={c.num_heads} must divide the LM width {width}")
    attention = lambda: nnx.MultiHeadAttention(c.num_heads, width, decode=False, rngs=rngs)
    self.intra, self.inter = attention(), attention()
    self.cross_weight = c.cross_weight
    self.gate = nnx.Linear(2 * width, 1, rngs=rngs)
    self.norm = nnx.LayerNorm(width, rngs=rngs)

  def aggregate(self, x: jax.Array, groups: np.ndarray) -> tuple[jax.Array, jax.Array]:
    same = groups[:, None] == groups[None, :]
    x_agg = self.intra(x, mask=jnp.asarray(same)[None, None])
    if not same.all():  # a single group has no other group to attend to
      x_agg = x_agg + self.cross_weight * self.inter(x, mask=jnp.asarray(~same)[None, None])
    return x_agg, jax.nn.sigmoid(self.gate(jnp.concatenate([x, x_agg], axis=-1)))


def build_hga(width: int, c: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> _GroupMix | None:
  """The HGA named by `c.kind` (None for 'none')."""
  if c.kind not in KINDS:
    raise ValueError(f"model.hga.kind={c.kind!r} is unknown; use one of {KINDS}")
  for field in ("k_intra", "k_inter"):
    if c[field] < 0:
      raise ValueError(f"model.hga.{field}={c[field]} must be >= 0")
  if not 0.0 <= c.cross_weight:
    raise ValueError(f"model.hga.cross_weight={c.cross_weight} must be >= 0")
  if c.kind == "none":
    return None
  return (ReferenceHGA if c.kind == "reference" else LearnedHGA)(width, c, rngs=rngs)
