"""Decoder LMs: Phi / LLaMA parity with torch reference logits (tests/data, written by
tools/make_decoder_fixtures.py; read here without torch), importer errors, bf16 weights, and
KV-cached generation against full recompute (greedy, sampling, EOS, mixed prompt lengths, mesh)."""
from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from safetensors.numpy import load_file, save_file

from moe_jax import moe
from moe_jax.checkpoints import hf_decoders
from moe_jax.checkpoints.tree import CheckpointMismatch
from moe_jax.parallel import mesh as mesh_lib
from moe_jax.vlm import decoder, encoders, generation, llama, lm, model, phi

DATA = os.path.join(os.path.dirname(__file__), "data")
FIXTURES = ["hf_phi", "hf_llama", "hf_llama_tied"]


def load(name: str, **dtypes):
  return hf_decoders.load_hf_decoder(os.path.join(DATA, name), **dtypes)


def reference_logits(dec: lm.CausalLM, name: str) -> tuple[np.ndarray, np.ndarray]:
  ref = np.load(os.path.join(DATA, name, "reference.npz"))
  ids = jnp.asarray(ref["input_ids"])
  ours = dec(jnp.zeros((ids.shape[0], 0, dec.embed.embedding.shape[1])), ids)
  return np.asarray(ours), ref["logits"]


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match_the_torch_reference(name):
  dec, _, report = load(name)
  ours, theirs = reference_logits(dec, name)
  # Measured: 6.0e-7 (phi), 8.3e-7 (llama), 8.9e-7 (llama_tied) with |logits| up to 2.4.
  assert np.abs(ours - theirs).max() <= 1e-5
  tensors = hf_decoders.read_safetensors(os.path.join(DATA, name))
  assert sorted(k for keys in report.used.values() for k in keys) == sorted(tensors)


def test_config_from_hf_reads_the_reference_knobs():
  _, c, _ = load("hf_phi")
  assert (c.name, c.rotary_fraction, c.rope_theta, c.norm_eps, c.num_kv_heads) == (
      "phi", 0.5, 10_000.0, 1e-5, 4)
  _, c, report = load("hf_llama")
  assert (c.name, c.num_kv_heads, c.rope_theta, c.tie_embeddings) == ("llama", 2, 500.0, False)
  _, c, report = load("hf_llama_tied")
  assert c.tie_embeddings and "head/kernel" not in report.used
  # Older config.json files (the hub's Phi-2) keep the rope knobs at the top level.
  with open(os.path.join(DATA, "hf_phi", "config.json")) as f:
    hf = json.load(f)
  rope = hf.pop("rope_parameters")
  hf.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"])
  assert hf_decoders.decoder_config_from_hf(hf).rotary_fraction == 0.5


def test_moe_mlps_dtype_knobs_and_bad_sizes():
  c = llama.llama_config(width=32, depth=2, mlp_dim=48, num_heads=4, num_kv_heads=2,
                         vocab_size=96, max_len=16, moe_layers="1")
  c.param_dtype = "bfloat16"
  dec = llama.Llama(c, rngs=nnx.Rngs(0))
  assert isinstance(dec.blocks[1].mlp, moe.MoELayer) and isinstance(dec.blocks[0].mlp,
                                                                   llama.SwiGLU)
  assert dec.blocks[0].attn.key.kernel.shape == (32, 16)  # 2 key/value heads of 8
  assert dec.blocks[0].attn.query.kernel.dtype == jnp.bfloat16
  dec.eval()
  logits = nnx.jit(lambda dec: dec(jnp.zeros((2, 1, 32)), jnp.ones((2, 3), jnp.int32)))(dec)
  assert logits.shape == (2, 3, 96) and np.isfinite(logits).all()
  for field, value, message in (("num_kv_heads", 3, "num_heads=4 must be a multiple of"),
                                ("rotary_fraction", 0.125, "rotary_fraction=0.125"),
                                ("param_dtype", "float16", "param_dtype='float16'")):
    bad = llama.llama_config(width=32, depth=1, mlp_dim=48, num_heads=4, num_kv_heads=4,
                             vocab_size=96)
    bad[field] = value
    with pytest.raises(ValueError, match=message):
      llama.Llama(bad, rngs=nnx.Rngs(0))


def test_bfloat16_weights_from_a_bfloat16_checkpoint(tmp_path):
  folder = tmp_path / "llama_bf16"
  shutil.copytree(os.path.join(DATA, "hf_llama"), folder)
  tensors = load_file(str(folder / "model.safetensors"))
  save_file({k: v.astype(jnp.bfloat16) for k, v in tensors.items()},
            str(folder / "model.safetensors"))
  dec, _, _ = hf_decoders.load_hf_decoder(str(folder), dtype="bfloat16", param_dtype="bfloat16")
  assert dec.blocks[0].attn.query.kernel.dtype == jnp.bfloat16
  assert dec.embed.embedding.dtype == jnp.bfloat16
  ours, theirs = reference_logits(dec, "hf_llama")
  # bf16 weights and compute: relative error ~ 2^-8 per op over two blocks.
  assert np.abs(ours - theirs).max() <= 0.1 * np.abs(theirs).max()
  assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9


def _edit_checkpoint(tmp_path, edit) -> str:
  folder = tmp_path / "phi"
  shutil.copytree(os.path.join(DATA, "hf_phi"), folder)
  tensors = load_file(str(folder / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(folder / "model.safetensors"))
  return str(folder)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.fc1.bias"), "no key 'model.layers.1.mlp.fc1.bias'"),
    (lambda t: t.update({"lm_head.bias": np.zeros(7, np.float32)}), "'lm_head.bias' has shape"),
    (lambda t: t.update({"model.layers.0.extra": np.zeros(3, np.float32)}),
     "key 'model.layers.0.extra' maps onto no parameter"),
])
def test_unmatched_or_misshaped_keys_are_one_line_errors(tmp_path, edit, message):
  with pytest.raises(CheckpointMismatch, match=message):
    hf_decoders.import_hf_decoder(_edit_checkpoint(tmp_path, edit))


@pytest.mark.parametrize("field, value, message", [
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5}, "rope type 'llama3'"),
    ("hidden_act", "relu", "hidden_act='relu'"),
    ("model_type", "gpt2", "model_type='gpt2'"),
    ("attention_bias", True, "attention_bias=True"),
])
def test_unsupported_configs_are_refused(field, value, message):
  with open(os.path.join(DATA, "hf_llama", "config.json")) as f:
    hf = json.load(f)
  hf[field] = value
  with pytest.raises(CheckpointMismatch, match=message):
    hf_decoders.decoder_config_from_hf(hf)


def tiny_transformer() -> decoder.Decoder:
  dec = decoder.Decoder(decoder.decoder_config(width=32, depth=2, mlp_dim=48, num_heads=4,
                                               vocab_size=96, max_len=32, moe_layers="1"),
                        rngs=nnx.Rngs(0))
  dec.eval()  # no router noise
  return dec


DECODERS = {"transformer": tiny_transformer, "phi": lambda: load("hf_phi")[0],
            "llama": lambda: load("hf_llama")[0]}
PROMPT_LEN = jnp.array([3, 7, 1, 5])  # right-padded prompts of different lengths


def prompts(width: int, prefix_len: int = 2, length: int = 11):
  """(visual prefix [4, P, width], tokens [4, length]) with random padding after each prompt."""
  kp, kt = jax.random.split(jax.random.key(1))
  return (jax.random.normal(kp, (4, prefix_len, width)),
          jax.random.randint(kt, (4, length), 3, 96))


@functools.lru_cache
def _compiled_generate(steps: int, **sampling):
  return nnx.jit(lambda dec, prefix, tokens, prompt_len, rng, image_pos: generation.generate(
      dec, prefix, tokens, prompt_len, steps, rng=rng, image_pos=image_pos, **sampling))


def cached(dec, prefix, tokens, prompt_len, steps, rng=None, image_pos=None,
           **sampling) -> np.ndarray:
  """`generation.generate`, compiled once per `steps` and sampling knobs (and per layout:
  `image_pos` None or an array)."""
  return np.asarray(_compiled_generate(steps, **sampling)(dec, prefix, tokens, prompt_len, rng,
                                                          image_pos))


def full_recompute(dec, prefix, tokens, prompt_len, steps, **sampling) -> np.ndarray:
  """`generation.generate_without_cache`, compiled (the whole sequence at every step)."""
  run = nnx.jit(functools.partial(generation.generate_without_cache, steps=steps, **sampling))
  return np.asarray(run(dec, prefix, tokens, prompt_len))


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_cached_greedy_equals_full_recompute_with_mixed_prompt_lengths(name):
  # the visual tokens spliced in at different text positions inside the prompts (row 2's
  # prompt: the image, then one token; row 3's ends with the image)
  dec = DECODERS[name]()
  prefix, tokens = prompts(dec.embed.embedding.shape[1])
  image_pos = jnp.array([1, 4, 0, 5])
  out = cached(dec, prefix, tokens, PROMPT_LEN, 5, image_pos=image_pos)
  np.testing.assert_array_equal(out, full_recompute(dec, prefix, tokens, PROMPT_LEN, 5,
                                                    image_pos=image_pos))
  assert len(set(out.ravel().tolist())) > 2  # not a constant stream
  # the first new token is the argmax of the logits a loss reads for position prompt_len
  loss_logits = nnx.jit(lambda d: d.target_logits(prefix, tokens, image_pos))(dec)
  np.testing.assert_array_equal(out[:, 0], np.argmax(loss_logits[jnp.arange(4), PROMPT_LEN], -1))
  assert (out != cached(dec, prefix, tokens, PROMPT_LEN, 5, image_pos=0 * image_pos)).any()
  if name == "phi":
    with pytest.raises(ValueError, match="image_pos must be <= prompt_len"):
      generation.generate(dec, prefix, tokens, PROMPT_LEN, 4, image_pos=image_pos + 1)


def test_eos_ends_each_row_at_its_first_eos():
  dec = DECODERS["llama"]()
  prefix, tokens = prompts(32, prefix_len=0)
  free = cached(dec, prefix, tokens, PROMPT_LEN, 5)
  eos = int(free[1, 1])  # row 1 emits it at step 1
  ended = cached(dec, prefix, tokens, PROMPT_LEN, 5, eos_id=eos, pad_id=-1)
  for row, out in zip(free, ended):
    stop = list(row).index(eos) if eos in row else 5
    np.testing.assert_array_equal(out[:stop + 1], row[:stop + 1])
    assert (out[stop + 1:] == -1).all()
  assert (ended[1, 2:] == -1).all()


def test_sampling_is_seeded_and_equals_full_recompute():
  dec = DECODERS["phi"]()
  prefix, tokens = prompts(32)
  sample = lambda seed: cached(dec, prefix, tokens, PROMPT_LEN, 5, temperature=1.5, top_p=0.9,
                              rng=jax.random.key(seed))
  a = sample(0)
  np.testing.assert_array_equal(a, sample(0))
  assert (a != sample(1)).any()
  assert (a != cached(dec, prefix, tokens, PROMPT_LEN, 5)).any()
  np.testing.assert_array_equal(a, full_recompute(dec, prefix, tokens, PROMPT_LEN, 5,
                                                  temperature=1.5, top_p=0.9,
                                                  rng=jax.random.key(0)))


def test_top_p_keeps_the_smallest_set_reaching_p():
  # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps {0, 1} (0.5 < 0.7 <= 0.8), renormalised
  # to 0.625 / 0.375; top_p=0.5 keeps {0} alone.
  logits = jnp.log(jnp.array([[0.3, 0.05, 0.5, 0.15]]))
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: generation.next_token(logits, k, 1.0, 0.7)))(
      keys))
  assert set(draws.ravel()) == {0, 2}
  assert abs((draws == 2).mean() - 0.625) < 0.03
  only = jax.vmap(lambda k: generation.next_token(logits, k, 1.0, 0.5))(keys[:50])
  assert (np.asarray(only) == 2).all()
  with pytest.raises(ValueError, match="top_p=0.0"):
    generation.next_token(logits, keys[0], 1.0, 0.0)


def test_generation_refuses_prompts_without_room():
  dec = DECODERS["transformer"]()
  prefix, tokens = prompts(32, length=8)
  with pytest.raises(ValueError, match="need tokens of length >= 11"):
    generation.generate(dec, prefix, tokens, PROMPT_LEN, 5)


def test_sharded_cache_and_generation_equal_unsharded():
  dec = DECODERS["llama"]()
  kp, kt = jax.random.split(jax.random.key(2))
  prefix, tokens = jax.random.normal(kp, (8, 2, 32)), jax.random.randint(kt, (8, 10), 3, 96)
  prompt_len = jnp.array([3, 7, 1, 5, 2, 6, 4, 1])
  run = nnx.jit(lambda d, p, t, n: generation.generate(d, p, t, n, 4))
  expected = np.asarray(run(dec, prefix, tokens, prompt_len))
  mesh = jax.make_mesh((4, 2), (mesh_lib.DATA, mesh_lib.MODEL),
                       axis_types=(AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    cache = jax.jit(lambda: dec.init_cache(8, 12))()
    assert cache[0].keys.sharding.spec[0] == mesh_lib.DATA
    np.testing.assert_array_equal(run(dec, prefix, tokens, prompt_len), expected)


def test_mocha_generates_through_the_cache_with_a_phi_decoder():
  lm_config = phi.phi_config(width=32, depth=2, mlp_dim=48, num_heads=4, num_kv_heads=4,
                             vocab_size=96, max_len=32, rotary_fraction=0.5)
  c = model.mocha_config(lm_config, {"feats": encoders.encoder_config("features", tokens=6,
                                                                      dim=16)},
                         image_size=28, channels=1)
  net = model.MoCHA(c, rngs=nnx.Rngs(0))
  net.eval()
  _, tokens = prompts(32)
  inputs = {"image": jnp.zeros((4, 28, 28, 1)),
            "features/feats": jax.random.normal(jax.random.key(3), (4, 6, 16))}
  out, prefix = nnx.jit(lambda net, inputs: (
      model.generate(net, inputs, tokens, PROMPT_LEN, 4), net.encode(inputs)))(net, inputs)
  np.testing.assert_array_equal(out, full_recompute(net.decoder, prefix, tokens, PROMPT_LEN, 4))


def test_decoder_max_len_past_the_checkpoints_positions_is_a_one_line_error():
  from moe_jax.tasks import vqa
  from moe_jax.vlm import pretrained
  path = os.path.join(DATA, "hf_phi")
  theirs = hf_decoders.read_decoder_config(path)
  limit = theirs.max_len  # 64, the fixture's max_position_embeddings
  c = model.mocha_config(theirs, {"feats": encoders.encoder_config("features", tokens=2, dim=8)},
                         image_size=28, channels=1)  # the digit-VQA images
  c.decoder.checkpoint = path
  pretrained.check_decoder_config(c)  # equal: fine
  c.decoder.max_len = limit + 1
  message = (rf"model.decoder.checkpoint=.*hf_phi: model.decoder.max_len={limit + 1} exceeds "
             rf"the checkpoint's max_position_embeddings={limit} .*set model.decoder.max_len "
             rf"<= {limit}, or model.decoder.extrapolate_positions=True .*$")
  with pytest.raises(CheckpointMismatch, match=message):
    pretrained.check_decoder_config(c)
  # the VQA task checks it at start-up (the trainer's first step), before anything is built
  from configs import mocha_tiny_digits_vqa
  run = mocha_tiny_digits_vqa.get_config("quick")
  run.model = c
  with pytest.raises(CheckpointMismatch, match=message):
    vqa.VqaTask(run).check()
  # as HF's rotary embedding (and the MoCHA reference's Phi at model_max_length 2560 > 2048):
  # positions past the checkpoint's when asked for, the angles computed as for any position
  c.decoder.extrapolate_positions = True
  pretrained.check_decoder_config(c)
  dec = nnx.eval_shape(lambda: phi.Phi(c.decoder, rngs=nnx.Rngs(0)))
  assert dec.max_len == limit + 1
  visual = jax.ShapeDtypeStruct((1, 1, c.decoder.width), jnp.float32)
  out = nnx.eval_shape(lambda d, v: d(v, jnp.zeros((1, limit), jnp.int32)), dec, visual)
  assert out.shape == (1, limit, c.decoder.vocab_size)  # 65 positions: no error
