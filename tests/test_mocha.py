"""MoCHA: MoE connectors, encoders, decoder, stage freezing, sharding, digit-VQA learning (HGA:
tests/test_hga.py)."""
import functools
import importlib.util
import json
import math
import pathlib
import shlex

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax import aot, moe, tasks
from moe_jax.parallel import mesh as mesh_lib
from moe_jax.parallel import sharding
from moe_jax.tasks import vqa as vqa_task, vqa_scoring
from moe_jax.train import checkpoint, evaluators, loop, optim, state as state_lib
from moe_jax.train import step as step_lib
from moe_jax.vlm import connector, decoder, encoders, hga, model, phi, tokenizer
from moe_jax.data import transforms
from moe_jax.vlm import llava_data, vqa_data

from configs import mocha_paper, mocha_tiny_digits_vqa  # noqa: I100  (`common` registers it)


def _connector(in_dim=6, width=8):
  return connector.MoEConnector(in_dim, width, connector.connector_config(width),
                                rngs=nnx.Rngs(0))


def test_connector_routes_top2_renormalised_with_hand_computed_losses():
  layer = _connector()
  x = jax.random.normal(jax.random.key(0), (2, 5, 6))
  h = np.asarray(x)  # the router and the experts see the raw encoder tokens
  plan = layer.moe.route(x)
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
  # output: renormalised top-2 mixture of Linear(6 -> 8)-GELU(erf)-Linear(8 -> 8) experts
  bank = layer.moe.experts
  bank.fc1_bias[...] = jax.random.normal(jax.random.key(1), bank.fc1_bias.shape)
  bank.fc2_bias[...] = jax.random.normal(jax.random.key(2), bank.fc2_bias.shape)
  y = layer(x)
  p = lambda v: np.asarray(v[...], np.float64)
  erf_gelu = lambda v: 0.5 * v * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))
  want = np.zeros((2, 5, 8))
  for b, t, j in np.ndindex(2, 5, 2):
    e, g = top[b, t, j], probs[b, t, top[b, t, j]] / probs[b, t, top[b, t]].sum()
    hid = erf_gelu(h[b, t] @ p(bank.fc1_kernel)[e] + p(bank.fc1_bias)[e])
    want[b, t] += g * (hid @ p(bank.fc2_kernel)[e] + p(bank.fc2_bias)[e])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  tanh_gelu = np.asarray(jax.nn.gelu(jnp.float32(1.5), approximate=True))
  assert abs(float(erf_gelu(np.float64(1.5))) - float(tanh_gelu)) > 1e-4  # the two GELUs differ


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
  # VQA's answer normalisation: case, punctuation, articles, number words; decimals stay
  norm = vqa_scoring.normalize_answer
  assert norm("The square is Two.\n") == "square is 2" == norm("square, is   2")
  assert norm("An apple costs 1.5 dollars!") == "apple costs 1.5 dollars" != norm("a pear")


def _tiny_config(variant: str, batch_size: int = 8) -> ml_collections.ConfigDict:
  """The tiny config's recipe with a still smaller model (one block each, width 32)."""
  c = mocha_tiny_digits_vqa.get_config(variant)
  c.batch_size = c.evals.test.batch_size = batch_size
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


def test_stage1_train_step_updates_only_the_connectors(stage1_run):
  _, before, after = stage1_run
  changed = _changed(before.params, after.params)
  assert {k.split("/")[0] for k, v in changed.items() if v} == {"connectors"}  # HGA: no params
  assert all(v for k, v in changed.items() if k.startswith("connectors") and "kernel" in k)


def test_stage2_mask_updates_connectors_and_lm_not_frozen_encoders():
  c = _tiny_config("stage2")
  c.model.encoders.vit.trainable = False
  c.optimizer.trainable = model.trainable_pattern(c.model, "stage2")
  c.optimizer.warmup_steps = 0
  # the mask alone decides which leaves move: zeros of the parameters' shapes, no init compiled
  abstract = nnx.state(nnx.eval_shape(lambda: model.MoCHA(c.model, rngs=nnx.Rngs(0))), nnx.Param)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
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
  c.mesh.data, c.mesh.expert = 4, 2
  mesh = loop.build_mesh(c)  # MoCHA's connectors: 4 experts, 2 per device
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
  # The reference's HGA order: SigLIP (its first patch dropped, as the reference), ConvNeXt,
  # CLIP, DINOv2.
  assert abstract.group_sizes == (440, 100, 576, 576)
  assert [e.dim for e in abstract.encoders] == [1024] * 4  # ConvNeXt-XXL 3072 pooled to 1024
  bank = abstract.connectors[1].moe.experts  # as the reference: no projection in front
  assert bank.fc1_kernel.shape == (4, 1024, 2560) and bank.fc2_kernel.shape == (4, 2560, 2560)
  assert abstract.connectors[1].moe.router.kernel.shape == (1024, 4)
  assert abstract.decoder.embed.embedding.shape == (51200, 2560)  # Phi-2's
  assert isinstance(abstract.decoder, phi.Phi) and abstract.decoder.head.bias.shape == (51200,)
  d = mocha_paper.get_config("stage2").model.decoder  # microsoft/phi-2's config.json
  assert (d.depth, d.width, d.num_heads, d.mlp_dim, d.rotary_fraction, d.norm_eps,
          d.rope_theta, d.checkpoint) == (32, 2560, 32, 10240, 0.4, 1e-5, 10_000.0,
                                          "./models/microsoft-phi-2")
  assert c.optimizer.learning_rate == 2e-5 and c.optimizer.schedule == "cosine"
  assert c.optimizer.warmup_steps == int(0.03 * c.total_steps)
  stage1 = mocha_paper.get_config("stage1")
  assert (stage1.optimizer.learning_rate, stage1.optimizer.schedule) == (1e-3, "cosine")
  # the reference's Phi-2 pad token; VQAv2 generation in the 2,560 positions: 1,692 visual +
  # a 740-token prompt buffer + 128 new tokens
  assert (c.data.tokenizer.pad, c.data.tokenizer.added_tokens) == ("<|extra_0|>",
                                                                   ("<|extra_0|>",))
  vqav2 = c.evals.vqav2_val
  assert (sum(abstract.group_sizes) + vqav2.max_prompt_len + vqav2.max_new_tokens
          == c.model.decoder.max_len == 2560)
  assert "vqav2_val" not in stage1.evals
  tiny = {v: mocha_tiny_digits_vqa.get_config(v).optimizer.trainable for v in ("stage1", "stage2")}
  assert tiny == {"stage1": "^(connectors|hga)/",
                  "stage2": "^(connectors|hga|decoder|encoders/0|encoders/1)/"}


@pytest.mark.slow  # end-to-end, minutes: `-m slow`
def test_tiny_vlm_learns_to_name_held_out_digits(tmp_path):
  # The full task (>= 90% exact match) is measured in configs/mocha_tiny_digits_vqa.py; here
  # a short run on the "which digit" questions checks that answers come from the image.
  c = _tiny_config("stage2", batch_size=32)
  c.total_steps, c.evals.test.every_steps, c.checkpoint_every_steps = 300, 0, 0
  c.optimizer.warmup_steps = 20
  c.data.question_types = "which"
  c.evals.test.batch_size = 200
  result = loop.train_and_evaluate(c, str(tmp_path))
  assert result["test/num_examples"] == 1000 == result["answers/num_examples"]  # held out
  assert result["test/exact_match/which"] > 0.3, result  # chance: 0.1
  # the generation evaluator's text answers: the task's token exact match, as strings
  assert abs(result["answers/normalized_match"] - result["test/exact_match"]) <= 0.01, result


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory) -> tuple[str, state_lib.TrainState, state_lib.TrainState]:
  """(workdir, state before, state after) of one stage-1 train step on all 8 devices from the
  trainer's initial state, saved in workdir; the three stage-1 tests share this one compile."""
  c = _tiny_config("stage1")
  c.optimizer.warmup_steps = 0
  workdir = str(tmp_path_factory.mktemp("stage1"))
  trainer = loop.Trainer(c, workdir)
  state, _ = trainer.restore_or_init()
  before = jax.device_get(state)
  with jax.set_mesh(trainer.mesh):
    step = step_lib.make_train_step(trainer.defs, trainer.tx, trainer.schedule, trainer.mesh,
                                    trainer.shardings, trainer.task.loss)
    state, metrics = step(state, step_lib.global_batch(_random_batch(c), trainer.mesh))
  assert np.isfinite(float(metrics["train/loss"]))
  checkpoint.save(trainer.ckpt, state, {}, c)
  trainer.ckpt.wait_until_finished()
  return workdir, before, jax.device_get(state)


def test_stage2_starts_from_stage1_connectors_with_a_fresh_optimizer(tmp_path, stage1_run):
  stage1_dir, _, after_stage1 = stage1_run
  stage2 = _tiny_config("stage2")
  stage2.init_from.kind, stage2.init_from.path = "run", stage1_dir
  trainer = loop.Trainer(stage2, str(tmp_path / "s2"))
  state, data_state = jax.device_get(trainer.restore_or_init())
  assert int(state.step) == 0 and data_state is None
  start = dict(nnx.to_flat_state(state.params))
  trained = dict(nnx.to_flat_state(after_stage1.params))
  assert start.keys() == trained.keys()
  connectors = [p for p in start if p[0] == "connectors"]
  assert connectors and all(np.array_equal(start[p][...], trained[p][...]) for p in connectors)
  assert all(np.array_equal(start[p][...], trained[p][...]) for p in start)  # encoders, LM too
  # a fresh optimizer for stage 2's own mask: Adam moments of every trained leaf zero, count 0
  fresh = jax.device_get(trainer.init.create().opt_state)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, fresh)
  assert any(np.any(np.asarray(m) != 0) for m in jax.tree.leaves(after_stage1.opt_state)
             if np.asarray(m).ndim)  # stage 1's moments were not zero: they were not carried


def test_stage2_config_in_the_stage1_workdir_is_a_one_line_error(stage1_run):
  stage1_dir = stage1_run[0]
  trainer = loop.Trainer(_tiny_config("stage2"), stage1_dir)
  with pytest.raises(checkpoint.CheckpointError, match=r"arrays only in this config's state "
                     r"\(e\.g\. opt_state/.*init_from\.kind=run") as err:
    trainer.restore_or_init()
  assert "\n" not in str(err.value)


def test_generate_eval_answers_with_the_teacher_forced_argmax_and_writes_them(tmp_path,
                                                                           stage1_run):
  # the stage-1 fixture's config (its compiled init reused) and initial, untrained parameters
  c = _tiny_config("stage1")
  c.optimizer.warmup_steps = 0
  c.evals = ml_collections.ConfigDict({"answers": evaluators.generate_eval(
      dataset=c.data.get_ref("name"), split="test[:16]", pp="resize|normalize", batch_size=8,
      every_steps=0, max_new_tokens=3, max_prompt_len=9)})
  trainer = loop.Trainer(c, str(tmp_path))
  state = stage1_run[1]
  evaluator = trainer.evaluators()["answers"]
  scalars, extras = evaluator.run(state.params, state.rest)
  records = extras["predictions"]
  assert scalars["answers/num_examples"] == 16 == len(records)  # two batches of 8
  # untrained: about never the answer (chance of the right 1-2 words + <eos> of 33: < 0.1%)
  assert scalars["answers/normalized_match"] <= 0.05
  assert {"image_id", "qtype", "prompt", "answer", "prediction"} <= set(records[0])
  assert records[0]["answer"] in ("yes", "no") or records[0]["answer"].split()[0] in (
      tokenizer.DIGIT_WORDS)
  # greedy = teacher-forced argmax: the first new token is the argmax of the loss's logits at
  # prompt_len; a row is answered exactly iff every answer token is a teacher-forced hit
  forward = step_lib.make_eval_step(trainer.defs, trainer.mesh, trainer.shardings,
                                    lambda model, batch: model(batch, batch["tokens"]))
  # the prompt batches hold the prompts only; the task's eval batches (same rows) the answers
  full_batches = trainer.task.eval_batches(evaluator.source, batch_size=8, process_index=0,
                                           process_count=1)
  with jax.set_mesh(trainer.mesh):
    for prompts, local in zip(evaluator.batches, full_batches, strict=True):
      np.testing.assert_array_equal(prompts["prompt_len"], local["prompt_len"])
      in_prompt = np.arange(9)[None] < local["prompt_len"][:, None]
      np.testing.assert_array_equal(prompts["tokens"], np.where(in_prompt, local["tokens"][:, :9],
                                                                tokenizer.PAD))
      generated = np.asarray(evaluator.step(state.params, state.rest,
                                            step_lib.global_batch(prompts, trainer.mesh)))
      batch = step_lib.global_batch(local, trainer.mesh)
      logits = np.asarray(forward(state.params, state.rest, batch))
      np.testing.assert_array_equal(generated[:, 0],
                                    logits[np.arange(8), local["prompt_len"]].argmax(-1))
      hits = (logits.argmax(-1) == local["tokens"]) | (np.asarray(vqa_task.answer_mask(local)) == 0)
      exact = np.asarray(vqa_task.exact_match(jnp.asarray(generated), local))
      np.testing.assert_array_equal(exact, hits.all(1))
  report = evaluator.report(extras, str(tmp_path))
  with open(tmp_path / report["predictions"]) as f:
    assert json.load(f) == records
  bad = c.copy_and_resolve_references()
  bad.evals.answers.max_new_tokens = 0
  with pytest.raises(ValueError, match=r"evals.answers.max_new_tokens=0 must be an integer"):
    evaluators.validate(bad, trainer.task, trainer.mesh, False)


@pytest.mark.slow  # ~3 min on 2 cores; the forward on the same mesh is in the default suite
def test_expert_parallel_train_step_equals_single_device():
  # the connectors' experts sharded over `expert` (all-to-all dispatch), the batch over the rest
  c = _tiny_config("stage2")
  # SGD: the step is the gradient itself (Adam would blow rounding noise in gradients that are
  # exactly 0, e.g. of attention key biases, up to +-lr)
  c.optimizer.name, c.optimizer.warmup_steps, c.optimizer.weight_decay = "sgd", 0, 0.0
  c.optimizer.learning_rate = 1.0
  tx = optim.make_optimizer(c.optimizer, c.total_steps)
  schedule = optim.schedule(c.optimizer, c.total_steps)
  batch = _random_batch(c)
  results = []
  single_device = mesh_lib.build_mesh(c.mesh, devices=jax.devices()[:1])
  c.mesh.data, c.mesh.expert = 4, 2
  for mesh in (single_device, loop.build_mesh(c)):
    state, shardings, defs = state_lib.create_state(c, tx, mesh)
    before = jax.device_get(state.params)
    with jax.set_mesh(mesh):
      train_step = step_lib.make_train_step(defs, tx, schedule, mesh, shardings,
                                            task_loss=vqa_task.vqa_loss)
      state, metrics = train_step(state, step_lib.global_batch(batch, mesh))
    results.append(jax.device_get((state.params, metrics["train/loss"])))
    assert all(_changed(before, results[-1][0])[f"connectors/{i}/moe/experts/{name}"]
               for i in (0, 1) for name in ("fc1_kernel", "fc2_kernel"))
  assert len(mesh.devices.flat) == 8 and mesh.shape["expert"] == 2
  (single, loss1), (sharded, loss8) = results
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  for (path, a), (_, b) in zip(nnx.to_flat_state(single), nnx.to_flat_state(sharded)):
    np.testing.assert_allclose(b[...], a[...], rtol=1e-4, atol=1e-5, err_msg=str(path))


def test_aot_of_the_vqa_step_with_expert_sharded_connectors():
  c = _tiny_config("stage2", batch_size=16)
  c.mesh.data, c.mesh.expert = -1, 4
  r = aot.compile_for_topology(c, "cpu:8")
  assert r["task"] == "vqa" and r["mesh"]["expert"] == 4 and r["mesh"]["data"] == 2
  assert r["flops_per_device"] > 0 and r["memory_per_device"]["total"] > 0
  # two connectors, each: 2 all-to-alls forward (dispatch, combine) and 2 backward
  assert r["collectives"]["all-to-all"] == 8 and r["all_to_all_operand_bytes_per_device"] > 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu: pip install -e '.[tpu]'")
def test_paper_config_compiles_for_a_v5p_pod():
  # 64 chips: batch over data x fsdp x expert, parameters FSDP over 16, connector experts over 4
  c = mocha_paper.get_config("stage2")
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, 16, 4
  r = aot.compile_for_topology(c, "v5p:4x4x4")
  assert r["chips"] == 64 and r["device_kind"].startswith("TPU v5")
  assert r["collectives"]["all-to-all"] > 0 and r["predicted_step_s"] > 0
  assert r["memory_per_device"]["total"] < 95 * 2**30  # fits a v5p's HBM


def test_digit_vqa_pipeline_normalises_and_repeats_grey_to_rgb():
  config = mocha_tiny_digits_vqa.get_config("quick")
  c = config.data
  c.train_split, c.channels, c.normalization = "test[:40]", 3, "clip"
  c.pp_train = "normalize"  # no random crop: the background stays black
  batch = next(vqa_data.make_dataset(c, batch_size=4, train=True))
  assert batch["image"].shape == (4, 28, 28, 3) and batch["tokens"].shape == (4, c.text_len)
  mean, std = transforms.normalization_stats("clip", 3)
  np.testing.assert_allclose(batch["image"][..., 1:].min((0, 1, 2)), -mean[1:] / std[1:],
                             rtol=1e-6)  # black background, each channel by its own statistics
  grey = batch["image"] * std + mean  # back to [0, 1]: the same grey in every channel
  np.testing.assert_allclose(grey[..., 0], grey[..., 2], atol=1e-6)
  source = evaluators.source("test", config.evals.test, c)
  eval_batch = next(iter(vqa_data.make_dataset(c, source, batch_size=4, train=False)))
  assert eval_batch["image"].shape == (4, 28, 28, 3) and eval_batch["mask"].shape == (4,)


def _readme_mocha_commands() -> list[list[str]]:
  """The shell commands of the README's "MoCHA with real weights" code block, as argv lists."""
  readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  section = readme[readme.index("### MoCHA with real weights"):]
  block = section[section.index("```bash\n") + 8:section.index("```\n", 10)]
  lines = [line for line in block.replace("\\\n", " ").splitlines()
           if line.strip() and not line.lstrip().startswith("#")]
  return [shlex.split(line) for line in lines]


def test_readme_mocha_commands_name_real_config_fields_and_flags():
  commands = _readme_mocha_commands()
  assert [argv[1] for argv in commands] == ["train.py", "tools/vqa_to_llava.py", "train.py",
                                            "eval.py"]
  for argv in commands:
    flags = {}  # --name=value or --name value
    for i, a in enumerate(argv[2:], 2):
      if a.startswith("--"):
        name, _, value = a[2:].partition("=")
        flags[name] = value or argv[i + 1]
    if argv[1] == "tools/vqa_to_llava.py":  # its flags (exercised in tests/test_llava_data.py)
      assert set(flags) == {"questions", "annotations", "image_folder", "out"}
      continue
    path, variant = flags["config"].split(":")
    assert path == "configs/mocha_paper.py" and "workdir" in flags
    c = mocha_paper.get_config(variant)
    for key, value in flags.items():
      if key.startswith("config."):
        *parents, leaf = key.removeprefix("config.").split(".")
        node = functools.reduce(lambda n, k: n[k], parents, c)
        assert leaf in node, key  # an override of a field the config has
        node[leaf] = type(node[leaf])(value.strip("'"))
    if argv[1] == "eval.py":
      assert flags["only"] in c.evals and c.evals.vqav2_val.split == "vqav2_val[:2000]"
      assert llava_data.split_rows(c.data, c.evals.vqav2_val.split, "split")[0] in c.data.files
