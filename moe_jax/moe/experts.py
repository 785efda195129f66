"""The expert bank: E independent MLPs `D -> F -> D` (or `D -> F -> D_out`) stored as stacked
weights."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.moe import grouped_matmul
from moe_jax.parallel import grad_precision
from moe_jax.parallel.grad_precision import broadcast_cast, cast_after

# `[E, N, K] x [E, K, M] -> [E, N, M]`: contract K, batch over the experts E.
_BATCHED_DIMS = (((2,), (1,)), ((0,), (0,)))

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

  def __call__(self, x: jax.Array, row_weights: jax.Array | None = None) -> jax.Array:
    """Batched experts: `x [E, N, D] -> [E, N, D_out]`, expert e applied to `x[e]`, its row n times
    `row_weights [E, N]` if given (see `weighted_linear`)."""
    dt = self.dtype
    h = grad_precision.weight_dot_general(x.astype(dt), self.fc1_kernel[...], _BATCHED_DIMS)
    bias = broadcast_cast(self.fc1_bias[...][:, None], h.shape, dt, like=h)  # [E, N, F]
    h = self.dropout(self.activation(h + bias))
    return weighted_linear(None, h, self.fc2_kernel[...], self.fc2_bias[...][:, None],
                           row_weights, None)

  def grouped(self, x: jax.Array, group_sizes: jax.Array, backend: str, block_size: int,
              row_weights: jax.Array | None = None) -> jax.Array:
    """Grouped experts over expert-sorted rows: `x [P, D]`, `group_sizes [E]` -> `[P, D_out]`, row p
    times `row_weights [P]` if given (see `weighted_linear`).

    Rows `[sum(group_sizes[:e]), sum(group_sizes[:e+1]))` belong to expert e; rows past the total
    are padding and come back as zeros.
    """
    dt = self.dtype
    row_expert = grouped_matmul.row_groups(group_sizes, x.shape[0])
    take = lambda bias: cast_after(
        lambda b: jnp.take(b, row_expert, axis=0, mode="fill", fill_value=0), bias, dt)
    h = _matmul((backend, block_size), x.astype(dt), self.fc1_kernel[...], group_sizes)
    h = self.dropout(self.activation(h + take(self.fc1_bias[...])))
    return weighted_linear((backend, block_size), h, self.fc2_kernel[...],
                           take(self.fc2_bias[...]), row_weights, group_sizes)


Grouping = tuple[str, int] | None  # None: batched `[E, N, .]`; (backend, block_size): grouped rows


def _matmul(grouping: Grouping, h: jax.Array, kernel: jax.Array,
            group_sizes: jax.Array | None) -> jax.Array:
  """Per-expert `h @ kernel[e]` in `h`'s dtype: batched `[E, N, F] x [E, F, D]`, or grouped rows
  `[P, F]`. The kernel comes in its parameter dtype (see `moe_jax.parallel.grad_precision`)."""
  if grouping is None:
    return grad_precision.weight_dot_general(h, kernel, _BATCHED_DIMS)
  backend, block_size = grouping
  return grouped_matmul.gmm(h, grad_precision.weight_operand(kernel, h.dtype), group_sizes,
                            backend=backend, block_size=block_size)


def weighted_linear(grouping: Grouping, h: jax.Array, kernel: jax.Array, bias: jax.Array,
                    row_weights: jax.Array | None, group_sizes: jax.Array | None) -> jax.Array:
  """`w * (h @ kernel[e] + bias)` per row, `w = row_weights` (`h`'s shape without its last axis);
  without weights the plain product.

  The custom gradient never reads the output `h W + b`: `dL/dw = <dL/dy W^T, h> + <dL/dy, b>`,
  from `dL/dy W^T`, which `dL/dh = w dL/dy W^T` needs anyway, and `dL/dW = h^T (w dL/dy)`.
  Autodiff of the forward would take `dL/dw = <dL/dy, h W + b>`, so a loss that does not read
  the output (`sum(layer(x))`: a constant cotangent) still ran the forward GEMM; now it is dead
  code, as in a dense FFN under the same loss (issue 22). The forward is the same formula as
  before; `dL/dh` is `w (dL/dy W^T)` instead of `(w dL/dy) W^T`: equal up to float rounding.
  """
  if row_weights is None:
    y = _matmul(grouping, h, kernel, group_sizes)
    return y + broadcast_cast(bias, y.shape, y.dtype, like=y)
  return _weighted_linear(grouping, h, kernel, bias, row_weights, group_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _weighted_linear(grouping, h, kernel, bias, row_weights, group_sizes):
  w = row_weights[..., None].astype(h.dtype)
  y = _matmul(grouping, h, kernel, group_sizes)
  return w * (y + broadcast_cast(bias, y.shape, y.dtype))


def _weighted_linear_fwd(grouping, h, kernel, bias, row_weights, group_sizes):
  y = _weighted_linear(grouping, h, kernel, bias, row_weights, group_sizes)
  return y, (h, kernel, bias, row_weights, group_sizes)


def _weighted_linear_bwd(grouping, residuals, dy):
  h, kernel, bias, row_weights, group_sizes = residuals
  w = row_weights[..., None].astype(dy.dtype)
  _, matmul_vjp = jax.vjp(lambda h, k: _matmul(grouping, h, k, group_sizes), h, kernel)
  dh_unweighted = matmul_vjp(dy)[0]  # dy W^T; the kernel half of this call is dead code
  w_dy = w * dy
  d_kernel = matmul_vjp(w_dy)[1]  # h^T (w dy); the input half is dead code
  d_weights = (jnp.sum(dh_unweighted * h, axis=-1)
               + jnp.sum(dy * broadcast_cast(bias, dy.shape, dy.dtype), axis=-1))
  broadcast = tuple(i for i, n in enumerate(bias.shape) if n == 1 and dy.shape[i] != 1)
  d_bias = jnp.sum(w_dy.astype(grad_precision.reduction_dtype(dy.dtype, bias.dtype)),
                   axis=broadcast, keepdims=True)
  grads = (w * dh_unweighted, d_kernel, d_bias.astype(bias.dtype),
           d_weights.astype(row_weights.dtype))
  primals = (h, kernel, bias, row_weights)
  return (*(grad_precision.sum_to_primal_type(g, p) for g, p in zip(grads, primals)), None)


_weighted_linear.defvjp(_weighted_linear_fwd, _weighted_linear_bwd)
