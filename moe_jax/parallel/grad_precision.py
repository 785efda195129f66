"""Precision of the gradient reductions of a low-precision model: `mesh.grad_reduce_dtype`.

A model with `model.dtype=bfloat16` keeps float32 parameters and computes in bf16. With the
stock cast (`kernel.astype(bf16)` before the matmul) the weight-gradient matmul of a layer
outputs bf16, and XLA's SPMD partitioner sums its per-device partial results over the batch
axes (`data`, `fsdp`, `expert`) right there: the gradient all-reduces carry bf16 (measured on
TPU v5p through libtpu; XLA:CPU computes bf16 in f32, so its programs show f32 either way).

- "float32" (the default): every parameter (but the flax-internal biases below) reaches its
  gradient reduction in f32. Matmul and convolution kernels go in uncast into `weight_dot_general` /
  `weight_conv_general_dilated`, which cast them to the compute dtype inside a custom VJP whose
  kernel gradient is a matmul with `preferred_element_type=float32` (a bf16 x bf16 -> f32 MXU
  product, no extra FLOPs; XLA:CPU, which has no such dot at run time, gets f32-upcast operands:
  the same exact products), so the partial sums, and the all-reduce, are f32. The convolution's
  kernel gradient is computed from f32 inputs (the patch embedding only: about 1% of a ViT's
  FLOPs). Parameters used elementwise (position embeddings, biases of our own layers, layer
  scales, CLS tokens) go through `broadcast_cast`: broadcast to the activation's shape in f32,
  then cast, so the transposed broadcast (the sum over the batch) runs on the f32 cotangent.
- "bfloat16": the stock cast, gradients reduced in the compute dtype: half the bytes on the wire.

The forward pass is the same program under both options (cast and broadcast commute); only the
backward differs. Not covered: the biases inside flax's `nnx.Linear` / `nnx.MultiHeadAttention`
(flax adds them itself after the matmul; they still reduce in the compute dtype: about 0.1% of a
ViT's gradient elements). The option is read at trace time from `reduce_in`, which the train
step (`moe_jax.train.step.make_train_step`) enters around its gradient; a gradient taken
outside it gets the default, "float32" (eval and inference run the forward only, where the
option does not matter).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moe_jax.parallel.mesh import target_platform

GRAD_REDUCE_DTYPES = ("float32", "bfloat16")
_REDUCE_DTYPE = contextvars.ContextVar("grad_reduce_dtype", default="float32")


def check(dtype: str) -> str:
  if dtype not in GRAD_REDUCE_DTYPES:
    raise ValueError(f"mesh.grad_reduce_dtype={dtype!r}: use 'float32' (gradients reduced in "
                     "f32, the default) or 'bfloat16' (in the compute dtype, half the bytes)")
  return dtype


@contextlib.contextmanager
def reduce_in(dtype: str) -> Iterator[None]:
  """Traces the model's backward inside with gradients reduced in `dtype` (`GRAD_REDUCE_DTYPES`)."""
  token = _REDUCE_DTYPE.set(check(dtype))
  try:
    yield
  finally:
    _REDUCE_DTYPE.reset(token)


def _f32_reduction(compute_dtype, param_dtype) -> bool:
  """Whether a parameter of `param_dtype` used in `compute_dtype` needs the f32 path."""
  return (_REDUCE_DTYPE.get() == "float32" and jnp.dtype(param_dtype) == jnp.float32
          and jnp.dtype(compute_dtype) != jnp.float32)


def cast_after(spread: Callable[[jax.Array], jax.Array], param: jax.Array, dtype) -> jax.Array:
  """`spread(param)` in `dtype`, `spread` a linear map that copies `param` out (broadcast, take
  by row): under the f32 option it runs before the cast, so its transpose (the sum of the
  cotangent over the copies, e.g. over the batch) is an f32 sum; else after it."""
  if _f32_reduction(dtype, param.dtype):
    return spread(param).astype(dtype)
  return spread(param.astype(dtype))


def broadcast_cast(param: jax.Array, shape: Sequence[int], dtype) -> jax.Array:
  """`param` broadcast to `shape` in `dtype`, for an elementwise use (add, multiply, concat)."""
  return cast_after(lambda p: jnp.broadcast_to(p, shape), param, dtype)


def weight_operand(kernel: jax.Array, compute_dtype) -> jax.Array:
  """The kernel to hand a grouped-matmul op that casts it to `compute_dtype` itself and returns
  its gradient in the kernel's dtype: the f32 kernel under the f32 option, else the cast one."""
  return kernel if _f32_reduction(compute_dtype, kernel.dtype) else kernel.astype(compute_dtype)


def _varying(x: jax.Array) -> frozenset:
  """The manual mesh axes `x` varies over inside `shard_map` (empty outside)."""
  return jax.typeof(x).manual_axis_type.varying


def sum_to_primal_type(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
  """A custom VJP's cotangent for `primal`, inside `shard_map`: a primal replicated over mesh
  axes the cotangent varies over (weights over the axes the rows are split over) gets the sum of
  the per-device cotangents, which has the primal's type."""
  summed_axes = tuple(sorted(_varying(cotangent) - _varying(primal)))
  return jax.lax.psum(cotangent, summed_axes) if summed_axes else cotangent


def f32_product_operands(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Operands for a `preferred_element_type=float32` product of low-precision arrays: as they are
  on TPU/GPU (a bf16 x bf16 -> f32 MXU / tensor-core product), upcast to f32 on XLA:CPU, which
  has no bf16 x bf16 -> f32 dot at run time (the same exact products and f32 sums)."""
  if target_platform() == "cpu":
    return tuple(a.astype(jnp.float32) for a in arrays)
  return arrays


def reduction_dtype(compute_dtype, param_dtype):
  """The dtype a gradient of a `param_dtype` parameter used in `compute_dtype` is summed in."""
  return jnp.float32 if _f32_reduction(compute_dtype, param_dtype) else jnp.dtype(compute_dtype)


def weight_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                       preferred_element_type=None, out_sharding=None) -> jax.Array:
  """`lax.dot_general(lhs, rhs.astype(lhs.dtype), ...)` for a weight `rhs` (a flax `dot_general`):
  under the f32 option, `rhs`'s gradient is an f32 product of `lhs` and the output's cotangent."""
  if not _f32_reduction(lhs.dtype, rhs.dtype):
    return lax.dot_general(lhs, rhs.astype(lhs.dtype), dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type,
                           out_sharding=out_sharding)
  dims = tuple(tuple(tuple(d) for d in pair) for pair in dimension_numbers)
  return _f32_grad_dot(dims, precision, preferred_element_type, out_sharding, lhs, rhs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _f32_grad_dot(dims, precision, preferred_element_type, out_sharding, lhs, rhs):
  return lax.dot_general(lhs, rhs.astype(lhs.dtype), dims, precision=precision,
                         preferred_element_type=preferred_element_type, out_sharding=out_sharding)


def _f32_grad_dot_fwd(dims, precision, preferred_element_type, out_sharding, lhs, rhs):
  out = _f32_grad_dot(dims, precision, preferred_element_type, out_sharding, lhs, rhs)
  return out, (lhs, rhs.astype(lhs.dtype))


def _f32_grad_dot_bwd(dims, precision, preferred_element_type, out_sharding, residuals, g):
  lhs, rhs_c = residuals
  _, lhs_vjp = jax.vjp(lambda a: lax.dot_general(
      a, rhs_c, dims, precision=precision, preferred_element_type=preferred_element_type), lhs)
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dims
  lhs_free = [d for d in range(lhs.ndim) if d not in lhs_contract + lhs_batch]
  rhs_free = [d for d in range(rhs_c.ndim) if d not in rhs_contract + rhs_batch]
  # The output is [batch..., lhs free..., rhs free...]: contract g's lhs-free axes with lhs's.
  nb = len(lhs_batch)
  g_lhs_free = tuple(range(nb, nb + len(lhs_free)))
  d_rhs = lax.dot_general(*f32_product_operands(g.astype(lhs.dtype), lhs),
                          ((g_lhs_free, tuple(lhs_free)), (tuple(range(nb)), tuple(lhs_batch))),
                          precision=precision, preferred_element_type=jnp.float32)
  # d_rhs axes: rhs batch axes, rhs free axes, then rhs contracting axes in lhs-axis order.
  source = list(rhs_batch) + rhs_free + [rhs_contract[lhs_contract.index(d)]
                                         for d in sorted(lhs_contract)]
  return lhs_vjp(g)[0], sum_to_primal_type(jnp.transpose(d_rhs, np.argsort(source)), rhs_c)


_f32_grad_dot.defvjp(_f32_grad_dot_fwd, _f32_grad_dot_bwd)


def weight_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
  """`lax.conv_general_dilated(lhs, rhs.astype(lhs.dtype), ...)` for a kernel `rhs` (a flax
  `conv_general_dilated`): under the f32 option, `rhs`'s gradient is computed in f32."""
  conv = lambda lhs, rhs: lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
  if not _f32_reduction(lhs.dtype, rhs.dtype):
    return conv(lhs, rhs.astype(lhs.dtype))

  @jax.custom_vjp
  def f32_grad_conv(lhs, rhs):
    return conv(lhs, rhs.astype(lhs.dtype))

  def fwd(lhs, rhs):
    return f32_grad_conv(lhs, rhs), (lhs, rhs)

  def bwd(residuals, g):
    lhs, rhs = residuals
    _, lhs_vjp = jax.vjp(lambda a: conv(a, rhs.astype(lhs.dtype)), lhs)
    _, rhs_vjp = jax.vjp(lambda w: conv(lhs.astype(jnp.float32), w), rhs)
    return lhs_vjp(g)[0], sum_to_primal_type(rhs_vjp(g.astype(jnp.float32))[0], rhs)

  f32_grad_conv.defvjp(fwd, bwd)
  return f32_grad_conv(lhs, rhs)


def promote_keep_kernel(arrays, dtype=None, inexact: bool = True):
  """A flax `promote_dtype` for `nnx.Linear` / `nnx.Conv` / `nnx.LinearGeneral` used with the
  `weight_*` ops above: inputs and bias cast to `dtype`, the kernel left as it is (the op casts
  it)."""
  del inexact
  inputs, kernel, *rest = arrays
  dtype = dtype or jnp.result_type(*(a for a in arrays if a is not None))
  cast = lambda a: None if a is None else jnp.asarray(a).astype(dtype)
  return (cast(inputs), kernel, *map(cast, rest))


# Keyword arguments that route a flax layer's kernel through the ops above.
LINEAR_KWARGS = dict(dot_general=weight_dot_general, promote_dtype=promote_keep_kernel)
CONV_KWARGS = dict(conv_general_dilated=weight_conv_general_dilated,
                   promote_dtype=promote_keep_kernel)
ATTENTION_KWARGS = dict(qkv_dot_general=weight_dot_general, out_dot_general=weight_dot_general,
                        qkv_promote_dtype=promote_keep_kernel,
                        out_promote_dtype=promote_keep_kernel)
