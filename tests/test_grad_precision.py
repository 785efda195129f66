"""`mesh.grad_reduce_dtype`: f32 / bf16 gradient reduction of a bf16 model
(`moe_jax.parallel.grad_precision`)."""
from __future__ import annotations

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax.models import vit
from moe_jax.moe.experts import ExpertBank
from moe_jax.parallel import grad_precision
from tests.test_aot import run_aot

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


class _Chain(nnx.Module):
  """Attention -> ViT MLP -> batched experts, bf16 compute: `x [B, T, D] -> scalar`."""

  def __init__(self, dtype):
    rngs = nnx.Rngs(0)
    self.attn = nnx.MultiHeadAttention(2, 16, dtype=dtype, decode=False, rngs=rngs,
                                       **grad_precision.ATTENTION_KWARGS)
    self.mlp = vit.Mlp(16, 32, dropout_rate=0.0, dtype=dtype, rngs=rngs)
    self.experts = ExpertBank(2, 16, 8, dtype=dtype, rngs=rngs)
    self.scale = vit.LayerScale(16, 0.5)

  def __call__(self, x):
    h = self.scale(self.mlp(self.attn(x)))  # [B, T, D]
    y = self.experts(h.reshape(2, -1, 16))  # two experts, each half the rows
    return jnp.sum(y.astype(jnp.float32) ** 2)


def _grads(dtype, reduce_dtype, x):
  model = _Chain(dtype)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss = lambda p: nnx.merge(graphdef, p, rest)(x.astype(dtype))
  with grad_precision.reduce_in(reduce_dtype):
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return float(value), jax.tree.leaves(grads)


def test_f32_and_bf16_reduction_same_loss_and_gradients_within_bf16_rounding():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.device_put(np.random.default_rng(0).standard_normal((16, 4, 16)).astype(np.float32),
                     NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    loss32, g32 = _grads(jnp.bfloat16, "float32", x)
    loss16, g16 = _grads(jnp.bfloat16, "bfloat16", x)
    _, exact = _grads(jnp.float32, "float32", x)  # the f32 model: the reference gradients
  assert loss32 == loss16  # the same forward program under both options
  # Against the largest gradient (the key bias's is exactly 0 in f32 and bf16 noise here).
  scale = max(float(np.abs(ref).max()) for ref in exact)
  for a, b, ref in zip(g32, g16, exact):
    assert a.dtype == b.dtype == jnp.float32 and a.shape == ref.shape
    # bf16 compute: both within bf16 rounding (2^-8 relative, a few roundings deep) of the f32
    # model's gradient, and of each other.
    np.testing.assert_allclose(a, ref, atol=0.05 * scale)
    np.testing.assert_allclose(a, b, atol=0.05 * scale)


def test_f32_option_gives_the_weight_gradient_dots_f32_results():
  """The lowered program: under "float32" each kernel-gradient product of the bf16 chain
  outputs f32 (on XLA:CPU from f32-upcast operands: it has no bf16 x bf16 -> f32 dot), under
  "bfloat16" bf16. (XLA:CPU computes bf16 in f32 after lowering, so its compiled all-reduces are
  f32 either way; the compiled-TPU check is the libtpu test below.)"""
  x = jnp.ones((4, 4, 16), jnp.bfloat16)
  f32_dots = {}
  for option in grad_precision.GRAD_REDUCE_DTYPES:
    graphdef, params, rest = nnx.split(_Chain(jnp.bfloat16), nnx.Param, ...)
    with grad_precision.reduce_in(option):
      text = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p, rest)(x))).lower(params).as_text()
    outputs = re.findall(r"stablehlo\.dot_general.*->\s*tensor<[\dx]*(\w+)>", text)
    f32_dots[option] = outputs.count("f32")
  # 4 attention kernels + 2 MLP kernels + 2 expert kernels: one f32-output product each more.
  assert f32_dots["float32"] - f32_dots["bfloat16"] == 8


def test_bad_option_is_a_one_line_error():
  with pytest.raises(ValueError, match=r"^mesh.grad_reduce_dtype='fp16': use 'float32'"):
    with grad_precision.reduce_in("fp16"):
      pass


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
def test_v5p_gradient_all_reduces_carry_f32_by_default_and_bf16_as_the_option(tmp_path):
  """The tiny ViMoE in bf16 compiled for v5p:2x2x1 (data=4): the parameter gradients' all-reduce
  is f32 by default; with the bf16 option it is bf16."""
  elements = {}
  for option in grad_precision.GRAD_REDUCE_DTYPES:
    _, r = run_aot(tmp_path, "v5p:2x2x1", "--config.model.dtype=bfloat16",
                   "--config.batch_size=16", f"--config.mesh.grad_reduce_dtype={option}")
    elements[option] = r["all_reduce_elements_by_dtype"]
    params = r["params"]
  # Not f32 under "float32": flax's own Linear / attention biases (added by flax after the
  # matmul: 1,856 elements here) and the MoE dispatch buffers' activation cotangents
  # (2 x [E=4, C=40, F=128]), the same under both options.
  assert elements["float32"]["bf16"] <= 1856 + 2 * 4 * 40 * 128
  assert elements["float32"]["f32"] >= 0.98 * params
  # "bfloat16": only the f32 parts of the model (routers, layer norms, head) reduce in f32.
  assert elements["bfloat16"]["f32"] <= 0.02 * params
  assert elements["bfloat16"]["bf16"] >= 0.97 * params
