"""Parameter sharding rules (`mesh.param_rules`): the defaults, custom rules, one-line errors."""
from __future__ import annotations

import itertools
import math
import os
import re
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax.parallel import hlo, mesh as mesh_lib, sharding
from moe_jax.train import loop, optim, state as state_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs"))
import mocha_tiny_digits_vqa  # noqa: E402
import vimoe_tiny_mnist  # noqa: E402

# Today's specs of the tiny ViMoE on mesh (data=1, fsdp=2, expert=4).
DEFAULT_SPECS = {
    "blocks/2/mlp/experts/fc1_kernel": P("expert", None, "fsdp"),  # [4, 64, 128]
    "blocks/2/mlp/experts/fc1_bias": P("expert", "fsdp"),  # [4, 128]
    "blocks/2/mlp/experts/fc2_kernel": P("expert", "fsdp"),  # [4, 128, 64]
    "blocks/3/mlp/experts/fc2_bias": P("expert"),  # [4, 64]
    "blocks/0/attn/query/kernel": P("fsdp", None, None),  # [64, 4, 16]
    "blocks/0/attn/query/bias": P(None, "fsdp"),  # [4, 16]
    "blocks/1/attn/out/kernel": P(None, None, "fsdp"),  # [4, 16, 64]
    "blocks/0/mlp/fc1/kernel": P(None, "fsdp"),  # [64, 128]
    "blocks/2/mlp/router/kernel": P("fsdp", None),  # [64, 4]
    "blocks/2/mlp/shared_expert/fc2/kernel": P("fsdp", None),  # [128, 64]
    "patch_embed/kernel": P(None, None, None, "fsdp"),  # [7, 7, 1, 64]
    "blocks/0/norm1/scale": P(), "blocks/0/mlp/fc1/bias": P(), "head/bias": P(),
}


def config(param_rules=None):
  c = vimoe_tiny_mnist.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, 2, 4
  if param_rules is not None:
    c.mesh.param_rules = param_rules
  return c


def state_specs(c):
  """{path: spec} of the parameters and of Adam's first moments of the trainer's state."""
  tx = optim.make_optimizer(c.optimizer, c.total_steps)
  abstract, _, _ = state_lib.abstract_state(c, tx, loop.build_mesh(c))
  specs = lambda tree: {sharding.path_name(path): x.sharding.spec
                        for path, x in jax.tree_util.tree_leaves_with_path(tree)}
  mu = [s for s in jax.tree.leaves(abstract.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
        if hasattr(s, "mu")][0].mu
  return specs(abstract.params), specs(mu)


def test_default_rules_give_todays_specs():
  params, moments = state_specs(config())
  assert {k: params[k] for k in DEFAULT_SPECS} == DEFAULT_SPECS
  assert moments == params


def test_custom_rules_change_the_specs():
  params, moments = state_specs(config(((r"/router/", ()),) + mesh_lib.PARAM_RULES))
  assert params["blocks/2/mlp/router/kernel"] == P()
  assert {k: params[k] for k in DEFAULT_SPECS if "router" not in k} == {
      k: v for k, v in DEFAULT_SPECS.items() if "router" not in k}
  assert moments == params
  params, _ = state_specs(config(()))  # no rules: everything replicated
  assert set(params.values()) == {P()}


def test_an_explicit_spec_shards_the_named_dimensions():
  params, _ = state_specs(config(((r"attn/\w+/kernel$", (None, "fsdp")),
                                  (r"fc1/kernel", ("fsdp", "expert")))))
  assert params["blocks/0/attn/query/kernel"] == P(None, "fsdp")
  assert params["blocks/2/mlp/shared_expert/fc1/kernel"] == P("fsdp", "expert")
  assert params["blocks/2/mlp/experts/fc1_kernel"] == P()  # matched by no rule


@pytest.mark.parametrize("rule,error", [
    (("(", "fsdp"), r"bad regex .*; fix the pattern"),
    ((".*", ("tensor",)), r"unknown mesh axis 'tensor'; use one of data, fsdp, expert, model"),
    ((".*", "tensor"), r"unknown mesh axis 'tensor'"),
    ((".*", 2), r"must be \(regex, spec\)"),
    (("head", [None, 3]), r"must be \(regex, spec\)"),
    (("just a regex",), r"must be \(regex, spec\)"),
    (("head/bias", (None, "fsdp")),
     r"spec of 2 dimensions for the 1-D parameter head/bias of shape \[10\]; shorten the spec"),
    (("router/kernel", (None, ("fsdp", "expert"))),
     r"dimension 1 \(size 4\) of parameter blocks/2/mlp/router/kernel of shape \[64, 4\] does "
     r"not divide over \('fsdp', 'expert'\) \(8 devices\); change the spec"),
])
def test_a_bad_rule_is_a_one_line_error_naming_it(rule, error):
  rules = (mesh_lib.PARAM_RULES[0], rule)
  with pytest.raises(ValueError, match=r"^mesh\.param_rules\[1\] = .*: " + error) as e:
    state_specs(config(rules))
  assert "\n" not in str(e.value)


def test_fsdp_shards_expert_banks_and_the_compiled_arguments_follow():
  """fsdp=8, expert=1: every expert bank's F is split 8 ways (no device holds a whole expert),
  and the compiled train step's argument bytes per device are exactly the sum of the shards."""
  from moe_jax import aot

  c = config()
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, 8, 1
  lowered, mesh, _ = aot.lower_train_step(c, jax.devices())
  params, _ = state_specs(c)
  assert params["blocks/2/mlp/experts/fc1_kernel"] == P("expert", None, "fsdp")  # [4, 64, 128]
  assert params["blocks/2/mlp/experts/fc2_kernel"] == P("expert", "fsdp")  # [4, 128, 64]
  tx = optim.make_optimizer(c.optimizer, c.total_steps)
  abstract, _, _ = state_lib.abstract_state(c, tx, mesh)
  experts = [x for path, x in jax.tree_util.tree_leaves_with_path(abstract.params)
             if re.search(r"experts/(fc1_kernel|fc1_bias|fc2_kernel)$", sharding.path_name(path))]
  assert len(experts) == 3 * 2  # 2 MoE layers
  for x in experts:
    assert math.prod(x.sharding.shard_shape(x.shape)) * 8 == math.prod(x.shape)
  compiled = lowered.compile()
  args = zip(jax.tree.leaves(lowered.args_info), jax.tree.leaves(compiled.input_shardings))
  assert compiled.memory_analysis().argument_size_in_bytes == sum(
      math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in args)
  # The banks' gradients are reduce-scattered to those shards (the transpose of the all_gather
  # inside the MoE shard_map), never all-reduced whole.
  collectives = hlo.largest_collectives(compiled.as_text(), 8, count=10_000)
  shapes = lambda op: " ".join(r["shape"] for r in collectives if r["op"] == op)
  assert not re.search(r"f32\[4,(64,128|128,64)\]", shapes("all-reduce")), shapes("all-reduce")
  assert re.search(r"f32\[4,(64,16|16,64)\]", shapes("reduce-scatter")), shapes("reduce-scatter")


def test_a_model_axis_is_refused_with_the_field_named():
  c = config()
  c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.model = 1, 1, 4, 2
  with pytest.raises(ValueError, match=r"^mesh\.model=2: tensor parallelism .* set mesh\.model=1"):
    loop.build_mesh(c)


def _result_shapes(collective: dict) -> list[tuple[int, ...]]:
  """The array shapes of a `hlo.largest_collectives` row's result (tuple results: each)."""
  return [tuple(int(d) for d in dims.split(",") if d)
          for dims in re.findall(r"\[([\d,]*)\]", collective["shape"])]


@pytest.mark.slow  # ~1 min of compile on 2 idle cores; its parts: test_hga.py and below
def test_fsdp_all_reduces_only_gradients_in_a_phi_mocha_step():
  """FSDP (fsdp=4 x expert=2) on a tiny MoCHA with a Phi decoder and frozen encoders, compiled
  for 8 CPU devices:
  no all-reduce of the train step carries a whole-batch tensor (the paper config's 20 GiB of
  all-reduced `[128, ...]` logits-, embedding- and ConvNeXt-sized tensors, bench/RESULTS.md;
  then HGA's `[B, P, P]` graph and the ConvNet's `[B, h, w, C]` MLP partial sums), and the
  decoder's weights are all-gathered. A trainable ConvNet: `test_conv_encoders_keep_...`."""
  from moe_jax import aot
  from moe_jax.vlm import model, phi, tokenizer

  c = mocha_tiny_digits_vqa.get_config("stage2")
  c.model.decoder = phi.phi_config(width=64, depth=1, mlp_dim=256, num_heads=4, num_kv_heads=4,
                                   vocab_size=len(tokenizer.VOCAB), max_len=64,
                                   rotary_fraction=0.5)
  c.model.decoder.remat_policy = "full"
  for e in c.model.encoders.values():  # frozen, as the paper config's
    e.trainable = False
  c.optimizer.trainable = model.trainable_pattern(c.model, "stage2")
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, 4, 2
  c.batch_size = 8
  lowered, mesh, _ = aot.lower_train_step(c, jax.devices())
  text = lowered.compile().as_text()
  tx = optim.make_optimizer(c.optimizer, c.total_steps)
  abstract, _, _ = state_lib.abstract_state(c, tx, mesh)
  # A gradient's shape: its parameter's, each dimension whole or split over its mesh axes (a
  # shard_map's psum reduces the expert-local block before the FSDP scatter), up to dims of 1
  # and order (XLA transposes and reshapes gradients before it reduces them).
  canonical = lambda s: tuple(sorted(d for d in s if d != 1))
  shapes, decoder_kernels = set(), set()
  for path, x in jax.tree_util.tree_leaves_with_path(abstract.params):
    shard = x.sharding.shard_shape(x.shape)
    shapes |= {canonical(s) for s in itertools.product(*zip(x.shape, shard))}
    if sharding.path_name(path).startswith("decoder/blocks/") and x.ndim == 2:
      decoder_kernels.add(tuple(x.shape))
  collectives = hlo.largest_collectives(text, 8, count=10_000)
  reduced = [r for r in collectives if r["op"] == "all-reduce"]
  assert reduced
  for r in reduced:
    odd = [s for s in _result_shapes(r)
           if s and s[0] == c.batch_size and math.prod(s) > 8 and canonical(s) not in shapes]
    assert not odd, (odd, r["op_name"])
  gathered = {s for r in collectives if r["op"] == "all-gather" for s in _result_shapes(r)}
  assert decoder_kernels and decoder_kernels <= gathered, (decoder_kernels, gathered)


@pytest.mark.parametrize("kind", ["convnet", "convnext"])
def test_conv_encoders_keep_the_batch_sharded_in_a_trainable_fsdp_step(kind):
  # fsdp=4 x expert=2, 2 images per device, one stage of 2x2 maps. Before: XLA all-gathered the
  # whole batch `[16, 2, 2, 64]` to the fc1 kernel sharded over its F (cheaper than gathering
  # fc1 at this size) and all-reduced fc2's whole-batch partial sums, forward and backward.
  from flax import nnx

  from moe_jax.models import convnext
  from moe_jax.vlm import encoders

  if kind == "convnet":
    c = encoders.encoder_config("convnet", trainable=True, widths=(64,), depths=(1,),
                                stem_patch=14)
  else:
    c = encoders.encoder_config("convnext", trainable=True, backbone=convnext.convnext_config(
        "T", widths=(64,), depths=(1,), patch_size=14, num_classes=0))
  encoder = encoders.Encoder(kind, c, image_size=28, channels=1, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)
  loss = lambda params, image: (nnx.merge(graphdef, params, rest)({"image": image}) ** 2).sum()
  mesh_config = mesh_lib.default_config()
  mesh_config.data, mesh_config.fsdp, mesh_config.expert = 1, 4, 2
  mesh = mesh_lib.build_mesh(mesh_config, num_experts=4)
  B = 16
  with jax.set_mesh(mesh):
    params = jax.device_put(params, sharding.tree_shardings(params, mesh))
    image = jax.device_put(np.ones((B, 28, 28, 1), np.float32), sharding.batch_sharding(mesh))
    text = jax.jit(jax.grad(loss)).lower(params, image).compile().as_text()
  moved = [(r["op"], s) for r in hlo.largest_collectives(text, 8, count=10_000)
           if r["op"] in ("all-gather", "all-reduce") for s in _result_shapes(r)]
  assert moved and not [m for m in moved if len(m[1]) == 4 and m[1][0] == B], moved
  # the weights move instead: fc1 [64, 256] gathered over fsdp
  assert ("all-gather", (64, 256)) in moved, moved
