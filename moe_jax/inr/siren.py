"""A bank of E stacked SIRENs (Sitzmann et al. 2020) with one frequency w0 per member.

Layer l of member e computes `sin(w0[e] * (h @ W[e] + b[e]))`. Init (SIREN): the first layer of a
network (on coordinates) draws `W, b ~ U(-1/n, 1/n)`, so w0 sets the input frequencies; later
layers draw `W, b ~ U(-sqrt(6/n)/w0, sqrt(6/n)/w0)`, so the pre-activations `w0 h W` have unit
variance whatever w0 is (inputs `sin(.)` have variance 1/2), and w0 scales the gradient, i.e.
how fast a member moves towards high frequencies. An optional linear head has the same bound.

The bank follows the core `ExpertBank` protocol (`__call__` on `[E, N, D]` buffers for capacity
dispatch, `grouped` on expert-sorted rows for dropless dispatch, both with optional per-row
combine weights, `dtype`), so MoE dispatch runs it.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.moe import grouped_matmul


def siren_bound(fan_in: int, w0: jax.Array, first: bool) -> jax.Array:
  """Uniform init half-width `[E]` of a layer with `fan_in` inputs and member frequencies `w0 [E]`."""
  if first:
    return jnp.full_like(w0, 1.0 / fan_in)
  return jnp.sqrt(6.0 / fan_in) / w0


class SirenBank(nnx.Module):
  """E SIRENs `widths[0] -> ... -> widths[-1]` (sine layers) [-> linear `out_dim`], stacked.

  Weights: kernels `[E, w_l, w_{l+1}]`, biases `[E, w_{l+1}]`; `w0` (E floats) is a
  fixed constant, not a parameter.
  """

  def __init__(self, num: int, widths: Sequence[int], w0: Sequence[float], *, first: bool,
               out_dim: int | None = None, dtype: str = "float32", rngs: nnx.Rngs):
    if len(w0) != num:
      raise ValueError(f"SirenBank: {len(w0)} frequencies for {num} members")
    self.w0 = tuple(float(w) for w in w0)
    w0_array = jnp.asarray(self.w0, jnp.float32)
    dims = list(widths) + ([out_dim] if out_dim else [])
    kernels, biases = [], []
    for l, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
      bound = siren_bound(n_in, w0_array, first and l == 0)
      kernels.append(nnx.Param(jax.random.uniform(
          rngs.params(), (num, n_in, n_out), minval=-1, maxval=1) * bound[:, None, None]))
      biases.append(nnx.Param(jax.random.uniform(
          rngs.params(), (num, n_out), minval=-1, maxval=1) * bound[:, None]))
    self.kernels, self.biases = nnx.List(kernels), nnx.List(biases)
    self.num_sine = len(widths) - 1
    self.dtype = jnp.dtype(dtype)

  @property
  def num_experts(self) -> int:
    return len(self.w0)

  def _layers(self, h: jax.Array, matmul, take) -> jax.Array:
    """Runs every layer; `matmul(h, kernel [E, n, m])` and `take(per-member array [E, ...])`
    (the member's row, broadcast against h) abstract over the batched / grouped layouts."""
    dt = self.dtype
    for l, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
      h = matmul(h, kernel[...].astype(dt)) + take(bias[...].astype(dt))
      if l < self.num_sine:
        h = jnp.sin(take(jnp.asarray(self.w0, dt)[:, None]) * h)
    return h

  def __call__(self, x: jax.Array, row_weights: jax.Array | None = None) -> jax.Array:
    """Batched members: `x [E, N, D_in] -> [E, N, D_out]`, member e applied to `x[e]`, its row
    n times `row_weights [E, N]` if given."""
    y = self._layers(x.astype(self.dtype), lambda h, k: jnp.einsum("enc,ecd->end", h, k),
                     lambda a: a[:, None])
    return y if row_weights is None else row_weights[..., None].astype(y.dtype) * y

  def grouped(self, x: jax.Array, group_sizes: jax.Array, backend: str, block_size: int,
              row_weights: jax.Array | None = None) -> jax.Array:
    """Expert-sorted rows (core dropless dispatch): `x [P, D_in]`, `group_sizes [E]` -> `[P, D_out]`,
    row p times `row_weights [P]` if given."""
    row_member = grouped_matmul.row_groups(group_sizes, x.shape[0])
    matmul = lambda h, k: grouped_matmul.gmm(h, k, group_sizes, backend=backend,
                                             block_size=block_size)
    take = lambda a: jnp.take(a, row_member, axis=0, mode="fill", fill_value=0)
    y = self._layers(x.astype(self.dtype), matmul, take)
    return y if row_weights is None else row_weights[:, None].astype(y.dtype) * y
