"""ConvNeXt model: published parameter counts, token layout, train/eval, config errors (its
numerics against HF's ConvNextModel are in test_pretrained.py)."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from moe_jax.models import build_model, convnext


def tiny(**kw):
  return convnext.convnext_config("T", **{**dict(widths=(8, 16), depths=(1, 2), image_size=28,
                                                 num_classes=3, head_zero_init=False), **kw})


@pytest.mark.parametrize("variant,published", [("T", 28.59e6), ("B", 88.59e6)])
def test_parameter_counts_match_published(variant, published):
  model = nnx.eval_shape(lambda: build_model(convnext.convnext_config(variant), rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert abs(count / published - 1) < 0.005, count


def test_tokens_are_the_last_stage_map_and_stochastic_depth_only_in_train_mode():
  model = convnext.ConvNeXt(tiny(stochastic_depth=0.5, layer_scale=1.0), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 3))
  assert model.tokens(x).shape == (2, 3 * 3, 16)  # 28 / 4 = 7, then 7 // 2 = 3 per side
  model.eval()
  np.testing.assert_array_equal(model(x), model(x))
  assert model(x).shape == (2, 3)
  model.train()
  assert not np.allclose(model(x), model(x))


@pytest.mark.parametrize("field,value,message", [
    ("depths", (1,), r"model.widths=\(8, 16\) and model.depths=\(1,\) must have one entry"),
    ("image_size", 4, r"model.image_size=4 is too small for model.patch_size=4 and 2 stages"),
    ("layer_scale", -1.0, r"model.layer_scale=-1.0 must be >= 0"),
])
def test_bad_config_names_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    convnext.ConvNeXt(tiny(**{field: value}), rngs=nnx.Rngs(0))
