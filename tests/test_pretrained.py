"""Pretrained weights: every importer (HF ViT, DINOv2, CLIP, SigLIP, ConvNeXt; big_vision /
vit_jax npz; timm hub / open_clip ConvNeXt) against reference outputs (tests/data, written by
tools/make_parity_fixtures.py with torch / timm; read here without torch), their errors, and
`config.init_from`."""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from moe_jax.checkpoints import big_vision, hf, importers, init_from, tree
from moe_jax.models import build_model

DATA = os.path.join(os.path.dirname(__file__), "data")
# fixture -> {reference output: our output of (model, images [B, H, W, C])}.
last_norm_tokens = lambda m, x: m.tokens(x)
pooled = lambda m, x: m.features(x)
OUTPUTS = {
    "hf_vit": {"last_hidden_state": last_norm_tokens},  # its tanh pooler is not in our model
    "hf_dinov2": {"last_hidden_state": last_norm_tokens, "pooler_output": pooled},
    "hf_dinov2_registers": {"last_hidden_state": last_norm_tokens, "pooler_output": pooled},
    # CLIP's last_hidden_state has no final norm; MoCHA's features are hidden_states[-2].
    "hf_clip": {"last_hidden_state": lambda m, x: m.hidden_states(x, -1),
                "penultimate_hidden_state": lambda m, x: m.hidden_states(x, -2),
                "pooler_output": pooled},
    "hf_siglip": {"last_hidden_state": last_norm_tokens, "pooler_output": pooled},
    # HF ConvNeXt's last_hidden_state is the last stage's map [B, D, h, w] (compared as tokens).
    "hf_convnext": {"last_hidden_state": last_norm_tokens, "pooler_output": pooled},
    # timm's VisionTransformer after timm's own npz loader: forward_features, pre_logits, logits.
    "big_vision_augreg": {"tokens": last_norm_tokens, "pre_logits": pooled,
                          "logits": lambda m, x: m(x)},
    "big_vision_siglip": {"tokens": last_norm_tokens, "pre_logits": pooled,
                          "logits": lambda m, x: m(x)},
    # timm's ConvNeXt (MoCHA's ConvNeXt-XXL layout): last-stage tokens, pre_logits, logits.
    "timm_convnext": {"tokens": last_norm_tokens, "pre_logits": pooled,
                      "logits": lambda m, x: m(x)},
}


def fixture_path(name: str) -> str:
  """The checkpoint of fixture `name`: an HF directory or a big_vision .npz file."""
  folder = os.path.join(DATA, name)
  return os.path.join(folder, "checkpoint.npz") if name.startswith("big_vision") else folder


def imported_model(path: str):
  config, params, report = importers.import_checkpoint(path)
  model = build_model(config, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, tree.unflatten(params))
  nnx.update(model, state)
  model.eval()
  return model, report


def max_diffs(name: str) -> dict[str, float]:
  """Max |ours - reference| of each output the fixture saved."""
  model, _ = imported_model(fixture_path(name))
  ref = dict(np.load(os.path.join(DATA, name, "reference.npz")))
  images = ref.pop("pixel_values").transpose(0, 2, 3, 1)  # [B, C, H, W] -> [B, H, W, C]
  if name == "hf_convnext":
    r = ref["last_hidden_state"]
    ref["last_hidden_state"] = r.transpose(0, 2, 3, 1).reshape(r.shape[0], -1, r.shape[1])
  assert set(ref) == set(OUTPUTS[name])
  return {k: float(np.abs(ours(model, images) - ref[k]).max()) for k, ours in OUTPUTS[name].items()}


@pytest.mark.parametrize("name", list(OUTPUTS))
def test_imported_features_match_torch(name):
  diffs = max_diffs(name)
  assert diffs and max(diffs.values()) <= 1e-5, diffs


def test_report_names_used_and_ignored_keys():
  _, report = imported_model(os.path.join(DATA, "hf_dinov2_registers"))  # a sharded checkpoint
  assert report.used["cls"] == ("embeddings.cls_token", "embeddings.position_embeddings")
  assert report.used["registers"] == ("embeddings.register_tokens",)
  assert report.used["blocks/1/ls2/scale"] == ("encoder.layer.1.layer_scale2.lambda1",)
  assert list(report.ignored) == ["embeddings.mask_token"]
  weight_map = json.load(open(os.path.join(DATA, "hf_dinov2_registers",
                                           "model.safetensors.index.json")))["weight_map"]
  assert len(set(weight_map.values())) > 1
  assert {k for keys in report.used.values() for k in keys} | set(report.ignored) == set(weight_map)


def _edited_copy(tmp_path, name: str, edit) -> str:
  """A copy of fixture `name` whose tensors are `edit(tensors)`, as one model.safetensors."""
  from safetensors.numpy import save_file
  folder = tmp_path / name
  folder.mkdir()
  shutil.copy(os.path.join(DATA, name, "config.json"), folder)
  tensors = hf.read_safetensors(os.path.join(DATA, name))
  edit(tensors)
  save_file(tensors, str(folder / "model.safetensors"))
  return str(folder)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("encoder.layer.1.mlp.fc2.bias"),
     "no key 'encoder.layer.1.mlp.fc2.bias' (needed for our blocks/1/mlp/fc2/bias)"),
    (lambda t: t.update({"encoder.layer.0.attention.attention.query.weight": np.zeros((32, 16),
                                                                                    np.float32)}),
     "'encoder.layer.0.attention.attention.query.weight' has shape (32, 16), our "
     "blocks/0/attn/query/kernel (32, 2, 16) needs (32, 32)"),
    (lambda t: t.update({"encoder.layer.2.norm1.weight": np.ones(32, np.float32)}),
     "key 'encoder.layer.2.norm1.weight' maps onto no parameter of our model (1 such keys)"),
])
def test_unmatched_or_misshaped_key_is_one_line_error(tmp_path, edit, message):
  path = _edited_copy(tmp_path, "hf_dinov2", edit)
  with pytest.raises(tree.CheckpointMismatch) as e:
    hf.import_hf(path)
  assert str(e.value) == f"{path}: {message}"


def test_full_clip_model_imports_its_image_tower_and_reports_the_rest(tmp_path):
  """A hub `CLIPModel` checkpoint: config.json nests `vision_config`, keys carry `vision_model.`,
  the text tower's keys are reported as ignored; the result equals the image-tower fixture's."""
  from safetensors.numpy import save_file
  folder = tmp_path / "clip_full"
  folder.mkdir()
  vision = json.load(open(os.path.join(DATA, "hf_clip", "config.json")))
  json.dump({"model_type": "clip", "vision_config": vision}, open(folder / "config.json", "w"))
  tensors = {f"vision_model.{k}": v for k, v in
             hf.read_safetensors(os.path.join(DATA, "hf_clip")).items()}
  tensors.update({"text_model.final_layer_norm.weight": np.ones(4, np.float32),
                  "logit_scale": np.ones((), np.float32),
                  "visual_projection.weight": np.ones((4, 32), np.float32)})
  save_file(tensors, str(folder / "model.safetensors"))
  _, params, report = hf.import_hf(str(folder))
  _, want, _ = hf.import_hf(os.path.join(DATA, "hf_clip"))
  assert sorted(report.ignored) == ["logit_scale", "text_model.final_layer_norm.weight",
                                    "visual_projection.weight"]
  assert report.used["cls"] == ("vision_model.embeddings.class_embedding",
                                "vision_model.embeddings.position_embedding.weight")
  assert params.keys() == want.keys()
  assert all(np.array_equal(params[k], want[k]) for k in want)


@pytest.mark.parametrize("stats,preset", [
    (dict(image_mean=[0.48145466, 0.4578275, 0.40821073],
          image_std=[0.26862954, 0.26130258, 0.27577711]), "clip"),
    (dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]), "imagenet"),
    (dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]), "minus_one_one"),
    (dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]), None),  # no such preset
    (None, None),  # no preprocessor_config.json
])
def test_report_names_the_normalization_preset(tmp_path, stats, preset):
  folder = tmp_path / "clip"
  shutil.copytree(os.path.join(DATA, "hf_clip"), folder)
  if stats is not None:
    json.dump(stats, open(folder / "preprocessor_config.json", "w"))
  assert importers.import_checkpoint(str(folder))[2].normalization == preset


def test_big_vision_checkpoints_expect_minus_one_one_images():
  assert importers.import_checkpoint(fixture_path("big_vision_augreg"))[2].normalization == (
      "minus_one_one")


def test_siglip_packed_map_head_projection_misshaped_is_one_line_error(tmp_path):
  path = _edited_copy(tmp_path, "hf_siglip", lambda t: t.update(
      {"head.attention.in_proj_weight": np.zeros((64, 32), np.float32)}))
  with pytest.raises(tree.CheckpointMismatch) as e:
    hf.import_hf(path)
  assert str(e.value) == (f"{path}: 'head.attention.in_proj_weight' has shape (64, 32), our "
                          "map_head/attn/query/kernel (32, 2, 16) needs (96, 32)")


def test_hidden_states_layer_out_of_range_is_one_line_error():
  model, _ = imported_model(os.path.join(DATA, "hf_clip"))
  with pytest.raises(ValueError, match=r"^hidden_states: layer=3 must lie in \[-3, 2\] "
                     r"\(model.depth=2\)$"):
    model.hidden_states(np.zeros((1, 28, 28, 3), np.float32), 3)


def test_big_vision_scanned_layout_imports_the_same_parameters(tmp_path):
  """big_vision's scanned checkpoints stack every block's arrays on a leading depth axis."""
  flat = big_vision.read_npz(fixture_path("big_vision_siglip"))
  block = "params/img/Transformer/encoderblock"
  scanned = {k: v for k, v in flat.items() if not k.startswith(f"{block}_")}
  for k in [k for k in flat if k.startswith(f"{block}_0/")]:
    scanned[k.replace(f"{block}_0/", f"{block}/")] = np.stack(
        [flat[k.replace(f"{block}_0/", f"{block}_{i}/")] for i in range(2)])
  np.savez(tmp_path / "scanned.npz", **scanned)
  _, params, report = big_vision.import_big_vision(str(tmp_path / "scanned.npz"))
  _, want, _ = big_vision.import_big_vision(fixture_path("big_vision_siglip"))
  assert report.used["blocks/1/mlp/fc2/bias"] == (f"{block}/MlpBlock_0/Dense_1/bias",)
  assert list(report.ignored) == ["params/b", "params/t", "params/txt/Embed_0/embedding"]
  assert params.keys() == want.keys()
  assert all(np.array_equal(params[k], want[k]) for k in want)


def test_big_vision_vit_layout_equals_the_augreg_one(tmp_path):
  """big_vision's own ViT (`params/`): blocks named LayerNorm_0/MultiHeadDotProductAttention_0/
  LayerNorm_1/MlpBlock_0 and a patch-only `pos_embedding` (no position for the CLS token)."""
  augreg = big_vision.read_npz(fixture_path("big_vision_augreg"))
  names = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
           "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
  bv = {}
  for k, v in augreg.items():
    for old, new in names.items():
      k = k.replace(f"/{old}/", f"/{new}/")
    bv[f"params/{k}"] = v
  pos = bv.pop("params/Transformer/posembed_input/pos_embedding")
  bv["params/pos_embedding"], bv["params/cls"] = pos[:, 1:], bv["params/cls"] + pos[:, :1]
  np.savez(tmp_path / "bv.npz", **bv)
  _, params, report = importers.import_checkpoint(str(tmp_path / "bv.npz"))
  _, want, _ = importers.import_checkpoint(fixture_path("big_vision_augreg"))
  assert report.used["cls"] == ("params/cls",) and not report.ignored
  assert params.keys() == want.keys()
  assert all(np.array_equal(params[k], want[k]) for k in want)


def test_vit_jax_opt_target_prefix_reports_the_optimizer_state_as_ignored(tmp_path):
  tensors = {f"opt/target/{k}": v for k, v in
             big_vision.read_npz(fixture_path("big_vision_augreg")).items()}
  tensors["opt/state/step"] = np.zeros((), np.int32)
  np.savez(tmp_path / "vit_jax.npz", **tensors)
  _, params, report = importers.import_checkpoint(str(tmp_path / "vit_jax.npz"), "big_vision")
  _, want, _ = importers.import_checkpoint(fixture_path("big_vision_augreg"))
  assert report.ignored == {"opt/state/step": "vit_jax optimizer state (not parameters)"}
  assert report.used["cls"] == ("opt/target/cls", "opt/target/Transformer/posembed_input/pos_embedding")
  assert all(np.array_equal(params[k], want[k]) for k in want) and params.keys() == want.keys()


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.update({"pre_logits/kernel": np.zeros((32, 32), np.float32)}),
     "key 'pre_logits/kernel' maps onto no parameter of our model (1 such keys)"),
    (lambda t: t.update({"Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias":
                         np.zeros(63, np.float32)}),
     "'Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias' has shape (63,), our "
     "blocks/1/mlp/fc1/bias (64,) needs (64,)"),
    (lambda t: t.pop("Transformer/encoderblock_0/LayerNorm_2/scale"),
     "no key 'Transformer/encoderblock_0/LayerNorm_2/scale' (needed for our blocks/0/norm2/scale)"),
])
def test_big_vision_bad_key_is_one_line_error(tmp_path, edit, message):
  tensors = big_vision.read_npz(fixture_path("big_vision_augreg"))
  edit(tensors)
  path = str(tmp_path / "edited.npz")
  np.savez(path, **tensors)
  with pytest.raises(tree.CheckpointMismatch) as e:
    importers.import_checkpoint(path)
  assert str(e.value) == f"{path}: {message}"


def test_convnext_unused_key_and_wrong_kind_are_one_line_errors(tmp_path):
  path = _edited_copy(tmp_path, "hf_convnext", lambda t: t.update(
      {"encoder.stages.1.layers.2.dwconv.bias": np.zeros(16, np.float32)}))
  with pytest.raises(tree.CheckpointMismatch) as e:
    importers.import_checkpoint(path, "hf")
  assert str(e.value) == (f"{path}: key 'encoder.stages.1.layers.2.dwconv.bias' maps onto no "
                          "parameter of our model (1 such keys)")
  npz = fixture_path("big_vision_augreg")
  with pytest.raises(tree.CheckpointMismatch, match=r"^init_from.kind='hf' but .*checkpoint.npz "
                     r"is a 'big_vision' checkpoint \(set init_from.kind='big_vision'\)$"):
    importers.import_checkpoint(npz, "hf")


def test_timm_checkpoint_reads_eps_and_normalization_from_its_config():
  config, _, report = importers.import_checkpoint(fixture_path("timm_convnext"), "timm")
  assert (config.widths, config.depths, config.patch_size, config.num_classes) == (
      (8, 8, 16, 24), (1, 1, 2, 1), 1, 5)
  assert config.layer_norm_eps == config.head_norm_eps == 1e-5  # timm's convnext_xxlarge
  assert report.normalization == "clip" and not report.ignored


def _open_clip_copy(tmp_path, edit=lambda t: None) -> str:
  """The timm fixture as open_clip saves a CLIP-ConvNeXt: the trunk under `visual.trunk.`, a
  joint-embedding projection and a text tower."""
  from safetensors.numpy import save_file
  timm_tensors = hf.read_safetensors(fixture_path("timm_convnext"))
  tensors = {f"visual.trunk.{k}": v for k, v in timm_tensors.items() if not k.startswith("head.fc")}
  tensors.update({"visual.head.proj.weight": np.ones((4, 24), np.float32),
                  "text.token_embedding.weight": np.ones((10, 4), np.float32),
                  "logit_scale": np.ones((), np.float32)})
  edit(tensors)
  save_file(tensors, str(tmp_path / "open_clip_model.safetensors"))
  with open(tmp_path / "open_clip_config.json", "w") as f:
    json.dump({"model_cfg": {"vision_cfg": {"timm_model_name": "convnext_xxlarge"}},
               "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                  "std": [0.26862954, 0.26130258, 0.27577711]}}, f)
  return str(tmp_path)


def test_open_clip_convnext_trunk_equals_the_timm_one(tmp_path):
  path = _open_clip_copy(tmp_path)
  config, params, report = importers.import_checkpoint(path, "timm")
  timm_config, timm_params, _ = importers.import_checkpoint(fixture_path("timm_convnext"))
  assert config.num_classes == 0 and timm_config.num_classes == 5
  assert sorted(params) == sorted(k for k in timm_params if not k.startswith("head/"))
  assert all(np.array_equal(params[k], timm_params[k]) for k in params)
  assert sorted(report.ignored) == ["logit_scale", "text.token_embedding.weight",
                                    "visual.head.proj.weight"]
  assert report.normalization == "clip"


def test_timm_convnext_bad_key_or_architecture_is_one_line_error(tmp_path):
  path = _open_clip_copy(tmp_path, lambda t: t.update(
      {"visual.trunk.stages.0.blocks.0.mlp.grn.weight": np.ones(32, np.float32)}))
  with pytest.raises(tree.CheckpointMismatch) as e:
    importers.import_checkpoint(path)
  assert str(e.value) == (f"{path}: key 'stages.0.blocks.0.mlp.grn.weight' maps onto no "
                          "parameter of our model (1 such keys)")
  with open(tmp_path / "open_clip_config.json", "w") as f:
    json.dump({"model_cfg": {"vision_cfg": {"timm_model_name": "vit_large_patch14"}}}, f)
  with pytest.raises(tree.CheckpointMismatch, match=r"^timm architecture='vit_large_patch14': "
                     r"only ConvNeXt is supported$"):
    importers.import_checkpoint(path)


def test_init_from_big_vision_checks_the_architecture():
  """A model config whose GELU differs from the checkpoint's is a one-line error; the matching
  one gets the checkpoint's parameters."""
  from moe_jax.models import vit
  config, want, _ = importers.import_checkpoint(fixture_path("big_vision_augreg"))
  c = rules(kind="big_vision", path=fixture_path("big_vision_augreg"))
  model = vit.vit_config("B/7", **{k: config[k] for k in ("width", "depth", "mlp_dim",
                                                             "num_heads", "image_size")})
  model.gelu_approximate = False
  with pytest.raises(tree.CheckpointMismatch, match=r"^init_from .*checkpoint.npz: "
                     r"model.gelu_approximate=False but the checkpoint needs True$"):
    init_from.source_params(c, model)
  model.gelu_approximate = True
  assert init_from.source_params(c, model).keys() == want.keys()


def rules(**kw):
  c = init_from.default_config()
  c.update({"kind": "run", "path": "src", **kw})
  return c


def test_init_rules_keep_resize_reinit():
  g = np.arange(4, dtype=np.float32).reshape(1, 4, 1) * np.ones((1, 1, 2), np.float32)
  source = {"posemb": g, "cls": np.full((1, 1, 2), 7.0, np.float32),
            "head/kernel": np.ones((2, 10), np.float32)}
  fresh = {"posemb": np.zeros((1, 9, 2), np.float32), "cls": np.zeros((1, 1, 2), np.float32),
           "head/kernel": np.zeros((2, 12), np.float32)}
  out = init_from.initialise(fresh, source, rules(reinit="head/.*"), [])
  np.testing.assert_array_equal(out["cls"], source["cls"])  # kept
  np.testing.assert_array_equal(out["head/kernel"], fresh["head/kernel"])  # re-initialised
  # 2x2 grid [[0, 1], [2, 3]] -> 3x3 bilinear (half-pixel centres): corners stay, middle = 1.5.
  resized = out["posemb"][0, :, 0].reshape(3, 3)
  np.testing.assert_allclose(resized[[0, 0, 2, 2], [0, 2, 0, 2]], [0, 1, 2, 3])
  np.testing.assert_allclose(resized[1, 1], 1.5)
  with pytest.raises(tree.CheckpointMismatch, match=r"^init_from src: our parameter head/kernel "
                     r"has shape \(2, 12\), the checkpoint's \(2, 10\) \(add it to init_from"):
    init_from.initialise(fresh, source, rules(), [])
  with pytest.raises(tree.CheckpointMismatch, match="^init_from src: checkpoint parameter extra "):
    init_from.initialise(fresh, {**source, "extra": g}, rules(reinit="head/.*"), [])


def test_run_initialised_from_another_run_at_other_image_size_trains(tmp_path):
  from test_train import losses, tiny_config, without_evals
  from moe_jax.train import loop
  tfds_dir = str(tmp_path / "tfds")
  # no evaluations; one checkpoint per run, at its last step
  dense = dict(total_steps=2, checkpoint_every_steps=0,
               **{"model.name": "vit", "model.posemb": "learned", "model.pool": "cls"})
  source = without_evals(tiny_config(tfds_dir, **dense, **{"data.image_size": 14}))  # 2x2 grid
  source.init_from = init_from.default_config()
  loop.Trainer(source, str(tmp_path / "a")).train()
  c = without_evals(tiny_config(tfds_dir, **{**dense, "total_steps": 40, "log_every_steps": 1,
                                             "optimizer.learning_rate": 5e-3}))  # 4x4 grid
  c.init_from = rules(path=str(tmp_path / "a"), reinit="head/.*")
  trainer = loop.Trainer(c, str(tmp_path / "b"))
  state, _ = trainer.restore_or_init()
  a = init_from.source_params(rules(path=str(tmp_path / "a")), c.model)
  params = tree.flatten(jax.device_get(nnx.to_pure_dict(state.params)))
  assert int(state.step) == 0 and params["posemb"].shape == (1, 16, 32) != a["posemb"].shape
  np.testing.assert_array_equal(params["posemb"], init_from.resize_posemb(a["posemb"], 16))
  np.testing.assert_array_equal(params["blocks/1/mlp/fc2/kernel"], a["blocks/1/mlp/fc2/kernel"])
  assert not np.abs(params["head/bias"]).any()  # zero-initialised head, not the source's
  assert np.abs(a["head/bias"]).any()
  trainer.train()
  run = losses(str(tmp_path / "b"))
  assert np.mean([run[s] for s in range(36, 41)]) < run[1] - 0.05, run
  c.init_from.path = str(tmp_path / "missing")  # its own checkpoint wins: resumes, ignores it
  assert int(loop.Trainer(c, str(tmp_path / "b")).restore_or_init()[0].step) == 40
