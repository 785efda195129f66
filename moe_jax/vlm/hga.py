"""Hierarchical Group Attention (MoCHA): fuses the connector tokens of several encoders.

The groups are the encoders: `groups [T]` gives each token of `x [B, T, H]` its encoder index.
Both variants aggregate `x_agg` from the token's own group (intra) and from the other groups
(inter), then mix with a per-token gate `g [B, T, 1]`:  `y = LayerNorm((1 - g) x + g x_agg)`.

- `reference`: the paper's code (Pbhgit/MoCHA `llava/model/hga.py`, `build_innovative_graph_v3`
  + `innovative_graph_propagation_v3`, called with k=10, cross_weight=0.7), per image:
  1. `sim = cos(x_t, x_s) * exp(1 / mean_t |x_t|)`, self-similarity excluded;
  2. each token keeps exactly `int(k * cross_weight)` neighbours of its own group (7; fewer when
     the group is smaller) and `k - int(k * cross_weight)` of the other groups (3), the largest
     similarities, ties to the lower token index (`lax.top_k`);
  3. edge weights: the kept similarities min-max normalised over all edges of the image,
     `(s - min) / (max - min + 1e-8)`;
  4. the graph is symmetrised: each edge (t, s, w) also counts as (s, t, w); weights of a pair
     picked both ways add up;
  5. `x_agg = sum_s w_ts x_s / (sum_s w_ts + 1e-8)`; `g = sigmoid(gate_scale * (mean_d |x -
     x_agg| - gate_threshold))` (10, 0.2 there);
  6. LayerNorm without parameters (eps 1e-5). The reference HGA has no parameters at all.
  Under a mesh each device builds the graphs of its own images (`attention.map_batch_shards`):
  the same per-image math, no collective (XLA's partitioner would gather the whole batch for the
  graph's `top_k` and scatter-add and all-reduce the `[B, T, T]` graph).
- `learned` (ours, not in the paper): multi-head attention restricted to the own group plus
  `cross_weight` times attention restricted to the other groups; `g = sigmoid(Linear([x,
  x_agg]))`; LayerNorm with scale and bias.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moe_jax.vlm import attention

KINDS = ("reference", "learned", "none")
LAYER_NORM_EPS = 1e-5  # torch.nn.functional.layer_norm's default, as the reference uses it


def hga_config() -> ml_collections.ConfigDict:
  """The paper's HGA settings (the reference code's call: k=10, cross_weight=0.7)."""
  return ml_collections.ConfigDict(dict(
      kind="reference",  # 'reference' | 'learned' | 'none' (tokens go to the LM as they are)
      k=10, cross_weight=0.7,  # reference: int(k * cross_weight) = 7 intra, k - 7 = 3 inter
      gate_scale=10.0, gate_threshold=0.2,  # reference gate
      num_heads=4))  # learned variant


def group_ids(sizes: tuple[int, ...]) -> np.ndarray:
  """Token -> group index `[sum(sizes)]` for groups of consecutive tokens."""
  return np.repeat(np.arange(len(sizes)), sizes)


def split_k(k: int, cross_weight: float) -> tuple[int, int]:
  """(intra, inter) neighbour counts as the reference splits k: `int(k * cross_weight)`, rest."""
  intra = int(k * cross_weight)
  return intra, k - intra


def _parameter_free_layer_norm(x: jax.Array) -> jax.Array:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS)


def reference_edges(x: jax.Array, groups: np.ndarray, k: int,
                    cross_weight: float) -> tuple[np.ndarray, jax.Array, jax.Array]:
  """The reference HGA's directed edges per image before symmetrisation: `(row [N] (static, the
  same for every image), col [B, N], similarity [B, N])`, N = sum over tokens of the neighbours
  each keeps (steps 1-2 of the module docstring)."""
  B = x.shape[0]
  groups = np.asarray(groups)
  norms = jnp.linalg.norm(x, axis=-1, keepdims=True)  # [B, T, 1]
  scale = jnp.exp(1.0 / jnp.mean(norms, axis=(1, 2)))  # [B]: exp of the adaptive temperature
  xn = x / jnp.maximum(norms, 1e-12)  # F.normalize
  sim = jnp.einsum("btd,bsd->bts", xn, xn) * scale[:, None, None]
  k_intra, k_inter = split_k(k, cross_weight)
  rows, cols, vals = [np.zeros(0, np.int64)], [jnp.zeros((B, 0), jnp.int32)], [sim[:, 0, :0]]
  for g in np.unique(groups):
    own = np.flatnonzero(groups == g)
    other = np.flatnonzero(groups != g)
    for candidates, want in ((own, min(k_intra, len(own) - 1)), (other, min(k_inter, len(other)))):
      if want <= 0:
        continue
      block = sim[:, own][:, :, candidates]  # [B, |own|, |candidates|]
      if candidates is own:
        block = jnp.where(np.eye(len(own), dtype=bool), -jnp.inf, block)
      top, idx = jax.lax.top_k(block, want)  # exactly `want`; ties: the lower index first
      rows.append(np.repeat(own, want))
      cols.append(jnp.asarray(candidates, jnp.int32)[idx].reshape(B, -1))
      vals.append(top.reshape(B, -1))
  return np.concatenate(rows), jnp.concatenate(cols, 1), jnp.concatenate(vals, 1)


def reference_weights(x: jax.Array, groups: np.ndarray, k: int, cross_weight: float) -> jax.Array:
  """The reference HGA's symmetrised edge weights as a dense `[B, T, T]` matrix (unnormalised:
  `w[b, t, s]` is what token t gathers from token s before dividing by the row sum)."""
  B, T, _ = x.shape
  row, col, sim = reference_edges(x, groups, k, cross_weight)
  lo, hi = sim.min(1, keepdims=True, initial=jnp.inf), sim.max(1, keepdims=True, initial=-jnp.inf)
  weight = (sim - lo) / (hi - lo + 1e-8)  # min-max over the image's edges
  directed = jnp.zeros((B, T, T), x.dtype).at[np.arange(B)[:, None], row[None], col].add(weight)
  return directed + directed.transpose(0, 2, 1)  # each edge both ways


def _reference_aggregate(x: jax.Array, groups: np.ndarray, c) -> tuple[jax.Array, jax.Array]:
  w = reference_weights(x, groups, c.k, c.cross_weight)
  x_agg = (w / (w.sum(-1, keepdims=True) + 1e-8)) @ x
  diff = jnp.mean(jnp.abs(x - x_agg), axis=-1, keepdims=True)
  return x_agg, jax.nn.sigmoid(c.gate_scale * (diff - c.gate_threshold))


class ReferenceHGA(nnx.Module):
  """The paper's similarity-graph HGA with its adaptive gate; no parameters."""

  def __init__(self, c: ml_collections.ConfigDict):
    self.c = ml_collections.FrozenConfigDict(c)

  def aggregate(self, x: jax.Array, groups: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """`(x_agg [B, T, H], gate [B, T, 1])` in float32, each device on its own images."""
    return attention.map_batch_shards(lambda x: _reference_aggregate(x, groups, self.c),
                                      x.astype(jnp.float32))

  def __call__(self, x: jax.Array, groups: np.ndarray) -> jax.Array:
    """`x [B, T, H]`, `groups [T]` (static) -> `[B, T, H]` float32."""
    x = x.astype(jnp.float32)
    x_agg, g = self.aggregate(x, groups)
    return _parameter_free_layer_norm((1.0 - g) * x + g * x_agg)


class LearnedHGA(nnx.Module):
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
    """`(x_agg [B, T, H], gate [B, T, 1])`."""
    same = groups[:, None] == groups[None, :]
    x_agg = self.intra(x, mask=jnp.asarray(same)[None, None])
    if not same.all():  # a single group has no other group to attend to
      x_agg = x_agg + self.cross_weight * self.inter(x, mask=jnp.asarray(~same)[None, None])
    return x_agg, jax.nn.sigmoid(self.gate(jnp.concatenate([x, x_agg], axis=-1)))

  def __call__(self, x: jax.Array, groups: np.ndarray) -> jax.Array:
    """`x [B, T, H]`, `groups [T]` (static) -> `[B, T, H]`."""
    x_agg, g = self.aggregate(x, groups)
    return self.norm((1.0 - g) * x + g * x_agg)


def build_hga(width: int, c: ml_collections.ConfigDict, *,
              rngs: nnx.Rngs) -> ReferenceHGA | LearnedHGA | None:
  """The HGA named by `c.kind` (None for 'none')."""
  if c.kind not in KINDS:
    raise ValueError(f"model.hga.kind={c.kind!r} is unknown; use one of {KINDS}")
  if c.k < 0:
    raise ValueError(f"model.hga.k={c.k} must be >= 0")
  if not 0.0 <= c.cross_weight <= 1.0:
    raise ValueError(f"model.hga.cross_weight={c.cross_weight} must be in [0, 1] (the share of "
                     "model.hga.k taken inside the own group)")
  if c.kind == "none":
    return None
  return ReferenceHGA(c) if c.kind == "reference" else LearnedHGA(width, c, rngs=rngs)
