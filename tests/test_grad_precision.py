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
    self.attn = grad_precision.MultiHeadAttention(2, 16, dtype=dtype, decode=False, rngs=rngs)
    self.mlp = vit.Mlp(16, 32, dropout_rate=0.0, dtype=dtype, rngs=rngs)
    self.experts = ExpertBank(2, 16, 8, dtype=dtype, rngs=rngs)
    self.scale = vit.LayerScale(16, 0.5)

  def __call__(self, x):
    h = self.scale(self.mlp(self.attn(x)))  # [B, T, D]
    y = self.experts(h.reshape(2, -1, 16))  # two experts, each half the rows
    return jnp.sum(y.astype(jnp.float32) ** 2)


@pytest.mark.slow  # one compile of three gradients of the chain: 20-40 s here
def test_f32_and_bf16_reduction_same_loss_and_gradients_within_bf16_rounding():
  # Two data shards: the kernel gradients are summed over them (the all-reduce in question).
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:2])
  x = jax.device_put(np.random.default_rng(0).standard_normal((4, 4, 16)).astype(np.float32),
                     NamedSharding(mesh, P("data")))
  bf16, f32 = (nnx.split(_Chain(dtype), nnx.Param, ...) for dtype in (jnp.bfloat16, jnp.float32))

  @jax.jit
  def grads(params, x):  # one compile: both options and the f32 model's reference
    out = {}
    for option in grad_precision.GRAD_REDUCE_DTYPES:
      with grad_precision.reduce_in(option):
        out[option] = jax.value_and_grad(
            lambda p: nnx.merge(bf16[0], p, bf16[2])(x.astype(jnp.bfloat16)))(params)
    out["exact"] = jax.value_and_grad(lambda p: nnx.merge(f32[0], p, f32[2])(x))(params)
    return out

  with jax.set_mesh(mesh):
    out = jax.device_get(grads(bf16[1], x))  # same initial parameters in both models (seed 0)
  assert out["float32"][0] == out["bfloat16"][0]  # the same forward program under both options
  g32, g16, exact = (jax.tree.leaves(out[k][1]) for k in ("float32", "bfloat16", "exact"))
  # Against the largest gradient (the key bias's is exactly 0 in f32 and bf16 noise here).
  scale = max(float(np.abs(ref).max()) for ref in exact)
  for a, b, ref in zip(g32, g16, exact):
    assert a.dtype == b.dtype == np.float32 and a.shape == ref.shape
    # bf16 compute: both within bf16 rounding (2^-8 relative, a few roundings deep) of the f32
    # model's gradient, and of each other.
    np.testing.assert_allclose(a, ref, atol=0.05 * scale)
    np.testing.assert_allclose(a, b, atol=0.05 * scale)


@pytest.mark.parametrize("x_shape, w_shape, dims", [
    ((3, 5, 4), (4, 2, 6), (((2,), (0,)), ((), ()))),  # attention q/k/v: [B,T,D] x [D,H,Dh]
    ((3, 5, 2, 6), (2, 6, 4), (((2, 3), (0, 1)), ((), ()))),  # attention out: [B,T,H,Dh]x[H,Dh,D]
    ((2, 5, 4), (2, 4, 3), (((2,), (1,)), ((0,), (0,)))),  # batched experts [E,N,K] x [E,K,M]
    ((5, 4), (6, 4), (((1,), (1,)), ((), ()))),  # a transposed kernel [M, K]
])
def test_weight_dot_general_gradients_equal_autodiff(x_shape, w_shape, dims):
  """The custom VJP's transpose, on bf16-exact inputs: its kernel gradient is f32 and equals
  autodiff of the f32 product; its input gradient is the stock bf16 one."""
  rng = np.random.default_rng(0)
  bf16_exact = lambda shape: jnp.asarray(rng.integers(-4, 5, shape) / 4, jnp.bfloat16)
  x, w = bf16_exact(x_shape), bf16_exact(w_shape).astype(jnp.float32)
  out = jax.lax.dot_general(x, w.astype(jnp.bfloat16), dims)
  g = bf16_exact(out.shape)
  with grad_precision.reduce_in("float32"):
    y, vjp = jax.vjp(lambda a, b: grad_precision.weight_dot_general(a, b, dims), x, w)
  dx, dw = vjp(g)
  np.testing.assert_array_equal(y, out)
  _, exact_vjp = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dims), x.astype(jnp.float32), w)
  exact_dx, exact_dw = exact_vjp(g.astype(jnp.float32))
  assert dw.dtype == jnp.float32 and dx.dtype == jnp.bfloat16
  np.testing.assert_array_equal(dw, exact_dw)  # small integer/4 sums: exact in f32
  np.testing.assert_array_equal(dx, exact_dx.astype(jnp.bfloat16))


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
@pytest.mark.parametrize("config, overrides", [
    ("configs/vimoe_tiny_mnist.py", ("--config.model.dtype=bfloat16",)),
    ("configs/mocha_tiny_phi.py:bfloat16", ()),  # bf16 encoders, connectors, Phi-2-style LM
])
def test_v5p_gradient_all_reduces_carry_f32_by_default_and_bf16_as_the_option(tmp_path, config,
                                                                              overrides):
  """The tiny bf16 model compiled for v5p:2x2x1 (data=4): every all-reduce of the step is f32
  by default (no bf16 element at all); with the bf16 option the parameter gradients are bf16."""
  elements = {}
  for option in grad_precision.GRAD_REDUCE_DTYPES:
    _, r = run_aot(tmp_path, "v5p:2x2x1", *overrides, "--config.batch_size=16",
                   f"--config.mesh.grad_reduce_dtype={option}", config=config)
    elements[option] = r["all_reduce_elements_by_dtype"]
    params = r["params"]
  assert elements["float32"].get("bf16", 0) == 0, elements
  assert elements["float32"]["f32"] >= 0.99 * params
  # "bfloat16": only the f32 parts of the model (routers, f32 norms, heads) reduce in f32.
  assert elements["bfloat16"]["f32"] <= 0.02 * params
  assert elements["bfloat16"]["bf16"] >= 0.97 * params
