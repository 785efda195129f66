"""Expert parallelism: sharded == unsharded on every mesh and parameter rule set, and the
collectives it compiles to."""
from __future__ import annotations

import functools
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
from moe_jax.moe import grouped_matmul
from moe_jax.moe.experts import ExpertBank
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


def make_layer(router: str, dispatch: str = "capacity", **updates):
  c = moe.default_config(router)
  c.num_experts, c.hidden_dim = 8, 16
  if "k" in c.router:  # token-choice routers
    c.router.k = 2
  c.dispatch = dispatch
  c.update(updates)
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


@functools.cache
def single_device_dropless(router: str):
  """(loss, grads) of `make_layer(router, "dropless")` on `X_IMAGES`, one device, no mesh."""
  return loss_and_grads(make_layer(router, "dropless"), X_IMAGES)


@pytest.mark.parametrize("router,dispatch", [(r, "capacity") for r in ROUTERS.names()] +
                         [("top_k", "dropless"), ("clusters", "dropless")])
def test_sharded_equals_unsharded_for_every_mesh(router, dispatch):
  """Dropless under an expert axis > 1 runs capacity buffers with room for every token."""
  layer = make_layer(router, dispatch)
  x = X_IMAGES
  want_loss, want_grads = (single_device_dropless(router) if dispatch == "dropless"
                           else loss_and_grads(layer, x))
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
  assert counts == {"all-to-all": 2, "ragged-all-to-all": 0, "all-gather": 0,
                    "reduce-scatter": 0, "collective-permute": 0}, counts
  expert_shapes = {str(list(a.shape)).replace(" ", "") for a in jax.tree.leaves(params)
                   if a.shape[0] == 8}
  gathered = re.findall(r"f32\[([\d,]+)\][^=]*all-gather", hlo)
  assert not expert_shapes & {f"[{g}]" for g in gathered}


def test_groups_not_divisible_by_devices_is_a_clear_error():
  layer = make_layer("top_k")
  with jax.set_mesh(mesh_of((2, 4))), pytest.raises(ValueError, match="divisible by 8"):
    layer(jnp.ones((4, 6, 8)))


CUSTOM_RULES = ((r"/router/", ()), (r"(^|/)experts/", (mesh_lib.EXPERT,)),
                (r"mlp/fc\d/kernel", (None, (mesh_lib.FSDP, mesh_lib.EXPERT))),
                (r"attn/\w+/kernel", (mesh_lib.FSDP,)), (r".*", mesh_lib.DATA))


@pytest.mark.parametrize("mesh_shape,rules,want_specs", [
    # A non-default rule set: multi-axis and per-dimension specs, a replicated router.
    ((1, 2, 4, 1), CUSTOM_RULES, {"blocks/0/mlp/fc1/kernel": P(None, ("fsdp", "expert")),
                                  "blocks/2/mlp/router/kernel": P()}),
    # The defaults with fsdp alone: expert banks split over their hidden dimension.
    ((1, 8, 1, 1), mesh_lib.PARAM_RULES, {"blocks/2/mlp/experts/fc1_kernel":
                                          P("expert", None, "fsdp")}),
    ((2, 2, 2, 1), mesh_lib.PARAM_RULES, {"blocks/2/mlp/experts/fc2_kernel": P("expert", "fsdp")}),
])
def test_sharded_equals_unsharded_under_param_rules(mesh_shape, rules, want_specs):
  """The tiny ViMoE with its parameters placed by `rules` on a (data, fsdp, expert, model)
  mesh: loss and gradients equal one device's."""
  model = build_model(vimoe_tiny_mnist.get_config().model, rngs=nnx.Rngs(0))
  model.eval()
  x = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
  want_loss, want_grads = loss_and_grads(model, x)
  mesh = jax.make_mesh(mesh_shape, mesh_lib.AXES, axis_types=(AxisType.Auto,) * 4)
  params = nnx.state(model, nnx.Param)
  shardings = sharding.tree_shardings(params, mesh, rules)
  specs = {sharding.path_name(path): s.spec
           for path, s in jax.tree_util.tree_leaves_with_path(shardings)}
  assert {k: specs[k] for k in want_specs} == want_specs
  nnx.update(model, jax.device_put(params, shardings))
  with jax.set_mesh(mesh):
    loss, grads = loss_and_grads(model, jax.device_put(x, sharding.batch_sharding(mesh)))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads,
               want_grads)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """`jax.lax.ragged_all_to_all` (as its docstring specifies it) from a dense all_to_all, for
  XLA:CPU, which lacks the collective: every slice travels padded to the operand's rows."""
  EMULATED_CALLS.append(axis_name)
  rows = jnp.arange(operand.shape[0])
  chunks = jnp.where((rows < send_sizes[:, None])[..., None],
                     jnp.take(operand, input_offsets[:, None] + rows, axis=0, mode="clip"),
                     0)  # [destination, rows, D]
  got = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)  # [source, rows, D]
  offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
  at = jnp.where(rows < recv_sizes[:, None], offsets[:, None] + rows, output.shape[0])
  return output.at[at].set(got, mode="drop")


EMULATED_CALLS = []


def test_emulated_ragged_all_to_all_follows_the_documented_example():
  """The 2-device example of `jax.lax.ragged_all_to_all`'s docstring, row for row."""
  mesh = jax.make_mesh((2,), (mesh_lib.EXPERT,), devices=jax.devices()[:2],
                       axis_types=(AxisType.Auto,))
  args = (jnp.array([[1, 2, 2], [3, 4, 0]], jnp.float32)[..., None],  # operand, per device
          jnp.zeros((2, 4, 1)),  # output
          jnp.array([[0, 1], [0, 1]]), jnp.array([[1, 2], [1, 1]]),  # input offsets, send sizes
          jnp.array([[0, 0], [1, 2]]), jnp.array([[1, 1], [2, 1]]))  # output offsets, recv sizes
  run = jax.shard_map(
      lambda *a: emulated_ragged_all_to_all(*(b[0] for b in a), axis_name=mesh_lib.EXPERT)[None],
      mesh=mesh, in_specs=P(mesh_lib.EXPERT), out_specs=P(mesh_lib.EXPERT))
  np.testing.assert_array_equal(jax.jit(run)(*args)[..., 0], [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_ragged_layout_counts_rounds_by_the_most_loaded_destination():
  """2 devices, 1 expert each: device 0 receives 3 + 2 = 5 rows, device 1 receives 1 + 4 = 5."""
  counts = jnp.array([[[3], [1]], [[2], [4]]])  # [source, destination, E_l]
  layout = moe.expert_parallel.ragged_layout(counts, window=2)
  assert int(layout.rounds) == 3  # ceil(5 / 2)
  assert [int(moe.expert_parallel.ragged_layout(counts, w).rounds) for w in (4, 5, 6)] == [2, 1, 1]
  np.testing.assert_array_equal(layout.stream_start, [[0, 0], [3, 1]])
  np.testing.assert_array_equal(layout.send_start, [[0, 3], [0, 2]])
  # Round 1 = stream positions [2, 4): device 0 gets source 0's row 2 and source 1's row 0;
  # device 1 gets rows 1-2 of source 1's part for it: source 1's rows 3-4 (rows 0-1 go to device 0).
  size, at_source, at_window = moe.expert_parallel.ragged_round(layout, jnp.int32(1), 2)
  np.testing.assert_array_equal(size, [[1, 0], [1, 2]])
  np.testing.assert_array_equal(at_source, [[2, 0], [0, 3]])
  np.testing.assert_array_equal(at_window, [[0, 0], [1, 0]])


def _one_hot_rows(*pairs):
  """Group sizes `[E=16]` from (expert, rows) pairs."""
  sizes = np.zeros(16, np.int32)
  for e, n in pairs:
    sizes[e] = n
  return sizes.tolist()


# (mesh, ragged_buffer_factor, group sizes [device, E] of P = 16 rows per device, rounds). The
# window R = ceil(f P) rounded up to 16 rows (`WINDOW_ROW_TILE`). Rows past a device's total are
# padding (they must come back as zeros). Experts 2d, 2d+1 live on device d of the expert axis
# (E=16 on (1, 8); E=8 on (2, 4)). Cases on the same (mesh, f) share one compiled program.
ROUNDS_CASES = {
    # Every device sends two rows to every destination: 16 rows each, R = 16: one round.
    "balanced": ((1, 8), 1.0, [[1] * 16] * 8, 1),
    # Everything to expert 1 (device 0): 6 x 16 + 13 + 10 = 119 rows there, R = 16:
    # ceil(119/16) = 8 rounds, windows cutting through the sources' parts.
    "one_expert": ((1, 8), 1.0, [_one_hot_rows((1, 16)), _one_hot_rows((1, 13))]
                   + [_one_hot_rows((1, 16))] * 5 + [_one_hot_rows((1, 10))], 8),
    # R = 16: device 0 receives 8 x 4 = 32 = 2R rows of experts 0 and 1 (exactly two rounds);
    # devices 3 (experts 6, 7) and 7 (14, 15) receive 8 + 8 and 4 + 12 = R (exactly one).
    "boundary": ((1, 8), 1.0, [
        _one_hot_rows((0, 3), (1, 1), (6, 4), (7, 4), (2, 4)),
        _one_hot_rows((0, 1), (1, 3), (6, 4), (7, 4), (15, 4)),
        _one_hot_rows((0, 2), (1, 2), (4, 6), (5, 6)), _one_hot_rows((1, 4), (8, 12)),
        _one_hot_rows((0, 4), (10, 12)), _one_hot_rows((0, 2), (1, 2), (12, 12)),
        _one_hot_rows((0, 1), (1, 3), (14, 12)), _one_hot_rows((0, 3), (1, 1), (3, 8))], 2),
    # Two data slices exchange apart: slice 0 sends everything to expert 0 (64 rows, R = 16: 4
    # rounds), slice 1 is balanced (1 round, run 4 times: every device runs the mesh's max).
    "two_slices": ((2, 4), 1.0, [[16] + [0] * 7] * 4 + [[2] * 8] * 4, 4),
}
ROUNDS_ROWS, ROUNDS_D = 16, 8  # P rows per device, model width


@functools.cache
def bounded_window_programs(shape: tuple[int, int], factor: float, E: int):
  """(params, jitted single-device reference, jitted sharded layer): each maps
  `(params, x [devices P, D], w [devices P], sizes [devices, E], cotangent)` to the outputs and
  their VJP (gradients of params, x, w). Compiled once per (mesh, factor, E)."""
  bank = ExpertBank(E, ROUNDS_D, 16, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(bank, nnx.Param, ...)

  def single_device(params, x, w, sizes):
    """All devices' rows on one device: sorted by expert (padding last), one grouped call."""
    expert = jax.vmap(lambda s: grouped_matmul.row_groups(s, ROUNDS_ROWS))(sizes).reshape(-1)
    order = jnp.argsort(expert, stable=True)
    y = nnx.merge(graphdef, params, rest).grouped(x[order], sizes.sum(0), "ragged_dot", 4,
                                                  w[order])
    return jnp.zeros_like(y).at[order].set(y)

  axes = (mesh_lib.DATA, mesh_lib.EXPERT)

  def per_device(params, x, w, group_sizes):
    local = nnx.merge(graphdef, params, rest)
    return moe.expert_parallel.ExpertsOverRaggedAllToAll(local, factor).grouped(
        x, group_sizes, "ragged_dot", 4, w)

  sharded = jax.shard_map(per_device, mesh=mesh_of(shape),
                          in_specs=(P(mesh_lib.EXPERT), P(axes), P(axes), P(axes)),
                          out_specs=P(axes))

  def with_vjp(fn, flat_sizes):
    @jax.jit
    def run(params, x, w, sizes, cotangent):
      extra = sizes.reshape(-1) if flat_sizes else sizes
      y, vjp = jax.vjp(lambda *a: fn(*a, extra), params, x, w)
      return y, vjp(cotangent)
    return run

  return params, with_vjp(single_device, False), with_vjp(sharded, True)


@pytest.mark.parametrize("case", ROUNDS_CASES)
def test_bounded_receive_buffer_equals_single_device_dropless(monkeypatch, case):
  """`ExpertsOverRaggedAllToAll` in rounds of R = ceil(f P) rows (exchange emulated on CPU): the
  outputs and the gradients of rows, row weights and expert weights equal one device running
  all rows through the whole bank (`ExpertBank.grouped`, single-device dropless)."""
  shape, factor, sizes, want_rounds = ROUNDS_CASES[case]
  sizes = np.asarray(sizes, np.int32)
  devices, E = sizes.shape
  data, ep = shape
  P_rows, D = ROUNDS_ROWS, ROUNDS_D
  layouts = [moe.expert_parallel.ragged_layout(
      jnp.asarray(s.reshape(ep, ep, E // ep)),
      window=moe.expert_parallel.window_rows(factor, P_rows, ep))
      for s in sizes.reshape(data, ep, E)]
  assert max(int(layout.rounds) for layout in layouts) == want_rounds
  keys = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(keys[0], (devices * P_rows, D))
  w = jax.random.uniform(keys[1], (devices * P_rows,))
  cotangent = jax.random.normal(keys[2], (devices * P_rows, D))
  monkeypatch.setattr(moe.expert_parallel, "exchange_rows", emulated_ragged_all_to_all)
  params, single_device, sharded = bounded_window_programs(shape, factor, E)
  want_y, want_grads = single_device(params, x, w, jnp.asarray(sizes), cotangent)
  y, grads = sharded(params, x, w, jnp.asarray(sizes), cotangent)
  padding = np.arange(P_rows)[None] >= sizes.sum(1)[:, None]  # [device, row]
  assert padding.any() == (case in ("one_expert", "boundary"))
  np.testing.assert_array_equal(np.asarray(y).reshape(devices, P_rows, D)[padding], 0)
  np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
  # Weight gradients are summed round by round: f32 rounding of the order, relative to the scale.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5 * np.abs(b).max()),
               grads, want_grads)


def test_ragged_buffer_factor_must_be_positive():
  c = moe.default_config("top_k")
  c.dispatch, c.dropless.ragged_buffer_factor = "dropless", 0.0
  with pytest.raises(ValueError, match=r"^MoE config: dropless\.ragged_buffer_factor=0\.0 must"):
    moe.MoELayer(8, c, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("router,granularity,shape", [
    ("top_k", "token", (2, 4)),
    pytest.param("clusters", "token", (1, 8), marks=pytest.mark.slow),
    pytest.param("top_k", "image", (1, 8), marks=pytest.mark.slow)])
def test_ragged_dropless_equals_single_device_dropless(monkeypatch, router, granularity, shape):
  """The TPU/GPU path (ragged all-to-all + grouped matmul) run on CPU through an emulated
  collective, with a receive window of half a device's rows (so at least two rounds): loss and
  gradients equal one device's dropless layer."""
  image = dict(granularity="image", images_per_group=2) if granularity == "image" else {}
  x = X_IMAGES
  want_loss, want_grads = (loss_and_grads(make_layer(router, "dropless", **image), x) if image
                           else single_device_dropless(router))
  # ragged_dot: the TPU kernel (XLA:CPU expands it to a dense product; tiny here).
  layer = make_layer(router, "dropless",
                     dropless=dict(ragged_buffer_factor=0.5, backend="ragged_dot"), **image)
  monkeypatch.setattr(moe.expert_parallel, "RAGGED_PLATFORMS", ("cpu",))
  monkeypatch.setattr(moe.expert_parallel, "exchange_rows", emulated_ragged_all_to_all)
  EMULATED_CALLS.clear()
  with jax.set_mesh(mesh_of(shape)):
    loss, grads = loss_and_grads(layer, x)
  assert EMULATED_CALLS and set(EMULATED_CALLS) == {mesh_lib.EXPERT}  # the ragged path ran
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads,
               want_grads)


def test_dropless_on_cpu_falls_back_to_capacity_buffers():
  """XLA:CPU has no ragged-all-to-all: the compiled CPU program uses dense all-to-alls."""
  layer = make_layer("top_k", "dropless")
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  with jax.set_mesh(mesh_of((2, 4))):
    assert not moe.expert_parallel.ragged_dropless(jax.sharding.get_abstract_mesh())
    hlo = jax.jit(lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest)(x))).lower(
        params, X_IMAGES).compile().as_text()
  assert collective_counts(hlo)["all-to-all"] == 2 and "ragged-all-to-all" not in hlo
