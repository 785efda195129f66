"""Expert parallelism: sharded == unsharded on every mesh and parameter rule set, and the
collectives it compiles to."""
from __future__ import annotations

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from moe_jax import moe
from moe_jax.models import build_model
from moe_jax.parallel import mesh as mesh_lib, sharding
from moe_jax.parallel.hlo import collective_counts
from moe_jax.routing import ROUTERS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs"))
import vimoe_tiny_mnist  # noqa: E402

MESHES = [(8, 1), (2, 4), (1, 8)]
X_IMAGES = jax.random.normal(jax.random.key(1), (16, 6, 8))


def mesh_of(shape):
  return jax.make_mesh(shape, (mesh_lib.DATA, mesh_lib.EXPERT), axis_types=(AxisType.Auto,) * 2)


def make_layer(router: str, dispatch: str = "capacity", **image):
  c = moe.default_config(router)
  c.num_experts, c.hidden_dim = 8, 16
  if "k" in c.router:  # token-choice routers
    c.router.k = 2
  c.dispatch = dispatch
  c.update(image)
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


@pytest.mark.parametrize("router,dispatch", [("top_k", "capacity"), ("top_k", "dropless"),
                                             ("clusters", "capacity")])
def test_per_image_routing_sharded_equals_unsharded(router, dispatch):
  """16 images in 8 groups of 2 (C = ceil(2 * 2 * 1.0 / 8) = 1 image per expert): groups never
  straddle devices, so every mesh routes, drops and computes exactly as one device. With
  images_per_group=0 each device's 2 images form one group: the same 8 groups here."""
  want = loss_and_grads(make_layer(router, dispatch, granularity="image", images_per_group=2),
                        X_IMAGES)
  for shape in MESHES:
    for per_group in (2, 0):
      layer = make_layer(router, dispatch, granularity="image", images_per_group=per_group)
      with jax.set_mesh(mesh_of(shape)):
        loss, grads = loss_and_grads(layer, X_IMAGES)
        graphdef, state = nnx.split(layer)
        dropped = jax.jit(lambda state, x: next(iter(moe.capture_aux(nnx.merge(
            graphdef, state))(x)[1].layers.values())).metrics["dropped_fraction"])(
                state, X_IMAGES)
      np.testing.assert_allclose(loss, want[0], rtol=1e-5, err_msg=f"{shape} {per_group}")
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads,
                   want[1])
      # Whole images are dropped: a multiple of 1/32 of the 16 images x 2 choices.
      assert float(dropped * 32) == pytest.approx(round(float(dropped * 32)), abs=1e-4)
      assert (float(dropped) > 0) == (dispatch == "capacity"), float(dropped)


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


def test_sharded_equals_unsharded_under_custom_param_rules():
  """The tiny ViMoE with its parameters placed by a non-default rule set (multi-axis and
  per-dimension specs, a replicated router) on mesh (data=1, fsdp=2, expert=4)."""
  model = build_model(vimoe_tiny_mnist.get_config().model, rngs=nnx.Rngs(0))
  model.eval()
  x = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
  want_loss, want_grads = loss_and_grads(model, x)
  rules = ((r"/router/", ()), (r"(^|/)experts/", (mesh_lib.EXPERT,)),
           (r"mlp/fc\d/kernel", (None, (mesh_lib.FSDP, mesh_lib.EXPERT))),
           (r"attn/\w+/kernel", (mesh_lib.FSDP,)), (r".*", mesh_lib.DATA))
  mesh = jax.make_mesh((1, 2, 4, 1), mesh_lib.AXES, axis_types=(AxisType.Auto,) * 4)
  params = nnx.state(model, nnx.Param)
  shardings = sharding.tree_shardings(params, mesh, rules)
  specs = {sharding.path_name(path): s.spec
           for path, s in jax.tree_util.tree_leaves_with_path(shardings)}
  assert specs["blocks/0/mlp/fc1/kernel"] == P(None, ("fsdp", "expert"))
  assert specs["blocks/2/mlp/router/kernel"] == P()
  nnx.update(model, jax.device_put(params, shardings))
  with jax.set_mesh(mesh):
    loss, grads = loss_and_grads(model, jax.device_put(x, sharding.batch_sharding(mesh)))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads,
               want_grads)
