"""The expert bank: E independent MLPs `D -> F -> D` (or `D -> F -> D_out`) stored as stacked
weights."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.moe import grouped_matmul

# 'gelu' is the tanh approximation (the ViT default); 'gelu_exact' the erf GELU (HF ViT, DINOv2).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": nnx.gelu, "gelu_exact": functools.partial(nnx.gelu, approximate=False),
    "relu": nnx.relu, "silu": nnx.silu, "tanh": jnp.tanh}


class ExpertBank(nnx.Module):
  """Stacked expert MLPs. Weights: fc1 `[E, D, F]`, fc2 `[E, F, D_out]` (+ biases `[E, F]`,
  `[E, D_out]`); `out_dim` D_out defaults to D."""

  def __init__(self, num_experts: int, dim: int, hidden_dim: int, *, activation: str = "gelu",
               dropout_rate: float = 0.0, dtype: str = "float32", out_dim: int | None = None,
               rngs: nnx.Rngs):
    out_dim = dim if out_dim is None else out_dim
    init = jax.nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
    self.fc1_kernel = nnx.Param(init(rngs.params(), (num_experts, dim, hidden_dim)))
    self.fc1_bias = nnx.Param(jnp.zeros((num_experts, hidden_dim)))
    self.fc2_kernel = nnx.Param(init(rngs.params(), (num_experts, hidden_dim, out_dim)))
    self.fc2_bias = nnx.Param(jnp.zeros((num_experts, out_dim)))
    self.activation = ACTIVATIONS[activation]
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.dtype = jnp.dtype(dtype)

  @property
  def num_experts(self) -> int:
    return self.fc1_kernel.shape[0]

  def __call__(self, x: jax.Array) -> jax.Array:
    """Batched experts: `x [E, N, D] -> [E, N, D_out]`, expert e applied to `x[e]`."""
    dt = self.dtype
    h = jnp.einsum("end,edf->enf", x.astype(dt), self.fc1_kernel[...].astype(dt))
    h = self.dropout(self.activation(h + self.fc1_bias[...][:, None].astype(dt)))
    y = jnp.einsum("enf,efd->end", h, self.fc2_kernel[...].astype(dt))
    return y + self.fc2_bias[...][:, None].astype(dt)

  def grouped(self, x: jax.Array, group_sizes: jax.Array, backend: str,
              block_size: int) -> jax.Array:
    """Grouped experts over expert-sorted rows: `x [P, D]`, `group_sizes [E]` -> `[P, D_out]`.

    Rows `[sum(group_sizes[:e]), sum(group_sizes[:e+1]))` belong to expert e; rows past the total
    are padding and come back as zeros.
    """
    dt = self.dtype
    gmm = lambda lhs, rhs: grouped_matmul.gmm(lhs, rhs, group_sizes, backend=backend,
                                              block_size=block_size)
    row_expert = grouped_matmul.row_groups(group_sizes, x.shape[0])
    h = gmm(x.astype(dt), self.fc1_kernel[...].astype(dt))
    h = h + jnp.take(self.fc1_bias[...].astype(dt), row_expert, axis=0, mode="fill",
                     fill_value=0)
    h = self.dropout(self.activation(h))
    y = gmm(h, self.fc2_kernel[...].astype(dt))
    return y + jnp.take(self.fc2_bias[...].astype(dt), row_expert, axis=0, mode="fill",
                        fill_value=0)
