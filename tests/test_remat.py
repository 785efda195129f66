"""model.remat_policy: every policy gives the no-remat loss, aux losses and gradients, for ViT,
ViMoE (top-k) and MoEC (clusters router, whose step counter is state updated in the block);
model.decoder.remat_policy the same for the decoder LMs (Phi, the from-scratch transformer)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import moe
from moe_jax.models import build_model, vimoe
from moe_jax.vlm import decoder, model, phi


def _config(name: str, policy: str):
  router = "clusters" if name == "moec" else "top_k"
  c = vimoe.vimoe_config("Ti/7", moe_layers="last:1", router=router, width=32, depth=1,
                         mlp_dim=64, num_heads=2, image_size=14, channels=1, num_classes=10,
                         dropout_rate=0.1)
  c.moe.num_experts = 4
  c.name = "vit" if name == "vit" else "vimoe"
  c.remat_policy = policy
  return c


def _loss_and_grads(c):
  model = build_model(c, rngs=nnx.Rngs(0))
  model.train()
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  images = jax.random.normal(jax.random.key(1), (8, 14, 14, 1))

  def loss(p):
    out, aux = moe.capture_aux(nnx.merge(graph, p, rest, copy=True))(images)
    return jnp.mean(out ** 2) + aux.total_loss, aux.total_loss

  traced = jax.jit(jax.value_and_grad(loss, has_aux=True)).trace(params)
  return traced.lower().compile()(params), str(traced.jaxpr)


@pytest.mark.parametrize("name,policies", [
    ("vit", ["dots_with_no_batch_dims_saveable"]),
    ("vimoe", ["full", "dots_saveable"]),
    ("moec", ["nothing_saveable"]),
])
def test_remat_policies_give_the_same_gradients(name, policies):
  ((loss, aux), grads), plain = _loss_and_grads(_config(name, "none"))
  assert "checkpoint" not in plain and "remat" not in plain
  if name != "vit":
    assert float(aux) > 0
  for policy in policies:
    ((l, a), g), jaxpr = _loss_and_grads(_config(name, policy))
    assert "checkpoint" in jaxpr or "remat" in jaxpr, policy  # the blocks are rematerialised
    assert float(l) == pytest.approx(float(loss), rel=1e-6) and float(a) == pytest.approx(
        float(aux), rel=1e-6, abs=1e-9)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(grads)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7, err_msg=policy)


def test_an_unknown_policy_names_the_field():
  with pytest.raises(ValueError, match=r"model.remat_policy='dots' must be one of \['none'"):
    build_model(_config("vit", "dots"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("make", [
    lambda: phi.phi_config(width=16, depth=2, mlp_dim=32, num_heads=2, num_kv_heads=2,
                           vocab_size=11, max_len=8, rotary_fraction=0.5),
    lambda: decoder.decoder_config(width=16, depth=2, mlp_dim=32, num_heads=2, vocab_size=11,
                                   max_len=8),
], ids=["phi", "transformer"])
def test_decoder_remat_gives_the_same_gradients(make):
  """model.decoder.remat_policy='full' (the paper config's, as HF's gradient checkpointing):
  the blocks are rematerialised and the loss and every gradient are unchanged."""
  prefix = jax.random.normal(jax.random.key(1), (2, 3, 16))
  tokens = jax.random.randint(jax.random.key(2), (2, 5), 0, 11)

  def grads(policy):
    c = make()
    c.remat_policy = policy
    graph, params, rest = nnx.split(model.build_decoder(c, rngs=nnx.Rngs(0)), nnx.Param, ...)
    loss = lambda p: jnp.mean(nnx.merge(graph, p, rest, copy=True)(prefix, tokens) ** 2)
    traced = jax.jit(jax.value_and_grad(loss)).trace(params)
    return traced.lower().compile()(params), str(traced.jaxpr)

  (loss, expected), plain = grads("none")
  (loss_full, got), jaxpr = grads("full")
  assert "checkpoint" not in plain and "remat" not in plain
  assert "checkpoint" in jaxpr or "remat" in jaxpr
  assert float(loss_full) == pytest.approx(float(loss), rel=1e-6)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  c = make()
  c.remat_policy = "dots"
  with pytest.raises(ValueError, match=r"^model\.decoder\.remat_policy='dots' must be one of"):
    model.build_decoder(c, rngs=nnx.Rngs(0))
