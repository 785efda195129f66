"""The expert bank: E independent MLPs `D -> F -> D` stored as stacked weights."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.moe import grouped_matmul

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": nnx.gelu, "relu": nnx.relu, "silu": nnx.silu, "tanh": jnp.tanh}


class ExpertBank(nnx.Module):
  """Stacked expert MLPs. Weights: fc1 `[E, D, F]`, fc2 `[E, F, D]` (+ biases `[E, F]`, `[E, D]`)."""

  def __init__(self, num_experts: int, dim: int, hidden_dim: int, *, activation: str = "gelu",
               dropout_rate: float = 0.0, dtype: str = "float32", rngs: nnx.Rngs):
    init = jax.nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
    self.fc1_kernel = nnx.Param(init(rngs.params(), (num_experts, dim, hidden_dim)))
    self.fc1_bias = nnx.Param(jnp.zeros((num_experts, hidden_dim)))
    self.fc2_kernel = nnx.Param(init(rngs.params(), (num_experts, hidden_dim, dim)))
    self.fc2_bias = nnx.Param(jnp.zeros((num_experts, dim)))
    self.activation = ACTIVATIONS[activation]
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.dtype = jnp.dtype(dtype)

  @property
  def num_experts(self) -> int:
    return self.fc1_kernel.shape[0]

  def __call__(self, x: jax.Array, row_weights: jax.Array | None = None) -> jax.Array:
    """Batched experts: `x [E, N, D] -> [E, N, D]`, expert e applied to `x[e]`, its row n times
    `row_weights [E, N]` if given (see `_weighted_fc2`)."""
    dt = self.dtype
    h = jnp.einsum("end,edf->enf", x.astype(dt), self.fc1_kernel[...].astype(dt))
    h = self.dropout(self.activation(h + self.fc1_bias[...][:, None].astype(dt)))
    return _weighted_fc2(h, row_weights, lambda h: jnp.einsum(
        "enf,efd->end", h, self.fc2_kernel[...].astype(dt)), self.fc2_bias[...][:, None].astype(dt))

  def grouped(self, x: jax.Array, group_sizes: jax.Array, backend: str, block_size: int,
              row_weights: jax.Array | None = None) -> jax.Array:
    """Grouped experts over expert-sorted rows: `x [P, D]`, `group_sizes [E]` -> `[P, D]`, row p
    times `row_weights [P]` if given (see `_weighted_fc2`).

    Rows `[sum(group_sizes[:e]), sum(group_sizes[:e+1]))` belong to expert e; rows past the total
    are padding and come back as zeros.
    """
    dt = self.dtype
    gmm = lambda lhs, rhs: grouped_matmul.gmm(lhs, rhs, group_sizes, backend=backend,
                                              block_size=block_size)
    row_expert = grouped_matmul.row_groups(group_sizes, x.shape[0])
    take = lambda bias: jnp.take(bias.astype(dt), row_expert, axis=0, mode="fill", fill_value=0)
    h = gmm(x.astype(dt), self.fc1_kernel[...].astype(dt)) + take(self.fc1_bias[...])
    h = self.dropout(self.activation(h))
    return _weighted_fc2(h, row_weights, lambda h: gmm(h, self.fc2_kernel[...].astype(dt)),
                         take(self.fc2_bias[...]))


def _weighted_fc2(h: jax.Array, row_weights: jax.Array | None,
                  matmul: Callable[[jax.Array], jax.Array], bias: jax.Array) -> jax.Array:
  """`w * (h W2 + b2)` for hidden rows `h [..., F]` and `w = row_weights [...]`, computed as
  `(w h) W2 + w b2` (equal up to float rounding).

  Scaling the hidden rows before fc2 makes the weights' gradient `<dL/d(w h), h> + <dL/dy, b2>`:
  `dL/d(w h) = dL/dy W2^T` is what the hidden gradient needs anyway, so the weights need not read
  `h W2`, and a loss that does not read the output (`sum(layer(x))`: its cotangent is constant)
  runs no forward fc2 GEMM, like a dense FFN under the same loss (bench/RESULTS.md, issue 22).
  """
  if row_weights is None:
    return matmul(h) + bias
  w = row_weights[..., None].astype(h.dtype)
  return matmul(w * h) + w * bias
