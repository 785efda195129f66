"""ViMoE: MoE blocks at chosen depths, upcycling from a dense ViT, per-image routing, MoEC, overfit."""
from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from moe_jax import moe
from moe_jax.models import build_model, vimoe


def tiny(router="top_k", **kw):
  c = vimoe.vimoe_config("Ti/4", router=router, image_size=16, channels=1, num_classes=10,
                         width=32, depth=4, mlp_dim=64, num_heads=2)
  c.moe.num_experts = 4
  for key, value in kw.items():
    node, *rest = key.split("__")
    target = c.moe if node == "moe" else c
    if node == "moe":
      node, *rest = rest
    (target[node].__setitem__(rest[0], value) if rest else target.__setitem__(node, value))
  return c


def command_line(config: ml_collections.ConfigDict, *overrides: str) -> ml_collections.ConfigDict:
  """A copy of `config` after `config_flags` overrides `--cfg.a.b=v` (locked, as the trainer's)."""
  argv = ["prog", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_dict("cfg", copy.deepcopy(config), flag_values=values,
                                  sys_argv=argv)
  values(argv)
  return values.cfg


def test_switching_router_from_the_command_line_names_what_is_missing_and_the_fix():
  config = tiny()
  with pytest.raises(ValueError) as e:
    build_model(command_line(config, "--cfg.moe.router.name=soft"), rngs=nnx.Rngs(0))
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith("MoE config: router.name='soft': the router node lacks "
                            "router.soft.slots_per_expert and has router.bpr, ")
  assert "moe.default_config('soft')" in message and "vimoe_config(router='soft')" in message
  moe.validate(vimoe.vimoe_config(router="soft").moe)  # the fix
  switched = command_line(config, "--cfg.moe.dispatch=dropless", "--cfg.moe.dropless.block_size=4")
  assert build_model(switched, rngs=nnx.Rngs(0)).blocks[3].mlp.config.dispatch == "dropless"


def test_moe_dtype_follows_the_model_dtype_until_set_itself():
  config = tiny()
  bf16 = command_line(config, "--cfg.dtype=bfloat16")
  assert bf16.moe.dtype == "bfloat16"
  assert ml_collections.FrozenConfigDict(bf16).moe.dtype == "bfloat16"
  assert json.loads(bf16.to_json_best_effort())["moe"]["dtype"] == "bfloat16"
  layer = build_model(bf16, rngs=nnx.Rngs(0)).blocks[3].mlp
  assert layer.experts.dtype == jnp.bfloat16 and layer.experts.fc1_kernel.dtype == jnp.float32
  experts_only = command_line(config, "--cfg.moe.dtype=bfloat16")
  assert (experts_only.dtype, experts_only.moe.dtype) == ("float32", "bfloat16")
  both = command_line(config, "--cfg.moe.dtype=float16", "--cfg.dtype=bfloat16")
  assert (both.dtype, both.moe.dtype) == ("bfloat16", "float16")
  assert config.moe.dtype == "float32"


@pytest.mark.parametrize("spec,want", [("last:2", [2, 3]), ("every:2", [1, 3]), ("0,2", [0, 2])])
def test_moe_layers_at_chosen_depths(spec, want):
  c = tiny()
  c.moe_layers = spec
  model = build_model(c, rngs=nnx.Rngs(0))
  got = [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, moe.MoELayer)]
  assert got == want


def test_bad_moe_layers_spec_names_the_field():
  c = tiny()
  c.moe_layers = "last:9"
  with pytest.raises(ValueError, match="moe_layers"):
    build_model(c, rngs=nnx.Rngs(0))


def test_upcycled_vimoe_equals_dense_vit():
  """Experts copied from the dense MLP, k=1, dropless, no noise, no shared expert: same output."""
  c = tiny(moe__dispatch="dropless")
  c.moe.router.k = 1
  dense_config = c.copy_and_resolve_references()
  dense_config.name = "vit"
  dense = build_model(dense_config, rngs=nnx.Rngs(1))
  sparse = vimoe.upcycle(dense, build_model(c, rngs=nnx.Rngs(2)))
  dense.eval()
  sparse.eval()
  images = jax.random.normal(jax.random.key(0), (3, 16, 16, 1))
  # k=1 without renormalisation scales by the top gate; renormalised, the weight is exactly 1.
  c.moe.router.renormalize = True
  sparse_renorm = vimoe.upcycle(dense, build_model(c, rngs=nnx.Rngs(2)))
  sparse_renorm.eval()
  features = nnx.jit(lambda model, images: model.features(images))  # not op-by-op eager
  want = features(dense, images)
  np.testing.assert_allclose(features(sparse_renorm, images), want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(features(sparse, images), want, atol=1e-3)


@pytest.mark.parametrize("pool,pooling", [("gap", "mean"), ("cls", "cls")])
def test_per_image_routing_in_vimoe(pool, pooling):
  c = tiny(moe__granularity="image", moe__dispatch="capacity", moe__image_pooling=pooling)
  c.pool = pool
  model = build_model(c, rngs=nnx.Rngs(0))
  model.eval()
  images = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))
  _, aux = moe.capture_aux(model)(images)
  layer_aux = aux.layers["blocks/3/mlp"]
  # One group of the 4 images: each image's whole mass on one expert (k=1).
  np.testing.assert_allclose(np.asarray(layer_aux.example_load).max(-1), 1.0)
  x = jax.random.normal(jax.random.key(0), (4, 17, 32))
  assert model.blocks[3].mlp.route(x).expert_index.shape == (1, 4, c.moe.router.k)


def test_cls_pooling_needs_a_cls_token():
  c = tiny(moe__granularity="image", moe__image_pooling="cls")
  c.pool = "gap"
  with pytest.raises(ValueError, match="model.pool='cls'"):
    build_model(c, rngs=nnx.Rngs(0))


def test_tiny_vimoe_overfits_a_small_batch():
  c = tiny(moe__shared_expert__enabled=True)
  c.moe.router.k = 2
  model = build_model(c, rngs=nnx.Rngs(0))
  model.train()
  images = jax.random.normal(jax.random.key(0), (16, 16, 16, 1))
  labels = jnp.arange(16) % 10
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      logits, aux = moe.capture_aux(model)(images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() + aux.total_loss
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(150)]
  assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
