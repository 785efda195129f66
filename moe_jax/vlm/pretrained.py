"""MoCHA's pretrained weights for a fresh run: each encoder's `model.encoders.<name>.checkpoint`
(any format `moe_jax.checkpoints.importers` reads) and the decoder's `model.decoder.checkpoint`
(an HF Phi / LLaMA directory, `moe_jax.checkpoints.hf_decoders`; "" = none) into MoCHA's
initialised parameter state.

Every checkpoint parameter must fill one of its component's parameters with the same shape, and
every parameter of a component with a checkpoint must come from it; a checkpoint that computes
another function than its component's config (`importers.check_architecture` for encoders,
`DECODER_FIELDS` for the decoder) is a one-line CheckpointMismatch naming the field. SigLIP's
and DINOv2's position embeddings are resized to `model.image_size`'s grid first
(`encoders.resize_posemb_bicubic`). Checkpoints come in the per-layer layout and are stacked
for components built with `scan_layers` (`moe_jax.checkpoints.layout`). The trainer calls
`with_checkpoints` for a fresh MoCHA run; a later stage started with `init_from` takes every
parameter from its source run instead (in either layout).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moe_jax.checkpoints import hf_decoders, importers, layout, tree
from moe_jax.checkpoints.tree import CheckpointMismatch
from moe_jax.vlm import encoders, lm

# Decoder fields (after `lm.resolved`) that change the function while the parameter shapes stay.
DECODER_FIELDS = ("name", "num_heads", "num_kv_heads", "head_dim", "rotary_fraction",
                  "rope_theta", "norm_eps", "tie_embeddings")


def components(model_config: ml_collections.ConfigDict) -> list[tuple[str, str, str]]:
  """(config field, its parameter prefix in MoCHA, checkpoint path) of each component with a
  checkpoint: encoders (`encoders/{i}/backbone/`, i its place in `model.encoder_order`), then
  the decoder (`decoder/`)."""
  out = []
  for i, name in enumerate(encoders.encoder_order(model_config)):
    c = model_config.encoders[name]
    if c.kind in encoders.REFERENCE_FEATURES and c.checkpoint:
      out.append((f"model.encoders.{name}", f"encoders/{i}/backbone/", c.checkpoint))
  if model_config.decoder.get("checkpoint"):
    out.append(("model.decoder", "decoder/", model_config.decoder.checkpoint))
  return out


def _check_decoder(ours: ml_collections.ConfigDict, theirs: ml_collections.ConfigDict,
                   source: str) -> None:
  ours, theirs = lm.resolved(ours), lm.resolved(theirs)
  for field in DECODER_FIELDS:
    if ours[field] != theirs[field]:
      raise CheckpointMismatch(f"{source}: model.decoder.{field}={ours[field]} but the "
                               f"checkpoint needs {theirs[field]}")
  if ours.max_len > theirs.max_len and not ours.get("extrapolate_positions"):
    raise CheckpointMismatch(f"{source}: model.decoder.max_len={ours.max_len} exceeds the "
                             f"checkpoint's max_position_embeddings={theirs.max_len} (positions "
                             f"it never saw); set model.decoder.max_len <= {theirs.max_len}, or "
                             "model.decoder.extrapolate_positions=True to run its rotary "
                             "embedding past them (as HF and the MoCHA reference do)")


def check_decoder_config(model_config: ml_collections.ConfigDict) -> None:
  """CheckpointMismatch, before anything is built, when `model.decoder` computes another
  function than its checkpoint's `config.json` says (`DECODER_FIELDS`) or reaches past its
  `max_position_embeddings` (`model.decoder.max_len`) without `extrapolate_positions`. Only `config.json` is read, and only
  where it exists: an AOT compile needs no checkpoint, and a run reads the whole checkpoint
  when it starts (`checkpoint_params`), failing there if it is absent."""
  path = model_config.decoder.get("checkpoint")
  if path and os.path.isfile(os.path.join(path, "config.json")):
    _check_decoder(model_config.decoder, hf_decoders.read_decoder_config(path),
                   f"model.decoder.checkpoint={path}")


def checkpoint_params(model_config: ml_collections.ConfigDict
                      ) -> dict[str, tuple[str, np.ndarray]]:
  """`{MoCHA parameter path: (source, float32 value)}` of every component with a checkpoint
  (source: '<field>.checkpoint=<path>'); CheckpointMismatch if a checkpoint computes another
  function than its component's config."""
  out = {}
  for field, prefix, path in components(model_config):
    source = f"{field}.checkpoint={path}"
    if field == "model.decoder":  # config.json checked before the weights are read
      _check_decoder(model_config.decoder, hf_decoders.read_decoder_config(path), source)
      _, params, _ = hf_decoders.import_hf_decoder(path)
    else:
      config, params, _ = importers.import_checkpoint(path)
      backbone = model_config.encoders[field.removeprefix("model.encoders.")].backbone
      importers.check_architecture(backbone, config, source)
    out.update({prefix + k: (source, v) for k, v in params.items()})
  return out


def with_checkpoints(params: nnx.State, model_config: ml_collections.ConfigDict) -> nnx.State:
  """MoCHA's parameter state `params` with each component's parameters from its checkpoint."""
  loaded = checkpoint_params(model_config)
  if not loaded:
    return params
  flat = tree.flatten(nnx.to_pure_dict(params))
  for field, prefix, path in components(model_config):
    is_decoder = prefix == "decoder/"
    what = "decoder" if is_decoder else "encoder"
    fix = ("set model.decoder to the checkpoint's config: hf_decoders.import_hf_decoder(path)[0]"
           if is_decoder else "set the encoder's backbone to the checkpoint's config")
    source = f"{field}.checkpoint={path}"
    values = layout.to_layout({k: v for k, (_, v) in loaded.items() if k.startswith(prefix)},
                              {k: v.shape for k, v in flat.items() if k.startswith(prefix)},
                              source)
    theirs = {k: (source, v) for k, v in values.items()}
    differ = sorted(theirs.keys() ^ {k for k in flat if k.startswith(prefix)})
    if differ:
      raise CheckpointMismatch(
          f"{field}: parameter {differ[0].removeprefix(prefix)} is in "
          f"{'the checkpoint' if differ[0] in theirs else 'the ' + what} only ({fix})")
    offset = None if is_decoder else encoders.POSEMB_OFFSET.get(
        model_config.encoders[field.removeprefix("model.encoders.")].kind)
    for k, (source, value) in sorted(theirs.items()):
      name = k.removeprefix(prefix)
      if name == "posemb" and value.shape != flat[k].shape and offset is not None:
        value = encoders.resize_posemb_bicubic(value, int(round(flat[k].shape[1] ** 0.5)), offset)
      if value.shape != flat[k].shape:
        raise CheckpointMismatch(
            f"{source}: {name} has shape {value.shape}, the {what}'s {tuple(flat[k].shape)} "
            f"({fix}{' and model.image_size to its image_size' if name == 'posemb' else ''})")
      flat[k] = jnp.asarray(value, flat[k].dtype)
  out = jax.tree.map(lambda x: x, params)
  nnx.replace_by_pure_dict(out, tree.unflatten(flat))
  return out
