"""MoCHA: HGA, MoE connectors, encoders, decoder, stage freezing, sharding, digit-VQA learning."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax import moe, tasks
from moe_jax.parallel import mesh as mesh_lib
from moe_jax.parallel import sharding
from moe_jax.tasks import vqa as vqa_task
from moe_jax.train import loop, optim, state as state_lib, step as step_lib
from moe_jax.vlm import connector, decoder, encoders, hga, model, tokenizer
from moe_jax.vlm import vqa_data

from configs import mocha_paper, mocha_tiny_digits_vqa  # noqa: I100  (`common` registers it)

SIGMOID_3 = 1.0 / (1.0 + np.exp(-3.0))


def _layer_norm(x: np.ndarray) -> np.ndarray:
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)


def _reference_hga(c, hga_config, sizes):
  return hga.ReferenceHGA(c, hga_config, rngs=nnx.Rngs(0)), hga.group_ids(sizes)


def test_reference_hga_equals_hand_computed_result():
  # Tokens (1,0), (1,1) in group 0 and (0,1) in group 1; one neighbour in and one across.
  c = ml_collections.ConfigDict(dict(hga.hga_config(), k_intra=1, k_inter=1))
  layer, groups = _reference_hga(2, c, (2, 1))
  x = jnp.array([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
  x_agg, gate = layer.aggregate(x, groups)
  # token 0: its group-mate (cos 0.707) beats token 2 (cos 0) -> x_agg = x1.
  # token 1: token 0 (0.707) and 0.7 * token 2 (0.707) -> weights 1/1.7, 0.7/1.7.
  # token 2: no group-mate; across, token 1 (0.707) -> x_agg = x1. Each mean|x - x_agg| = 0.5.
  want = np.array([[1.0, 1.0], [1 / 1.7, 0.7 / 1.7], [1.0, 1.0]])
  np.testing.assert_allclose(x_agg[0], want, rtol=1e-5)
  np.testing.assert_allclose(gate[0, :, 0], [SIGMOID_3] * 3, rtol=1e-5)
  mixed = (1 - SIGMOID_3) * np.asarray(x[0]) + SIGMOID_3 * want
  np.testing.assert_allclose(layer(x, groups)[0], _layer_norm(mixed), rtol=1e-4, atol=1e-5)


def _hga_by_loops(x: np.ndarray, groups: np.ndarray, c) -> np.ndarray:
  """The reference HGA one token at a time."""
  out = np.zeros_like(x)
  for b in range(x.shape[0]):
    xn = x[b] / np.linalg.norm(x[b], axis=-1, keepdims=True)
    sim = xn @ xn.T
    for t in range(x.shape[1]):
      own = [s for s in range(x.shape[1]) if groups[s] == groups[t] and s != t]
      other = [s for s in range(x.shape[1]) if groups[s] != groups[t]]
      w = np.zeros(x.shape[1])
      for s in sorted(own, key=lambda s: -sim[t, s])[:c.k_intra]:
        w[s] = max(sim[t, s], 0.0)
      for s in sorted(other, key=lambda s: -sim[t, s])[:c.k_inter]:
        w[s] = c.cross_weight * max(sim[t, s], 0.0)
      agg = (w / w.sum()) @ x[b]
      g = 1 / (1 + np.exp(-c.gate_scale * (np.abs(x[b, t] - agg).mean() - c.gate_threshold)))
      out[b, t] = _layer_norm((1 - g) * x[b, t] + g * agg)
  return out


def test_reference_hga_matches_a_loop_implementation_and_honours_groups():
  c = hga.hga_config()  # top-7 in group, top-3 across, cross weight 0.7
  sizes = (9, 4, 6)
  layer, groups = _reference_hga(5, c, sizes)
  x = np.random.default_rng(0).normal(size=(2, sum(sizes), 5)).astype(np.float32)
  np.testing.assert_allclose(layer(jnp.asarray(x), groups), _hga_by_loops(x, groups, c),
                             rtol=1e-4, atol=1e-4)
  w = np.asarray(hga.reference_weights(jnp.asarray(x), groups, 7, 3, 0.7))
  same = groups[:, None] == groups[None, :]
  kept_in, kept_out = ((w > 0) & same).sum(-1), ((w > 0) & ~same).sum(-1)
  assert kept_in.max() <= 7 and kept_out.max() <= 3
  assert np.all(np.diagonal(w, axis1=1, axis2=2) == 0)  # a token is not its own neighbour
  assert np.all(kept_in[:, groups == 1] <= 3)  # a group of 4 has only 3 group-mates
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
  _, gate = layer.aggregate(jnp.asarray(x) * 3.0, groups)
  assert 0.0 <= float(gate.min()) and float(gate.max()) <= 1.0 and float(gate.std()) > 0


@pytest.mark.parametrize("kind", ["reference", "learned"])
def test_without_cross_group_terms_groups_do_not_mix(kind):
  c = ml_collections.ConfigDict(dict(hga.hga_config(), kind=kind, k_inter=0, cross_weight=0.0))
  layer = hga.build_hga(8, c, rngs=nnx.Rngs(0))
  groups = hga.group_ids((5, 3))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8))
  y = layer(x, groups)
  y2 = layer(x.at[:, 5:].set(jax.random.normal(jax.random.key(1), (2, 3, 8))), groups)
  np.testing.assert_allclose(y[:, :5], y2[:, :5], atol=1e-5)
  assert not np.allclose(y[:, 5:], y2[:, 5:])
  if kind == "learned":  # with the cross term, group 0 sees group 1
    layer.cross_weight = 0.7
    assert not np.allclose(layer(x, groups)[:, :5], y[:, :5], atol=1e-4)


def _connector(in_dim=6, width=8):
  return connector.MoEConnector(in_dim, width, connector.connector_config(width),
                                rngs=nnx.Rngs(0))


def test_connector_routes_top2_renormalised_with_hand_computed_losses():
  layer = _connector()
  x = jax.random.normal(jax.random.key(0), (2, 5, 6))
  h = np.asarray(layer.proj(x))
  plan = layer.moe.route(jnp.asarray(h))
  np.testing.assert_allclose(plan.combine_weights.sum(-1), 1.0, rtol=1e-6)
  assert plan.expert_index.shape == (2, 5, 2)
  y, aux = nnx.jit(lambda layer, x: moe.capture_aux(layer)(x))(layer, x)
  # by hand: softmax router, Switch balance E * sum_e f_e P_e (per example), z-loss
  logits = h @ np.asarray(layer.moe.router.kernel[...])
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  top = np.argsort(-probs, axis=-1)[..., :2]
  f = np.stack([(top[..., 0] == e).mean(-1) for e in range(4)], -1)
  balance = np.mean(4 * np.sum(f * probs.mean(1), -1))
  z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
  losses = aux.layers["moe"].losses
  np.testing.assert_allclose(losses["balance"], balance, rtol=1e-5)
  np.testing.assert_allclose(losses["z_loss"], z, rtol=1e-5)
  np.testing.assert_allclose(aux.total_loss, 0.1 * balance + 0.01 * z, rtol=1e-5)
  # output: renormalised top-2 mixture of Linear-GELU-Linear experts on the projected tokens
  bank = layer.moe.experts
  p = lambda v: np.asarray(v[...])
  want = np.zeros_like(h)
  for b, t, j in np.ndindex(2, 5, 2):
    e, g = top[b, t, j], probs[b, t, top[b, t, j]] / probs[b, t, top[b, t]].sum()
    hid = np.asarray(jax.nn.gelu(h[b, t] @ p(bank.fc1_kernel)[e] + p(bank.fc1_bias)[e]))
    want[b, t] += g * (hid @ p(bank.fc2_kernel)[e] + p(bank.fc2_bias)[e])
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_encoders_precomputed_features_and_channel_pooling():
  c = encoders.encoder_config("features", tokens=3, dim=6, pool_channels=2)
  enc = encoders.Encoder("clip", c, image_size=8, channels=1, rngs=nnx.Rngs(0))
  feats = jnp.arange(2 * 3 * 6, dtype=jnp.float32).reshape(2, 3, 6)
  out = enc({"features/clip": feats})
  np.testing.assert_allclose(out, feats.reshape(2, 3, 2, 3).mean(-1))
  assert (enc.num_tokens, enc.dim) == (3, 2)
  conv = encoders.encoder_config("convnet", convnet_size="T", widths=(4, 8), depths=(1, 1))
  enc = encoders.Encoder("conv", conv, image_size=16, channels=1, rngs=nnx.Rngs(0))
  tokens = nnx.jit(lambda e, x: e({"image": x}))(enc, jnp.ones((2, 16, 16, 1)))
  assert tokens.shape == (2, enc.num_tokens, 8) == (2, 4, 8)
  with pytest.raises(ValueError, match="model.encoders.clip.pool_channels"):
    encoders.Encoder("clip", encoders.encoder_config("features", tokens=3, dim=6,
                                                     pool_channels=4),
                     image_size=8, channels=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="model.hga.kind"):
    hga.build_hga(8, ml_collections.ConfigDict(dict(hga.hga_config(), kind="dense")),
                  rngs=nnx.Rngs(0))


def test_config_errors_name_the_field():
  c = _tiny_config("stage2")
  c.task = "detection"
  with pytest.raises(ValueError, match="task='detection'"):
    tasks.build_task(c)
  c.optimizer.trainable = "(connectors"
  with pytest.raises(ValueError, match="optimizer.trainable"):
    optim.make_optimizer(c.optimizer, 10)
  c.data.question_types = "which,colour"
  with pytest.raises(ValueError, match="data.question_types"):
    vqa_data.validate(c.data)
  c.model.decoder.name = "no_such_decoder"
  with pytest.raises(ValueError, match="model.decoder.name"):
    model.build_decoder(c.model.decoder, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="stage="):
    model.trainable_pattern(c.model, "stage3")



def test_moe_nodes_follow_the_knobs_they_were_derived_from_until_set_themselves():
  c = connector.connector_config(8)
  assert c.capacity_factor == 2.0  # E / k = 4 / 2: room for every token
  c.router.k = 4
  assert c.capacity_factor == 1.0
  c.capacity_factor = 1.5
  c.num_experts = 8
  assert (c.capacity_factor, ml_collections.FrozenConfigDict(c).capacity_factor) == (1.5, 1.5)
  d = decoder.decoder_config(width=16, depth=2, mlp_dim=32, num_heads=2, vocab_size=11,
                             max_len=8, moe_layers="1")
  d.dtype = "bfloat16"
  assert decoder.Decoder(d, rngs=nnx.Rngs(0)).blocks[1].mlp.experts.dtype == jnp.bfloat16
  d.moe.dtype = "float32"
  assert (d.dtype, d.moe.dtype) == ("bfloat16", "float32")

def test_decoder_is_causal():
  dec = decoder.Decoder(decoder.decoder_config(width=16, depth=2, mlp_dim=32, num_heads=2,
                                               vocab_size=20, max_len=16, moe_layers="1"),
                        rngs=nnx.Rngs(0))
  dec.eval()  # no router noise
  prefix = jax.random.normal(jax.random.key(0), (2, 3, 16))
  tokens = jnp.array([[1, 5, 6, 7, 8], [1, 9, 9, 9, 9]])
  forward = nnx.jit(lambda dec, tokens: dec(prefix, tokens))
  a = forward(dec, tokens)
  b = forward(dec, tokens.at[:, 3:].set(4))
  np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-5)
  assert a.shape == (2, 5, 20) and not np.allclose(a[:, 3:], b[:, 3:])
  with pytest.raises(ValueError, match="model.decoder.max_len"):
    dec(prefix, jnp.ones((2, 14), jnp.int32))


def test_exact_match_and_answer_mask():
  E, P = tokenizer.EOS, tokenizer.PAD
  batch = {"tokens": jnp.array([[1, 7, 7, 30, E, P], [1, 7, 30, 31, E, P]]),
           "prompt_len": jnp.array([3, 2]), "answer_len": jnp.array([2, 3])}
  np.testing.assert_array_equal(vqa_task.answer_mask(batch),
                                [[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 0]])
  generated = jnp.array([[30, E, 30], [30, 31, 5]])  # row 0 right (after <eos> ignored)
  np.testing.assert_array_equal(vqa_task.exact_match(generated, batch), [True, False])
  t = tokenizer.Tokenizer()
  ids = t.encode("Which digits are next to this digit?")
  assert tokenizer.UNK not in ids and t.decode([tokenizer.BOS, *ids, E, 5]) == (
      "which digits are next to this digit ?")
  assert t.encode("is it blue") == [t.ids["is"], tokenizer.UNK, tokenizer.UNK]


def _tiny_config(variant: str, batch_size: int = 8) -> ml_collections.ConfigDict:
  """The tiny config's recipe with a still smaller model (one block each, width 32)."""
  c = mocha_tiny_digits_vqa.get_config(variant)
  c.batch_size = c.eval_batch_size = batch_size
  lm = decoder.decoder_config(width=32, depth=1, mlp_dim=64, num_heads=2,
                              vocab_size=len(tokenizer.VOCAB), max_len=64)
  trainable = variant != "stage1"
  c.model = model.mocha_config(lm, {
      "convnet": encoders.encoder_config("convnet", trainable=trainable, widths=(32,),
                                         depths=(1,), stem_patch=7),
      "vit": encoders.encoder_config("vit", trainable=trainable, vit_variant="Ti/7", width=32,
                                     depth=1, mlp_dim=64, num_heads=2, posemb="sincos2d"),
  }, image_size=28, channels=1)
  c.optimizer.trainable = model.trainable_pattern(c.model, variant)
  return c


def _random_batch(config, key=0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(key)
  out = {}
  for name, s in vqa_data.batch_shapes(config, config.batch_size, False).items():
    if name == "image":
      out[name] = rng.uniform(-1, 1, s.shape).astype(np.float32)
    else:
      out[name] = rng.integers(0, 3, s.shape).astype(np.int32)
  out["tokens"] = rng.integers(4, len(tokenizer.VOCAB), out["tokens"].shape).astype(np.int32)
  out["prompt_len"] = np.full(out["prompt_len"].shape, 5, np.int32)
  return out


def _changed(before: nnx.State, after: nnx.State) -> dict[str, bool]:
  after = dict(nnx.to_flat_state(after))
  return {"/".join(map(str, p)): not np.array_equal(v[...], after[p][...])
          for p, v in nnx.to_flat_state(before)}


def test_stage1_train_step_updates_only_the_connectors():
  c = _tiny_config("stage1")
  c.optimizer.warmup_steps = 0
  mesh = mesh_lib.build_mesh(c.mesh, devices=jax.devices()[:1])
  tx = optim.make_optimizer(c.optimizer, c.total_steps)
  schedule = optim.schedule(c.optimizer, c.total_steps)
  state, shardings, defs = state_lib.create_state(c, tx, mesh)
  before = jax.device_get(state.params)
  with jax.set_mesh(mesh):
    train_step = step_lib.make_train_step(defs, tx, schedule, mesh, shardings,
                                          task_loss=vqa_task.vqa_loss)
    state, metrics = train_step(state, _random_batch(c))
  changed = _changed(before, jax.device_get(state.params))
  assert {k.split("/")[0] for k, v in changed.items() if v} == {"connectors", "hga"}
  assert all(v for k, v in changed.items() if k.startswith("connectors") and "kernel" in k)
  assert np.isfinite(float(metrics["train/loss"]))


def test_stage2_mask_updates_connectors_and_lm_not_frozen_encoders():
  c = _tiny_config("stage2")
  c.model.encoders.vit.trainable = False
  c.optimizer.trainable = model.trainable_pattern(c.model, "stage2")
  c.optimizer.warmup_steps = 0
  params = jax.jit(lambda: nnx.state(model.MoCHA(c.model, rngs=nnx.Rngs(0)), nnx.Param))()
  tx = optim.make_optimizer(c.optimizer, c.total_steps)

  @jax.jit
  def step(params):
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    return optax.apply_updates(params, updates)

  changed = _changed(params, step(params))
  assert all(v == (not k.startswith("encoders/1")) for k, v in changed.items())  # vit = 1


def test_sharded_forward_equals_single_device():
  c = _tiny_config("stage2")
  net = model.MoCHA(c.model, rngs=nnx.Rngs(0))
  net.eval()
  batch = {k: jnp.asarray(v) for k, v in _random_batch(c).items()}
  graphdef, params, rest = nnx.split(net, nnx.Param, ...)

  def forward(params, batch):
    return nnx.merge(graphdef, params, rest)(batch, batch["tokens"])

  single = jax.jit(forward)(params, batch)
  cfg = ml_collections.ConfigDict(dict(data=4, fsdp=1, expert=2, model=1))
  mesh = mesh_lib.build_mesh(cfg, num_experts=4, global_batch=8)
  with jax.set_mesh(mesh):
    sharded_params = jax.device_put(params, sharding.tree_shardings(params, mesh))
    sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    sharded = jax.jit(forward)(sharded_params, sharded_batch)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(sharded, single, rtol=1e-4, atol=1e-4)


def test_configs_shapes_and_stages():
  c = mocha_paper.get_config("stage2")
  for e in c.model.encoders.values():  # few blocks per stage: shapes, not depth, are checked
    if e.backbone.name == "vit":
      e.backbone.depth = 2  # SigLIP's features are hidden_states[-3]
    else:
      e.backbone.depths = (1, 1, 1, 1)
  c.model.decoder.depth = 1
  abstract = nnx.eval_shape(lambda: model.MoCHA(c.model, rngs=nnx.Rngs(0)))
  # The reference's order and tokens: CLIP, SigLIP (first patch dropped), DINOv2, ConvNeXt.
  assert abstract.group_sizes == (576, 440, 576, 100)
  assert [e.dim for e in abstract.encoders] == [1024] * 4  # ConvNeXt-XXL 3072 pooled to 1024
  assert abstract.connectors[3].proj.kernel.shape == (1024, 2560)
  assert abstract.connectors[3].moe.experts.fc1_kernel.shape == (4, 2560, 2560)
  assert abstract.decoder.embed.embedding.shape == (51200, 2560)
  assert c.optimizer.learning_rate == 2e-5 and c.optimizer.schedule == "cosine"
  assert c.optimizer.warmup_steps == int(0.03 * c.total_steps)
  assert mocha_paper.get_config("stage1").optimizer.learning_rate == 1e-3
  tiny = {v: mocha_tiny_digits_vqa.get_config(v).optimizer.trainable for v in ("stage1", "stage2")}
  assert tiny == {"stage1": "^(connectors|hga)/",
                  "stage2": "^(connectors|hga|decoder|encoders/0|encoders/1)/"}


@pytest.mark.slow  # end-to-end, minutes: `-m slow`
def test_tiny_vlm_learns_to_name_held_out_digits(tmp_path):
  # The full task (>= 90% exact match) is measured in configs/mocha_tiny_digits_vqa.py; here
  # a short run on the "which digit" questions checks that answers come from the image.
  c = _tiny_config("stage2", batch_size=32)
  c.total_steps, c.eval_every_steps, c.checkpoint_every_steps = 300, 0, 0
  c.optimizer.warmup_steps = 20
  c.data.question_types = "which"
  c.eval_batch_size = 200
  result = loop.train_and_evaluate(c, str(tmp_path))
  assert result["eval/num_examples"] == 1000  # the held-out images
  assert result["eval/exact_match/which"] > 0.3, result  # chance: 0.1
