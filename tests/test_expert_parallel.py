"""Expert parallelism: sharded == unsharded on every mesh, and the collectives it compiles to."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from moe_jax import moe
from moe_jax.parallel.hlo import collective_counts
from moe_jax.routing import ROUTERS

MESHES = [(8, 1), (2, 4), (1, 8)]


def mesh_of(shape):
  return jax.make_mesh(shape, ("data", "expert"), axis_types=(AxisType.Auto,) * 2)


def make_layer(router: str, dispatch: str = "capacity"):
  c = moe.default_config(router)
  c.num_experts, c.hidden_dim, c.router.k = 8, 16, 2
  c.dispatch = dispatch
  if router == "clusters":
    c.router.clusters.num_clusters = 4
  layer = moe.MoELayer(8, c, rngs=nnx.Rngs(0))
  layer.eval()
  return layer


def loss_and_grads(layer, x):
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  @jax.jit
  def f(params, x):
    def loss(params):
      y, aux = moe.capture_aux(nnx.merge(graphdef, params, rest))(x)
      return jnp.mean(y**2) + aux.total_loss
    return jax.value_and_grad(loss)(params)

  return f(params, x)


@pytest.mark.parametrize("router,dispatch", [(r, "capacity") for r in ROUTERS.names()] +
                         [("top_k", "dropless"), ("clusters", "dropless")])
def test_sharded_equals_unsharded_for_every_mesh(router, dispatch):
  """Dropless under an expert axis > 1 runs capacity buffers with room for every token."""
  layer = make_layer(router, dispatch)
  x = jax.random.normal(jax.random.key(1), (16, 6, 8))
  want_loss, want_grads = loss_and_grads(layer, x)
  for shape in MESHES:
    with jax.set_mesh(mesh_of(shape)):
      loss, grads = loss_and_grads(layer, x)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=str(shape))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads,
                 want_grads)


def test_compiled_layer_uses_all_to_all_and_never_gathers_expert_weights():
  layer = make_layer("top_k")
  x = jax.random.normal(jax.random.key(1), (16, 6, 8))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  with jax.set_mesh(mesh_of((2, 4))):
    hlo = jax.jit(lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest)(x))).lower(
        params, x).compile().as_text()
  counts = {op: n for op, n in collective_counts(hlo).items() if op != "all-reduce"}
  # Golden counts per MoE layer forward: one all-to-all out to the experts, one back.
  assert counts == {"all-to-all": 2, "all-gather": 0, "reduce-scatter": 0,
                    "collective-permute": 0}, counts
  expert_shapes = {str(list(a.shape)).replace(" ", "") for a in jax.tree.leaves(params)
                   if a.shape[0] == 8}
  gathered = re.findall(r"f32\[([\d,]+)\][^=]*all-gather", hlo)
  assert not expert_shapes & {f"[{g}]" for g in gathered}


def test_groups_not_divisible_by_devices_is_a_clear_error():
  layer = make_layer("top_k")
  with jax.set_mesh(mesh_of((2, 4))), pytest.raises(ValueError, match="divisible by 8"):
    layer(jnp.ones((4, 6, 8)))
