"""MoCHA's four encoders and its Phi decoder with real-format checkpoints (tests/data, written by
tools/make_parity_fixtures.py): the features equal those the reference code's encoders take
(`mocha_encoders/reference.npz`), the decoder's logits those of HF's PhiForCausalLM
(`hf_phi/reference.npz`), the trainer loads them, and bad checkpoints are one-line errors."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from moe_jax.checkpoints import hf_decoders, importers, tree
from moe_jax.train import loop, step as step_lib
from moe_jax.vlm import decoder, encoders, model, pretrained, tokenizer, vqa_data

from configs import mocha_tiny_digits_vqa  # noqa: I100

DATA = os.path.join(os.path.dirname(__file__), "data")
# Our encoder name (sorted = the reference's order: CLIP, SigLIP, DINOv2, ConvNeXt) -> (kind,
# checkpoint directory).
CHECKPOINTS = {"1_clip": ("clip", "hf_clip"), "2_siglip": ("siglip", "mocha_encoders/siglip"),
               "3_dinov2": ("dinov2", "hf_dinov2"), "4_convnext": ("convnext", "timm_convnext")}


def encoder_configs(**changes) -> dict[str, ml_collections.ConfigDict]:
  """The four encoders, each with its fixture checkpoint and the backbone it holds."""
  out = {}
  for name, (kind, folder) in CHECKPOINTS.items():
    path = os.path.join(DATA, folder)
    backbone = importers.import_checkpoint(path)[0]
    pool = backbone.widths[-1] // 3 if kind == "convnext" else 0  # the reference's AvgPool1d(3)
    out[name] = encoders.encoder_config(kind, checkpoint=path, backbone=backbone,
                                        pool_channels=pool, **changes.get(name, {}))
  return out


def tiny_config(lm: ml_collections.ConfigDict | None = None,
                **changes) -> ml_collections.ConfigDict:
  """Stage 1 of the tiny digit VQA with the four fixture encoders and decoder `lm` (default: a
  one-block transformer)."""
  c = mocha_tiny_digits_vqa.get_config("stage1")
  c.batch_size = c.evals.test.batch_size = 8
  c.data.channels = 3
  if lm is None:
    lm = decoder.decoder_config(width=32, depth=1, mlp_dim=64, num_heads=2,
                                vocab_size=len(tokenizer.VOCAB), max_len=80)  # 56 visual + 12 text
  c.model = model.mocha_config(lm, encoder_configs(**changes), image_size=28, channels=3)
  c.optimizer.trainable = model.trainable_pattern(c.model, "stage1")
  return c


def loaded_model(c: ml_collections.ConfigDict) -> model.MoCHA:
  mocha = model.MoCHA(c.model, rngs=nnx.Rngs(0))
  nnx.update(mocha, pretrained.with_checkpoints(nnx.state(mocha, nnx.Param), c.model))
  return mocha


def check_against_checkpoints(c: ml_collections.ConfigDict) -> nnx.State:
  """`pretrained.with_checkpoints` on MoCHA's abstract parameters: its checks read shapes and
  configs only; tracing the init compiles nothing, running it op by op compiles every op this
  process has not run before."""
  abstract = nnx.eval_shape(lambda: model.MoCHA(c.model, rngs=nnx.Rngs(0)))
  return pretrained.with_checkpoints(nnx.state(abstract, nnx.Param), c.model)


def feature_diffs() -> dict[str, float]:
  """Max |ours - reference| of each encoder's features (one image batch for all four)."""
  c = tiny_config()
  mocha = loaded_model(c)
  ref = np.load(os.path.join(DATA, "mocha_encoders", "reference.npz"))
  inputs = {"image": ref["pixel_values"].transpose(0, 2, 3, 1)}
  assert mocha.group_sizes == (16, 15, 16, 9)  # 4x4 patches (-CLS), 16 - first patch, 3x3 map
  out = {}
  for name, encoder in zip(encoders.encoder_order(c.model), mocha.encoders):
    ours, expected = np.asarray(encoder(inputs)), ref[CHECKPOINTS[name][0]]
    assert ours.shape == expected.shape, name
    out[name] = float(np.abs(ours - expected).max())
  return out


def test_encoders_from_checkpoints_give_the_reference_features():
  diffs = feature_diffs()
  assert max(diffs.values()) <= 1e-5, diffs


def test_checkpoint_that_does_not_fit_the_encoder_is_one_line_error():
  c = tiny_config(**{"1_clip": dict(quick_gelu=False)})
  with pytest.raises(tree.CheckpointMismatch, match=r"^model.encoders.1_clip.checkpoint=.*hf_clip:"
                     r" model.quick_gelu=False but the checkpoint needs True$"):
    check_against_checkpoints(c)
  c = tiny_config(**{"3_dinov2": dict(mlp_dim=128)})
  with pytest.raises(tree.CheckpointMismatch, match=r"^model.encoders.3_dinov2.checkpoint=.*: "
                     r"blocks/0/mlp/fc1/bias has shape \(64,\), the encoder's \(128,\) \(set the "
                     r"encoder's backbone to the checkpoint's config\)$"):
    check_against_checkpoints(c)
  c = tiny_config()
  c.model.image_size = 35
  with pytest.raises(tree.CheckpointMismatch, match=r"posemb has shape \(1, 16, 32\), the "
                     r"encoder's \(1, 25, 32\) .*and model.image_size to its image_size\)$"):
    check_against_checkpoints(c)
  with pytest.raises(ValueError, match=r"^encoder kind='siglip' needs backbone=<a 'vit' model "):
    encoders.encoder_config("siglip", backbone=c.model.encoders["4_convnext"].backbone)


def test_paper_config_names_the_four_checkpoints_in_the_reference_order():
  from configs import mocha_paper
  c = mocha_paper.get_config("stage1")
  encoder_list = [c.model.encoders[n] for n in encoders.encoder_order(c.model)]
  assert [(e.kind, e.checkpoint) for e in encoder_list] == [  # the reference's HGA order
      ("siglip", "./models/google-siglip-large-patch16-384"),
      ("convnext", "./models/timm-convnext_xxlarge.clip_laion2b_soup_ft_in1k"),
      ("clip", "./models/openai-clip-vit-large-patch14-336"),
      ("dinov2", "./models/facebook-dinov2-large")]
  assert c.data.normalization == "clip" and c.model.image_size == 336
  assert not any(e.trainable for e in c.model.encoders.values())
  assert c.optimizer.trainable == "^(connectors|hga)/"


@pytest.mark.parametrize("side", [3, 6])
def test_posemb_resize_equals_torch_bicubic_as_the_reference_calls_it(side):
  ref = np.load(os.path.join(DATA, "mocha_posemb", "posemb_resize.npz"))
  grid = ref["grid"][0].transpose(1, 2, 0)  # [D, 4, 4] -> [4, 4, D]
  for mode, offset in (("size", encoders.POSEMB_OFFSET["siglip"]),
                       ("offset", encoders.POSEMB_OFFSET["dinov2"])):
    ours = encoders.resize_posemb_bicubic(grid.reshape(1, 16, -1), side, offset)
    expected = ref[f"{mode}_{side}"][0].transpose(1, 2, 0).reshape(1, side * side, -1)
    assert np.abs(ours - expected).max() <= 1e-5, mode


def test_siglip_and_dinov2_checkpoints_load_at_another_image_size():
  c = tiny_config()
  del c.model.encoders["1_clip"]  # the reference never interpolates CLIP's
  c.model.encoder_order = ("2_siglip", "3_dinov2", "4_convnext")
  c.model.image_size = 42  # 6x6 patches instead of the checkpoints' 4x4
  mocha = loaded_model(c)
  params = tree.flatten(nnx.to_pure_dict(nnx.state(mocha, nnx.Param)))
  for i, name in enumerate(c.model.encoder_order):
    if name in ("2_siglip", "3_dinov2"):
      source = pretrained.checkpoint_params(c.model)[f"encoders/{i}/backbone/posemb"][1]
      np.testing.assert_allclose(
          params[f"encoders/{i}/backbone/posemb"],
          encoders.resize_posemb_bicubic(source, 6, encoders.POSEMB_OFFSET[name[2:]]))
  assert mocha.group_sizes == (35, 36, 25)  # SigLIP 36 - first patch, DINOv2 36, ConvNeXt 5x5


def phi_config(**changes) -> ml_collections.ConfigDict:
  """The hf_phi fixture's Phi as `model.decoder`, its checkpoint set, with `changes`."""
  path = os.path.join(DATA, "hf_phi")
  phi = hf_decoders.import_hf_decoder(path)[0]
  phi.checkpoint = path  # max_len: the checkpoint's 64 positions (checked against config.json)
  phi.update(changes)
  return phi


def phi_with_positions(folder, positions: int) -> str:
  """A copy of the hf_phi fixture in `folder` whose config.json has `positions`
  max_position_embeddings (rotary: no parameters; HF's PhiForCausalLM computes the same logits
  under 64 and 80, measured on 76 positions with transformers 5.24)."""
  path = os.path.join(str(folder), "hf_phi")
  shutil.copytree(os.path.join(DATA, "hf_phi"), path)
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config["max_position_embeddings"] = positions
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return path


def phi_mocha_config(**decoder_changes) -> ml_collections.ConfigDict:
  """The tiny digit-VQA MoCHA (stage 2) whose decoder is the hf_phi fixture's Phi."""
  c = mocha_tiny_digits_vqa.get_config("stage2")
  c.batch_size = c.evals.test.batch_size = 8
  c.optimizer.warmup_steps = 0
  c.model = model.mocha_config(phi_config(**decoder_changes),
                               {n: c.model.encoders[n] for n in c.model.encoder_order},
                               image_size=28, channels=1)
  c.optimizer.trainable = model.trainable_pattern(c.model, "stage2")
  return c


def test_trainer_loads_encoder_and_phi_checkpoints_and_a_vqa_step_keeps_the_encoders_frozen(
    tmp_path):
  """One trainer (one compile) for both kinds of checkpoint: the four encoders' and the Phi
  decoder's, whose logits equal HF's; a stage-2 step trains connectors and decoder only."""
  # 56 visual + 12 text tokens: past the fixture's 64 positions, so a copy with 80
  c = tiny_config(phi_config(checkpoint=phi_with_positions(tmp_path, 80), max_len=80))
  c.optimizer.warmup_steps = 0
  c.optimizer.trainable = model.trainable_pattern(c.model, "stage2")
  assert c.optimizer.trainable == "^(connectors|hga|decoder)/"  # pretrained encoders: frozen
  trainer = loop.Trainer(c, str(tmp_path / "run"))
  state, _ = trainer.restore_or_init()  # a fresh run: encoders and decoder from checkpoints
  loaded = pretrained.checkpoint_params(c.model)
  assert {k.split("/")[1] for k in loaded if k.startswith("encoders/")} == {"0", "1", "2", "3"}
  before = tree.flatten(jax.device_get(nnx.to_pure_dict(state.params)))
  for k, (_, value) in loaded.items():
    np.testing.assert_array_equal(before[k], value, err_msg=k)
  decoder_lm = model.build_decoder(c.model.decoder, rngs=nnx.Rngs(1))
  params = nnx.state(decoder_lm, nnx.Param)
  nnx.replace_by_pure_dict(params, tree.unflatten(
      {k.removeprefix("decoder/"): v for k, v in before.items() if k.startswith("decoder/")}))
  nnx.update(decoder_lm, params)
  ref = np.load(os.path.join(DATA, "hf_phi", "reference.npz"))
  ids = jnp.asarray(ref["input_ids"])
  logits = decoder_lm(jnp.zeros((ids.shape[0], 0, c.model.decoder.width)), ids)
  assert np.abs(np.asarray(logits) - ref["logits"]).max() <= 1e-5
  batch = next(vqa_data.train_dataset(c.data, batch_size=c.batch_size))
  with jax.set_mesh(trainer.mesh):
    train_step = step_lib.make_train_step(trainer.defs, trainer.tx, trainer.schedule,
                                          trainer.mesh, trainer.shardings, trainer.task.loss)
    state, metrics = train_step(state, batch)
  after = tree.flatten(jax.device_get(nnx.to_pure_dict(state.params)))
  assert np.isfinite(float(metrics["train/loss"]))
  for k, (_, value) in loaded.items():
    if k.startswith("encoders/"):  # loaded, and frozen by the stage-2 mask
      np.testing.assert_array_equal(after[k], value, err_msg=k)
  assert not np.array_equal(before["decoder/head/kernel"], after["decoder/head/kernel"])
  assert any(not np.array_equal(before[k], after[k]) for k in after if k.startswith("connectors"))


def test_decoder_checkpoint_that_does_not_fit_model_decoder_is_one_line_error():
  with pytest.raises(tree.CheckpointMismatch, match=r"^model.decoder.checkpoint=.*hf_phi: "
                     r"model.decoder.num_heads=2 but the checkpoint needs 4$"):
    check_against_checkpoints(phi_mocha_config(num_heads=2, num_kv_heads=2))  # same shapes
  with pytest.raises(tree.CheckpointMismatch, match=r"^model.decoder.checkpoint=.*hf_phi: "
                     r"blocks/0/mlp/fc1/bias has shape \(48,\), the decoder's \(64,\) \(set "
                     r"model.decoder to the checkpoint's config: "):
    check_against_checkpoints(phi_mocha_config(mlp_dim=64))
  with pytest.raises(tree.CheckpointMismatch, match=r"^model.decoder: parameter blocks/1/.* is in"
                     r" the checkpoint only \(set model.decoder to the checkpoint's config"):
    check_against_checkpoints(phi_mocha_config(depth=1))
