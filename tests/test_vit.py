"""Dense ViT: shapes for every size, published parameter counts, train/eval, config errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.models import vit


def abstract(config):
  return nnx.eval_shape(lambda: vit.ViT(config, rngs=nnx.Rngs(0)))


def num_params(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("variant", ["Ti/16", "S/16", "B/16", "L/16", "H/14"])
def test_forward_shapes_of_every_size(variant):
  config = vit.vit_config(variant)
  graphdef, state = nnx.split(abstract(config))
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, images)
  assert out.shape == (2, 1000)


@pytest.mark.parametrize("variant,published", [("S/16", 22.05e6), ("B/16", 86.57e6)])
def test_parameter_counts_match_published(variant, published):
  assert abs(num_params(abstract(vit.vit_config(variant))) / published - 1) < 0.01


def tiny(**kw):
  base = dict(image_size=16, channels=1, num_classes=10, width=32, depth=2, mlp_dim=64,
              num_heads=2)
  return vit.vit_config("Ti/4", **{**base, **kw})


@pytest.mark.parametrize("pool,posemb", [("cls", "learned"), ("gap", "sincos2d")])
def test_dropout_only_in_train_mode(pool, posemb):
  model = vit.ViT(tiny(pool=pool, posemb=posemb, dropout_rate=0.5, stochastic_depth=0.5,
                       head_zero_init=False), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  model.eval()
  np.testing.assert_array_equal(model(x), model(x))
  model.train()
  assert not np.allclose(model(x), model(x))


def test_mlp_factory_replaces_only_chosen_blocks():
  class Zero(nnx.Module):
    def __call__(self, x):
      return jnp.zeros_like(x)

  model = vit.ViT(tiny(), rngs=nnx.Rngs(0), mlp_factory=lambda i, d, r: Zero() if i == 1 else None)
  assert isinstance(model.blocks[1].mlp, Zero) and isinstance(model.blocks[0].mlp, vit.Mlp)


@pytest.mark.parametrize("field,value", [("image_size", 18), ("num_heads", 3), ("pool", "max"),
                                         ("posemb", "rope")])
def test_bad_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"model.{field}"):
    vit.ViT(tiny(**{field: value}), rngs=nnx.Rngs(0))


def test_pre_logits_layer_and_head_bias_init():
  """representation_size=4: features = tanh(pooled CLS @ W + b) `[B, 4]`; the zero head kernel
  with head_bias_init=-log(10) gives logits of exactly -log(10) at init (vmoe's head)."""
  model = vit.ViT(tiny(representation_size=4, head_bias_init=-np.log(10.0)), rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(1), (3, 16, 16, 1))
  pooled = np.asarray(model.tokens(images)[:, 0])
  want = np.tanh(pooled @ np.asarray(model.pre_logits.kernel[...])
                 + np.asarray(model.pre_logits.bias[...]))
  np.testing.assert_allclose(np.asarray(model.features(images)), want, rtol=1e-5, atol=1e-6)
  assert model.head.kernel.shape == (4, 10)
  np.testing.assert_array_equal(np.asarray(model(images)), np.full((3, 10), -np.log(10.0),
                                                                   np.float32))
  assert vit.ViT(tiny(), rngs=nnx.Rngs(0)).pre_logits is None  # 0 = no layer, the old tree
  with pytest.raises(ValueError, match=r"^model.representation_size=-1 must be >= 0"):
    vit.ViT(tiny(representation_size=-1), rngs=nnx.Rngs(0))
