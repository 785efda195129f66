"""Writes the conversion parity fixtures `tests/data/<model>/`: tiny random reference models.

HF fixtures are what `save_pretrained` writes (`config.json` + `model.safetensors`, or shards +
`model.safetensors.index.json`); big_vision fixtures are random `.npz` checkpoints in the AugReg
(vit_jax) and big_vision SigLIP image-tower layouts, loaded into timm's `VisionTransformer` by
timm's own npz loader (`timm.models.vision_transformer._load_weights`), so the reference is not
our code. Each fixture has `reference.npz`: fixed `pixel_values [B, C, H, W]` and the reference's
outputs on them in float32 (names below). `timm_convnext` is a timm ConvNeXt saved by timm's
`save_for_hf` (the timm hub layout of MoCHA's ConvNeXt-XXL); `mocha_encoders` holds the features
MoCHA's four encoders take (its `*_encoder.py` `feature_select`, on one shared image) from the
CLIP, DINOv2 and timm ConvNeXt fixtures and a 4-layer SigLIP. The tests read these with
`moe_jax.checkpoints` and no torch.

  python -m venv /work/venv-convert && /work/venv-convert/bin/pip install -e '.[convert]'
  HF_HUB_OFFLINE=1 /work/venv-convert/bin/python tools/make_parity_fixtures.py [NAME ...]
"""
from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import safetensors.torch
import timm
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
import torch
import transformers as tf
from timm.models._hub import save_for_hf
from timm.models.vision_transformer import _load_weights

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data")
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28,
            patch_size=7, num_channels=3)
# name -> (model, save_pretrained kwargs); dinov2_registers is saved in shards.
HF_MODELS = {
    "hf_vit": (lambda: tf.ViTModel(tf.ViTConfig(intermediate_size=64, **TINY)), {}),
    "hf_dinov2": (lambda: tf.Dinov2Model(tf.Dinov2Config(mlp_ratio=2, layerscale_value=0.5,
                                                         **TINY)), {}),
    "hf_dinov2_registers": (lambda: tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(
        mlp_ratio=2, layerscale_value=0.5, num_register_tokens=2, **TINY)),
                            dict(max_shard_size="40KB")),
    "hf_clip": (lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(intermediate_size=64, **TINY)), {}),
    "hf_siglip": (lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(intermediate_size=64,
                                                                     **TINY)), {}),
    "hf_convnext": (lambda: tf.ConvNextModel(tf.ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16], depths=[1, 2], num_stages=2, image_size=28,
        layer_scale_init_value=0.5)), {}),
}
WIDTH, HEADS, MLP, PATCH, DEPTH, CLASSES = 32, 2, 64, 7, 2, 5


def perturbed(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
  """`model` with every parameter moved by N(0, scale): norms, biases and LayerScale no longer
  sit at their 1 / 0 / constant inits, so a layout error in any of them shows in the outputs."""
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))
  return model.eval()


def pixels() -> np.ndarray:
  return np.random.default_rng(0).uniform(-1, 1, (2, 3, 28, 28)).astype(np.float32)


def saved_reference(name: str, make, save_kwargs: dict) -> tuple[torch.nn.Module, str]:
  """(the perturbed model `make()` under seed 0, its folder `OUT/name`, rewritten by
  `save_pretrained`)."""
  torch.manual_seed(0)
  model = perturbed(make())
  folder = os.path.join(OUT, name)
  shutil.rmtree(folder, ignore_errors=True)
  model.save_pretrained(folder, **save_kwargs)
  return model, folder


def hf_fixture(name: str, make, save_kwargs: dict) -> str:
  """`saved_reference` + last_hidden_state, pooler_output (not for HF ViT, whose tanh pooler we
  do not have) and, for CLIP, hidden_states[-2] (MoCHA's features); returns the folder."""
  model, folder = saved_reference(name, make, save_kwargs)
  x = pixels()
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(x), output_hidden_states=True)
  arrays = dict(pixel_values=x, last_hidden_state=out.last_hidden_state.numpy())
  if name != "hf_vit":
    arrays["pooler_output"] = out.pooler_output.numpy()
  if name == "hf_clip":
    arrays["penultimate_hidden_state"] = out.hidden_states[-2].numpy()
  np.savez(os.path.join(folder, "reference.npz"), **arrays)
  return folder


def _dense(rng, prefix: str, n_in, n_out) -> dict[str, np.ndarray]:
  return {f"{prefix}/kernel": rng.normal(0, 0.3, (*n_in, *n_out)).astype(np.float32),
          f"{prefix}/bias": rng.normal(0, 0.1, n_out).astype(np.float32)}


def _norm(rng, prefix: str) -> dict[str, np.ndarray]:
  return {f"{prefix}/scale": (1 + rng.normal(0, 0.1, WIDTH)).astype(np.float32),
          f"{prefix}/bias": rng.normal(0, 0.1, WIDTH).astype(np.float32)}


def _attention(rng, prefix: str) -> dict[str, np.ndarray]:
  d = WIDTH // HEADS
  out = {k: v for p in ("query", "key", "value")
         for k, v in _dense(rng, f"{prefix}/{p}", (WIDTH,), (HEADS, d)).items()}
  out.update(_dense(rng, f"{prefix}/out", (HEADS, d), (WIDTH,)))
  out[f"{prefix}/out/bias"] = out[f"{prefix}/out/bias"].reshape(WIDTH)
  return out


def _mlp(rng, prefix: str) -> dict[str, np.ndarray]:
  return {**_dense(rng, f"{prefix}/Dense_0", (WIDTH,), (MLP,)),
          **_dense(rng, f"{prefix}/Dense_1", (MLP,), (WIDTH,))}


def npz_checkpoint(layout: str) -> dict[str, np.ndarray]:
  """A random tiny checkpoint: 'augreg' (vit_jax names, CLS token, posemb incl. the CLS
  position) or 'siglip' (big_vision two-tower `params/img/...`, MAP head, + text-tower keys)."""
  rng = np.random.default_rng(1)
  grid = 28 // PATCH
  w = {**_dense(rng, "embedding", (PATCH, PATCH, 3), (WIDTH,)),
       **_norm(rng, "Transformer/encoder_norm"), **_dense(rng, "head", (WIDTH,), (CLASSES,))}
  ln, mha, ln2, mlp = (("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2",
                        "MlpBlock_3") if layout == "augreg" else
                       ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1",
                        "MlpBlock_0"))
  for i in range(DEPTH):
    b = f"Transformer/encoderblock_{i}"
    w.update({**_norm(rng, f"{b}/{ln}"), **_attention(rng, f"{b}/{mha}"),
              **_norm(rng, f"{b}/{ln2}"), **_mlp(rng, f"{b}/{mlp}")})
  if layout == "augreg":
    w["cls"] = rng.normal(0, 0.3, (1, 1, WIDTH)).astype(np.float32)
    w["Transformer/posembed_input/pos_embedding"] = rng.normal(
        0, 0.3, (1, grid * grid + 1, WIDTH)).astype(np.float32)
    return w
  w["pos_embedding"] = rng.normal(0, 0.3, (1, grid * grid, WIDTH)).astype(np.float32)
  w["MAPHead_0/probe"] = rng.normal(0, 0.3, (1, 1, WIDTH)).astype(np.float32)
  w.update({**_attention(rng, "MAPHead_0/MultiHeadDotProductAttention_0"),
            **_norm(rng, "MAPHead_0/LayerNorm_0"), **_mlp(rng, "MAPHead_0/MlpBlock_0")})
  out = {f"params/img/{k}": v for k, v in w.items()}
  out.update({"params/txt/Embed_0/embedding": rng.normal(0, 1, (10, 8)).astype(np.float32),
              "params/t": np.ones(1, np.float32), "params/b": np.zeros(1, np.float32)})
  return out


def npz_fixture(layout: str) -> str:
  """The random npz + timm's outputs after its own npz loader: `tokens` (final-norm tokens),
  `pre_logits` (pooled), `logits`. Tanh GELU as in the JAX originals (timm's default is erf);
  returns the folder."""
  torch.manual_seed(0)
  folder = os.path.join(OUT, f"big_vision_{layout}")
  shutil.rmtree(folder, ignore_errors=True)
  os.makedirs(folder)
  path = os.path.join(folder, "checkpoint.npz")
  np.savez(path, **npz_checkpoint(layout))
  model = timm.models.vision_transformer.VisionTransformer(
      img_size=28, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
      mlp_ratio=MLP / WIDTH, num_classes=CLASSES, act_layer="gelu_tanh",
      **(dict(class_token=False, global_pool="map") if layout == "siglip" else {})).eval()
  _load_weights(model, path)
  x = torch.from_numpy(pixels())
  with torch.no_grad():
    tokens = model.forward_features(x)
    arrays = dict(pixel_values=x.numpy(), tokens=tokens.numpy(),
                  pre_logits=model.forward_head(tokens, pre_logits=True).numpy(),
                  logits=model(x).numpy())
  np.savez(os.path.join(folder, "reference.npz"), **arrays)
  return folder


# A timm ConvNeXt small enough for a fixture: 4 stages (timm has 4), stem 1 (28 px -> 3x3 tokens),
# timm's convnext_xxlarge norm_eps, LayerScale.
TIMM_CONVNEXT_ARGS = dict(depths=(1, 1, 2, 1), dims=(8, 8, 16, 24), patch_size=1, norm_eps=1e-5,
                          ls_init_value=0.5, num_classes=5)
CONVNEXT_POOL = 3  # MoCHA's nn.AvgPool1d(kernel_size=3, stride=3) over channels (3072 -> 1024)


def timm_convnext_model() -> torch.nn.Module:
  return perturbed(timm.models.convnext.ConvNeXt(**TIMM_CONVNEXT_ARGS))


def mocha_convnext_tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
  """MoCHA's `ConvNextVisionTower.forward_features`: stem, stages, the last map as [B, h*w, C]."""
  x = model.stem(x)
  for stage in model.stages:
    x = stage(x)
  b, c = x.shape[:2]
  return x.view(b, c, -1).transpose(1, 2)


def timm_convnext_fixture(folder: str) -> None:
  """`save_for_hf` (config.json with architecture + model_args, model.safetensors) + `tokens`
  (last stage, no norm, as MoCHA takes them), `pre_logits` and `logits`."""
  model = timm_convnext_model()
  os.makedirs(folder)
  # What timm.create_model("convnext_xxlarge.clip_laion2b_soup_ft_in1k") sets (CLIP mean / std).
  model.pretrained_cfg = dict(architecture="convnext_xxlarge", mean=OPENAI_CLIP_MEAN,
                              std=OPENAI_CLIP_STD, input_size=(3, 28, 28))
  save_for_hf(model, folder, model_args=TIMM_CONVNEXT_ARGS, safe_serialization=True)
  x = torch.from_numpy(pixels())
  with torch.no_grad():
    features = model.forward_features(x)
    arrays = dict(pixel_values=x.numpy(), tokens=mocha_convnext_tokens(model, x).numpy(),
                  pre_logits=model.forward_head(features, pre_logits=True).numpy(),
                  logits=model(x).numpy())
  np.savez(os.path.join(folder, "reference.npz"), **arrays)


def mocha_encoders_fixture(folder: str) -> None:
  """A 4-layer SigLIP (`siglip/`) and `reference.npz`: one `pixel_values` batch and each encoder's
  features as MoCHA takes them: CLIP hidden_states[-2][:, 1:]; SigLIP with its last layer
  deleted, hidden_states[-2][:, 1:]; DINOv2 x_prenorm (= HF hidden_states[-1])[:, 1:]; ConvNeXt
  last-stage tokens, channels average-pooled by 3. Needs the hf_clip, hf_dinov2 and
  timm_convnext fixtures."""
  siglip = perturbed(tf.SiglipVisionModel(tf.SiglipVisionConfig(
      intermediate_size=64, **{**TINY, "num_hidden_layers": 4})))
  siglip.save_pretrained(os.path.join(folder, "siglip"))
  del siglip.encoder.layers[-1:]  # as MoCHA's SigLipVisionModel.__init__ (its vision_model)
  x = torch.from_numpy(pixels())
  clip = tf.CLIPVisionModel.from_pretrained(os.path.join(OUT, "hf_clip")).eval()
  dinov2 = tf.Dinov2Model.from_pretrained(os.path.join(OUT, "hf_dinov2")).eval()
  convnext = timm.models.convnext.ConvNeXt(**TIMM_CONVNEXT_ARGS).eval()
  convnext.load_state_dict(safetensors.torch.load_file(
      os.path.join(OUT, "timm_convnext", "model.safetensors")))
  with torch.no_grad():
    hidden = lambda m: m(pixel_values=x, output_hidden_states=True).hidden_states
    arrays = dict(pixel_values=x.numpy(), clip=hidden(clip)[-2][:, 1:].numpy(),
                  siglip=hidden(siglip)[-2][:, 1:].numpy(),
                  dinov2=hidden(dinov2)[-1][:, 1:].numpy(),
                  convnext=torch.nn.AvgPool1d(CONVNEXT_POOL, CONVNEXT_POOL)(
                      mocha_convnext_tokens(convnext, x)).numpy())
  np.savez(os.path.join(folder, "reference.npz"), **arrays)


def posemb_resize_fixture(folder: str) -> None:
  """`posemb_resize.npz`: a random 4x4 position-embedding grid [1, D, 4, 4] resized by torch's
  bicubic `interpolate` as MoCHA's encoders do it: SigLIP `size=(n, n)`, DINOv2 (torch hub)
  `scale_factor=(n + 0.1) / 4`; both align_corners=False, no antialias; n = 3 and 6."""
  os.makedirs(folder)
  grid = torch.from_numpy(np.random.default_rng(2).normal(0, 1, (1, 5, 4, 4)).astype(np.float32))
  arrays = dict(grid=grid.numpy())
  for n in (3, 6):
    size = torch.nn.functional.interpolate(grid, size=(n, n), mode="bicubic", align_corners=False)
    offset = torch.nn.functional.interpolate(grid, scale_factor=((n + 0.1) / 4, (n + 0.1) / 4),
                                             mode="bicubic", antialias=False)
    arrays.update({f"size_{n}": size.numpy(), f"offset_{n}": offset.numpy()})
  np.savez(os.path.join(folder, "posemb_resize.npz"), **arrays)


def main(names: list[str]) -> None:
  builders = {name: lambda folder, n=name, m=m, k=k: hf_fixture(n, m, k)
              for name, (m, k) in HF_MODELS.items()}
  builders.update({f"big_vision_{layout}": lambda folder, l=layout: npz_fixture(l)
                   for layout in ("augreg", "siglip")})
  builders.update(timm_convnext=timm_convnext_fixture, mocha_encoders=mocha_encoders_fixture,
                  mocha_posemb=posemb_resize_fixture)
  unknown = sorted(set(names) - set(builders))
  if unknown:
    raise SystemExit(f"unknown fixture {unknown[0]!r}; known: {sorted(builders)}")
  for name, build in builders.items():
    if names and name not in names:
      continue
    torch.manual_seed(0)
    folder = os.path.join(OUT, name)
    shutil.rmtree(folder, ignore_errors=True)
    build(folder)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(f"{name}: {sorted(os.listdir(folder))}, {size / 1024:.0f} KB")


if __name__ == "__main__":
  main(sys.argv[1:])
