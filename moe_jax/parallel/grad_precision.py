"""Precision of the gradient reductions of a low-precision model: `mesh.grad_reduce_dtype`.

A model with `model.dtype=bfloat16` keeps float32 parameters and computes in bf16. With the
stock cast (`param.astype(bf16)` before its use) a parameter's gradient is computed in bf16:
the weight-gradient matmul outputs bf16, a bias's gradient is a bf16 sum of the output's
cotangent over the batch, and XLA's SPMD partitioner sums those per-device partial results over
the batch axes (`data`, `fsdp`, `expert`) right there: the gradient all-reduces carry bf16
(measured on TPU v5p through libtpu; XLA:CPU computes bf16 in f32, so its programs show f32
either way).

- "float32" (the default): every f32 parameter used in a low compute dtype reaches its gradient
  reduction in f32. Matmul and convolution kernels go in uncast into `weight_dot_general` /
  `weight_conv_general_dilated`, which cast them to the compute dtype inside a custom VJP whose
  kernel gradient is a matmul with `preferred_element_type=float32` (a bf16 x bf16 -> f32 MXU
  product, no extra FLOPs; XLA:CPU, which has no such dot at run time, gets f32-upcast operands:
  the same exact products), so the partial sums, and the all-reduce, are f32. The convolution's
  kernel gradient is computed from f32 inputs (the ViT patch embedding: about 1% of a ViT's
  FLOPs; ConvNeXt's stem, downsampling and depthwise convolutions: their cost in f32 is not
  measured). Parameters used elementwise (biases, position embeddings, layer
  scales, CLS tokens, embedding tables) go through `cast_after` / `broadcast_cast`: broadcast
  (or gathered) in f32, then cast, so the transposed broadcast (the sum over the batch) runs on
  the f32 cotangent (inside `shard_map`, `like=` the activation makes a replicated parameter
  varying before the broadcast, so the cross-device sum runs on the parameter's own shape, not
  on the broadcast cotangent). Norm scales and biases (`LayerNorm`) enter flax's f32 normalisation as f32
  arrays holding their bf16-rounded values (`round_in`), so their gradient is not rounded to
  bf16 either.
- "bfloat16": the stock cast, gradients reduced in the compute dtype: half the bytes on the wire.

The forward pass is the same program under both options (cast and broadcast commute, and the
rounded norm parameters are the values the stock cast gives); only the backward differs. Models
get this through the layers below, drop-in subclasses of flax's (same parameters, initialisation
and forward): `Linear`, `LinearGeneral`, `MultiHeadAttention`, `Conv`, `Embed`, `LayerNorm`.
The option is read at trace time from `reduce_in`, which the train step
(`moe_jax.train.step.make_train_step`) enters around its gradient; a gradient taken outside it
gets the default, "float32" (eval and inference run the forward only, where the option does not
matter).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
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


def cast_after(spread: Callable[[jax.Array], jax.Array], param: jax.Array, dtype,
               like: jax.Array | None = None) -> jax.Array:
  """`spread(param)` in `dtype`, `spread` a linear map that copies `param` out (broadcast, take
  by row): under the f32 option it runs before the cast, so its transpose (the sum of the
  cotangent over the copies, e.g. over the batch) is an f32 sum; else after it.

  `like`: the array the result is combined with, inside `jax.shard_map`: `param` (replicated)
  is first made varying over the manual mesh axes `like` varies over, so that the cross-device
  sum of its gradient runs on `param`'s own shape (after the sum over the copies), not on the
  spread cotangent (which JAX would psum otherwise: `[E, C, F]` instead of `[E, 1, F]`)."""
  def vary(p):
    axes = () if like is None else tuple(sorted(_varying(like) - _varying(p)))
    return jax.lax.pcast(p, axes, to="varying") if axes else p

  if _f32_reduction(dtype, param.dtype):
    return spread(vary(param)).astype(dtype)
  return spread(vary(param.astype(dtype)))


def broadcast_cast(param: jax.Array, shape: Sequence[int], dtype,
                   like: jax.Array | None = None) -> jax.Array:
  """`param` broadcast to `shape` in `dtype`, for an elementwise use (add, multiply, concat)
  with `like` (see `cast_after`)."""
  return cast_after(lambda p: jnp.broadcast_to(p, shape), param, dtype, like)


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


def round_in(param: jax.Array, dtype) -> jax.Array:
  """`param` as `dtype` for a use that computes in f32 anyway (flax's normalisation): under the
  f32 option an f32 array holding `param`'s `dtype`-rounded values, whose gradient passes
  unrounded (f32); else `param.astype(dtype)`."""
  if _f32_reduction(dtype, param.dtype):
    return _rounded(param, jnp.dtype(dtype))
  return param.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _rounded(param, dtype):
  return param.astype(dtype).astype(param.dtype)


_rounded.defvjp(lambda param, dtype: (_rounded(param, dtype), None), lambda dtype, _, g: (g,))


def _promote_keep_kernel(arrays, dtype=None, inexact: bool = True):
  """A flax `promote_dtype` for the layers below that use the `weight_*` ops: inputs and bias
  cast to `dtype`, the kernel left as it is (the op casts it)."""
  del inexact
  inputs, kernel, *rest = arrays
  dtype = dtype or jnp.result_type(*(a for a in arrays if a is not None))
  cast = lambda a: None if a is None else jnp.asarray(a).astype(dtype)
  return (cast(inputs), kernel, *map(cast, rest))


def _promote_norm_params(arrays, dtype=None, inexact: bool = True):
  """A flax `promote_dtype` for `nnx.LayerNorm` (`(x, scale, bias)`): `x` cast to `dtype`, the
  scale and bias through `round_in`."""
  del inexact
  x, *params = arrays
  dtype = dtype or jnp.result_type(*(a for a in arrays if a is not None))
  return (jnp.asarray(x).astype(dtype), *(None if p is None else round_in(p, dtype)
                                          for p in params))


def _compute_dtype(dtype, *arrays: jax.Array):
  """A flax layer's compute dtype: its `dtype`, else the promoted type of its operands."""
  return jnp.dtype(dtype) if dtype is not None else jnp.result_type(*arrays)


def _add_bias(y: jax.Array, bias) -> jax.Array:
  """`y + bias` (an `nnx.Param` or None) broadcast over `y`'s leading axes by `broadcast_cast`."""
  return y if bias is None else y + broadcast_cast(bias[...], y.shape, y.dtype, like=y)


class Linear(nnx.Linear):
  """`nnx.Linear` (same parameters, initialisation and forward), `[..., in] -> [..., out]`, with
  the kernel through `weight_dot_general` and the bias added by `broadcast_cast`. Its
  `dot_general` / `promote_dtype` arguments are not used."""

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    kernel = self.kernel[...]
    x = inputs.astype(_compute_dtype(self.dtype, inputs, kernel))
    y = weight_dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision,
                           preferred_element_type=self.preferred_element_type,
                           out_sharding=out_sharding)
    return _add_bias(y, self.bias)


class LinearGeneral(nnx.LinearGeneral):
  """`nnx.LinearGeneral` without `batch_axis` (same parameters and forward): `inputs` contracted
  over `axis` with the kernel's leading axes (`[B, T, D] x [D, H, Dh] -> [B, T, H, Dh]`), the
  kernel through `weight_dot_general`, the bias added by `broadcast_cast`."""

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    if self.batch_axis:
      raise ValueError(f"grad_precision.LinearGeneral: batch_axis={dict(self.batch_axis)} is "
                       "not supported; use nnx.LinearGeneral")
    kernel = self.kernel[...]
    axis = tuple(sorted(a % inputs.ndim for a in self.axis))  # flax's `_normalize_axes`
    x = inputs.astype(_compute_dtype(self.dtype, inputs, kernel))
    y = weight_dot_general(x, kernel, ((axis, tuple(range(len(axis)))), ((), ())),
                           precision=self.precision,
                           preferred_element_type=self.preferred_element_type,
                           out_sharding=out_sharding)
    return _add_bias(y, self.bias)


class MultiHeadAttention(nnx.MultiHeadAttention):
  """`nnx.MultiHeadAttention` (same parameters, initialisation and forward) whose q / k / v /
  out projections are `LinearGeneral`s (flax builds them as `nnx.LinearGeneral`; they get this
  module's subclass, which only replaces `__call__`) and whose optional q / k norms use
  `_promote_norm_params`."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, ln_promote_dtype=_promote_norm_params, **kwargs)
    for projection in (self.query, self.key, self.value, self.out):
      projection.__class__ = LinearGeneral


class Conv(nnx.Conv):
  """`nnx.Conv` (same parameters, initialisation and forward) with the kernel through
  `weight_conv_general_dilated` and the bias added here by `broadcast_cast` (flax's own bias
  add is off: the parent is built with `use_bias=False`; `self.bias` is this layer's)."""

  def __init__(self, in_features: int, out_features: int, kernel_size, *, use_bias: bool = True,
               bias_init=nnx.initializers.zeros_init(), param_dtype=jnp.float32,
               rngs: nnx.Rngs, **kwargs):
    super().__init__(in_features, out_features, kernel_size, use_bias=False,
                     param_dtype=param_dtype, conv_general_dilated=weight_conv_general_dilated,
                     promote_dtype=_promote_keep_kernel, rngs=rngs, **kwargs)
    # Drawn right after the kernel's key, as nnx.Conv does: the same initial values.
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
                 if use_bias else nnx.data(None))

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    return _add_bias(super().__call__(inputs, out_sharding), self.bias)


class Embed(nnx.Embed):
  """`nnx.Embed` (same parameters and forward): rows `[..., D]` of the table gathered by
  `cast_after` (in f32 under the f32 option, so their gradient's scatter-add is f32); `attend`
  (`[..., D] -> [..., V]`, tied output heads) through `weight_dot_general`."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f"Embed: token ids must be integers, got {inputs.dtype}")
    table = self.embedding[...]
    return cast_after(lambda t: jnp.take(t, inputs, axis=0), table, self.dtype or table.dtype)

  def attend(self, query: jax.Array) -> jax.Array:
    table = self.embedding[...]
    q = query.astype(_compute_dtype(self.dtype, query, table))
    return weight_dot_general(q, table, (((q.ndim - 1,), (1,)), ((), ())))


class LayerNorm(nnx.LayerNorm):
  """`nnx.LayerNorm` (same parameters and forward) with `_promote_norm_params`: a low `dtype`
  rounds the scale and bias as flax does, but their gradient stays f32 under the f32 option."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, promote_dtype=_promote_norm_params, **kwargs)
