"""The flax layers of `moe_jax.parallel.grad_precision` (`Linear`, `LinearGeneral`,
`MultiHeadAttention`, `Conv`, `Embed`, `LayerNorm`) and every parameter gradient of the tiny
bf16 models under `mesh.grad_reduce_dtype`."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jex_core

from configs import mocha_tiny_phi, vimoe_tiny_mnist
from moe_jax import models
from moe_jax.models import convnext
from moe_jax.parallel import grad_precision as gp
from moe_jax.vlm import llama, tokenizer

# (ours, flax's, input): built with the same seed, so with the same initial parameters.
LAYERS = {
    "linear": (lambda r, **kw: gp.Linear(4, 3, bias_init=nnx.initializers.normal(1.0), rngs=r,
                                         **kw),
               lambda r: nnx.Linear(4, 3, bias_init=nnx.initializers.normal(1.0), rngs=r),
               (2, 5, 4)),
    "attention": (lambda r, **kw: gp.MultiHeadAttention(2, 4, decode=False, rngs=r,
                                                        bias_init=nnx.initializers.normal(1.0),
                                                        **kw),
                  lambda r: nnx.MultiHeadAttention(2, 4, decode=False, rngs=r,
                                                   bias_init=nnx.initializers.normal(1.0)),
                  (2, 5, 4)),
    "conv": (lambda r, **kw: gp.Conv(4, 3, (3, 3), padding="SAME", feature_group_count=1,
                                     bias_init=nnx.initializers.normal(1.0), rngs=r, **kw),
             lambda r: nnx.Conv(4, 3, (3, 3), padding="SAME",
                                bias_init=nnx.initializers.normal(1.0), rngs=r),
             (2, 5, 5, 4)),
    "layer_norm": (lambda r, **kw: gp.LayerNorm(4, bias_init=nnx.initializers.normal(1.0),
                                                scale_init=nnx.initializers.normal(1.0), rngs=r,
                                                **kw),
                   lambda r: nnx.LayerNorm(4, bias_init=nnx.initializers.normal(1.0),
                                           scale_init=nnx.initializers.normal(1.0), rngs=r),
                   (2, 5, 4)),
}


def _params_and_outputs(layer, x):
  """(parameters, output, gradient of sum(output^2) w.r.t. the parameters and the input)."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  apply = lambda p, x: nnx.merge(graphdef, p, rest)(x)
  loss = lambda p, x: jnp.sum(apply(p, x).astype(jnp.float32) ** 2)
  return params, jax.jit(apply)(params, x), jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_equal_flax_layers_in_f32(name):
  """Same parameters (names, shapes, initial values), forward and gradients as flax's layer."""
  ours, theirs, shape = LAYERS[name]
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  (p1, y1, g1), (p2, y2, g2) = (_params_and_outputs(make(nnx.Rngs(0)), x)
                                for make in (ours, theirs))
  assert jax.tree.structure(p1) == jax.tree.structure(p2)
  for a, b in zip(jax.tree.leaves((p1, y1)), jax.tree.leaves((p2, y2))):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_embed_equals_flax_embed_and_attend():
  ours, theirs = (cls(7, 4, rngs=nnx.Rngs(0)) for cls in (gp.Embed, nnx.Embed))
  ids, q = jnp.array([[0, 3, 3, 6]]), jnp.ones((2, 4))
  np.testing.assert_array_equal(ours.embedding[...], theirs.embedding[...])
  np.testing.assert_array_equal(ours(ids), theirs(ids))
  np.testing.assert_allclose(ours.attend(q), theirs.attend(q), rtol=1e-6)
  with pytest.raises(ValueError, match="token ids must be integers"):
    ours(q)


# N rows of cotangent 1: the bias gradient is N, exact in f32, not in bf16 (256 < 301 < 512,
# where bf16 steps by 2), whatever order the sum runs in.
N = 301
BIASES = {  # layer in bf16, its input of N rows, the path of the bias whose gradient is N
    "linear": (lambda: gp.Linear(4, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
               jnp.zeros((N, 4), jnp.bfloat16), ("bias",)),
    "attention_out": (lambda: gp.MultiHeadAttention(2, 4, dtype=jnp.bfloat16, decode=False,
                                                    rngs=nnx.Rngs(0)),
                      jnp.zeros((1, N, 4), jnp.bfloat16), ("out", "bias")),
    "conv": (lambda: gp.Conv(4, 3, (1, 1), dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
             jnp.zeros((1, N, 1, 4), jnp.bfloat16), ("bias",)),
    "layer_norm": (lambda: gp.LayerNorm(4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
                   jnp.zeros((N, 4), jnp.bfloat16), ("bias",)),
    "embed": (lambda: gp.Embed(5, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
              jnp.zeros((N,), jnp.int32), ("embedding",)),
    "rms_norm": (lambda: llama.RMSNorm(llama.llama_config(width=4)),
                 jnp.ones((N, 4), jnp.bfloat16), ("scale",)),
}


@pytest.mark.parametrize("name", sorted(BIASES))
def test_bias_gradient_is_an_f32_sum_by_default_and_bf16_as_the_option(name):
  make, x, path = BIASES[name]
  graphdef, params, rest = nnx.split(make(), nnx.Param, ...)
  loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x).astype(jnp.float32))
  out = {}
  for option in gp.GRAD_REDUCE_DTYPES:
    with gp.reduce_in(option):
      value, grads = jax.jit(jax.value_and_grad(loss))(params)
    leaf = functools.reduce(lambda node, key: node[key], path, grads)
    out[option] = value, np.asarray(leaf[...])
  assert out["float32"][0] == out["bfloat16"][0]  # the same forward
  g32, g16 = out["float32"][1], out["bfloat16"][1]
  if name == "embed":
    g32, g16 = g32[0], g16[0]  # token 0's row (the other rows get nothing)
  assert g32.dtype == g16.dtype == np.float32
  np.testing.assert_array_equal(g32, N)
  assert np.all(g16 != N), g16  # the sum rounded to bf16


# ---------------------------------------------------------------- every gradient of a model

# Ops a gradient passes through unchanged in value (layout, casts, accumulation of the uses of a
# parameter, the cross-device sum): the walk goes on to their inputs; any other op computes it.
_PASS_THROUGH = {"convert_element_type", "reshape", "transpose", "squeeze", "expand_dims",
                 "broadcast_in_dim", "copy", "copy_p", "add_any", "add", "psum", "pvary"}


def _inner_jaxpr(eqn):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if key in eqn.params:
      return getattr(eqn.params[key], "jaxpr", eqn.params[key])
  return None


def gradient_dtypes(jaxpr, var) -> set[str]:
  """The dtypes of the values gradient `var` of `jaxpr` is computed through: back through
  `_PASS_THROUGH` ops and into called jaxprs, to the ops that compute it (the weight-gradient
  products, the sums over the batch, the scatter-adds): the values XLA's partitioner all-reduces
  when the batch is sharded."""
  producers: dict[int, dict] = {}
  found, seen, stack = set(), set(), [(jaxpr, var, ())]
  while stack:
    jaxpr, var, callers = stack.pop()
    if isinstance(var, jex_core.Literal) or (id(jaxpr), var) in seen:
      continue
    seen.add((id(jaxpr), var))
    eqn = producers.setdefault(id(jaxpr), {v: e for e in jaxpr.eqns for v in e.outvars}).get(var)
    if eqn is None:  # an input of a called jaxpr: continue at the caller's operand
      if callers and var in jaxpr.invars:
        call, outer = callers[-1]
        stack.append((outer, call.invars[jaxpr.invars.index(var)], callers[:-1]))
      continue
    found.add(str(var.aval.dtype))
    inner = _inner_jaxpr(eqn)
    if inner is not None:
      stack.append((inner, inner.outvars[eqn.outvars.index(var)], callers + ((eqn, jaxpr),)))
    elif eqn.primitive.name in _PASS_THROUGH:
      stack.extend((jaxpr, v, callers) for v in eqn.invars
                   if jnp.issubdtype(v.aval.dtype, jnp.floating))
  return found


def _tiny_vimoe():
  c = vimoe_tiny_mnist.get_config()
  c.model.dtype = "bfloat16"
  return c.model, lambda m, b: m(b["image"]), {"image": jnp.zeros((4, 28, 28, 1))}


def _tiny_convnext():
  c = convnext.convnext_config("T", image_size=32, channels=3, num_classes=10, widths=(8, 16),
                               depths=(1, 1), dtype="bfloat16")
  return c, lambda m, b: m(b["image"]), {"image": jnp.zeros((2, 32, 32, 3))}


def _tiny_mocha(decoder: str):
  """`configs/mocha_tiny_phi.py:bfloat16` (all parts in bf16), with its Phi-2-style decoder or
  a LLaMA-style one (grouped-query attention, tied embeddings)."""
  c = mocha_tiny_phi.get_config("bfloat16").model
  if decoder == "llama":
    c.decoder = llama.llama_config(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=2,
                                   vocab_size=len(tokenizer.VOCAB), max_len=64, moe_layers="last:1",
                                   tie_embeddings=True)
    c.decoder.dtype = "bfloat16"
  batch = {"image": jnp.zeros((2, 28, 28, 1)), "tokens": jnp.zeros((2, 6), jnp.int32)}
  return c, lambda m, b: m(b, b["tokens"]), batch


MODELS = {"vimoe": _tiny_vimoe, "convnext": _tiny_convnext,
          "mocha_phi": lambda: _tiny_mocha("phi"), "mocha_llama": lambda: _tiny_mocha("llama")}


def _gradient_dtypes_by_parameter(name: str, option: str) -> dict[str, tuple[int, set[str]]]:
  """Parameter path -> (elements, `gradient_dtypes`) of the model's loss, traced (not run)."""
  config, apply, batch = MODELS[name]()
  model = nnx.eval_shape(lambda: models.build_model(config, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # The RNG counts (rest) are differentiated too (float0), so that the model mutates them in the
  # gradient's trace.
  loss = lambda pr, b: jnp.sum(apply(nnx.merge(graphdef, *pr), b).astype(jnp.float32) ** 2)
  with gp.reduce_in(option):
    closed = jax.make_jaxpr(jax.grad(loss, allow_int=True))((params, rest), batch)
  paths = ["/".join(str(k.key) for k in path if hasattr(k, "key"))
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return {p: (int(np.prod(leaf.shape)), gradient_dtypes(closed.jaxpr, v))
          for p, leaf, v in zip(paths, jax.tree.leaves(params), closed.jaxpr.outvars)}


# mocha_llama (tied embeddings, RMSNorm, SwiGLU) is the longest trace (~9 s here): slow.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "mocha_llama"
                                  else n for n in sorted(MODELS)])
def test_every_parameter_gradient_of_a_bf16_model_is_computed_in_f32_by_default(name):
  grads = _gradient_dtypes_by_parameter(name, "float32")
  not_f32 = {p: d for p, (_, d) in grads.items() if d - {"float32"}}
  assert not not_f32, not_f32
  # The option: the matmul kernels, biases, embeddings of the bf16 layers are bf16 again.
  bf16 = _gradient_dtypes_by_parameter(name, "bfloat16")
  elements = sum(n for n, _ in bf16.values())
  in_bf16 = sum(n for n, d in bf16.values() if "bfloat16" in d)
  assert in_bf16 >= 0.9 * elements, (in_bf16, elements)
