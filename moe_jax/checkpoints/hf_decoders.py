"""Hugging Face `PhiForCausalLM` and `LlamaForCausalLM` checkpoints -> our `moe_jax.vlm.phi.Phi`
and `moe_jax.vlm.llama.Llama`.

`config.json` gives the config (both the transformers 5 `rope_parameters` dict and the older
top-level `rope_theta` / `partial_rotary_factor`); the safetensors (one file or a sharded index)
give every parameter, torch linear `[out, in]` -> our kernel `[in, out]`. Every checkpoint key
must fill one parameter and every parameter must come from a key (`rules.apply_rules`: a one-line
CheckpointMismatch otherwise). A tied LLaMA head has no `lm_head.weight`; ours then reuses the
embedding. The imported config is dense (`moe_layers=''`): MoE MLPs from dense ones are
upcycling (`moe_jax.checkpoints.init_from`).
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moe_jax.checkpoints import layout, tree
from moe_jax.checkpoints.hf import read_safetensors
from moe_jax.checkpoints.rules import ImportReport, Rule, Shape, apply_rules
from moe_jax.checkpoints.tree import CheckpointMismatch
from moe_jax.vlm import llama, lm, model, phi

# config.json hidden_act our MLPs compute, per model_type.
ACTIVATIONS = {"phi": ("gelu_new", "gelu_pytorch_tanh"), "llama": ("silu",)}


def _rope(hf: dict) -> tuple[float, float]:
  """(rope_theta, partial_rotary_factor) of `hf`; only HF's 'default' rope type."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = hf.get("rope_scaling") or {}
  rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if rope_type != "default":
    raise CheckpointMismatch(f"config.json rope type {rope_type!r}: only 'default' is supported")
  theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
  return float(theta), float(params.get("partial_rotary_factor",
                                        hf.get("partial_rotary_factor", 1.0)))


def decoder_config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  """Our decoder node for an HF `config.json` dict (model_type 'phi' or 'llama')."""
  kind = hf.get("model_type")
  if kind not in ACTIVATIONS:
    raise CheckpointMismatch(f"config.json model_type={kind!r}: supported {sorted(ACTIVATIONS)}")
  if hf.get("hidden_act") not in ACTIVATIONS[kind]:
    raise CheckpointMismatch(f"config.json hidden_act={hf.get('hidden_act')!r}: {kind} supports "
                             f"{ACTIVATIONS[kind]}")
  unsupported = {"phi": (("qk_layernorm", False), ("tie_word_embeddings", False)),
                 "llama": (("attention_bias", False), ("mlp_bias", False),
                           ("pretraining_tp", 1))}[kind]
  for field, ok in unsupported:
    if hf.get(field, ok) != ok:
      raise CheckpointMismatch(f"config.json {field}={hf[field]} is not supported (only {ok})")
  theta, fraction = _rope(hf)
  sizes = dict(width=hf["hidden_size"], depth=hf["num_hidden_layers"],
               mlp_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
               num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
               vocab_size=hf["vocab_size"], max_len=hf["max_position_embeddings"],
               rope_theta=theta)
  if kind == "phi":
    c = phi.phi_config(rotary_fraction=fraction, norm_eps=hf["layer_norm_eps"], **sizes)
  else:
    if fraction != 1.0:
      raise CheckpointMismatch(f"config.json partial_rotary_factor={fraction}: llama rotates "
                               "whole heads")
    c = llama.llama_config(norm_eps=hf["rms_norm_eps"],
                           tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **sizes)
  if hf.get("head_dim"):
    c.head_dim = hf["head_dim"]
  return c


def _linear(target: str, key: str, bias: bool) -> list[Rule]:
  rules = [Rule(f"{target}/kernel", (f"{key}.weight",), lambda s: ((s[1], s[0]),),
                lambda w: w.T)]
  if bias:
    rules.append(Rule(f"{target}/bias", (f"{key}.bias",), lambda s: (s,), np.asarray))
  return rules


def _norm(target: str, key: str, bias: bool) -> list[Rule]:
  rules = [Rule(f"{target}/scale", (f"{key}.weight",), lambda s: (s,), np.asarray)]
  if bias:
    rules.append(Rule(f"{target}/bias", (f"{key}.bias",), lambda s: (s,), np.asarray))
  return rules


def _rules(c: ml_collections.ConfigDict) -> list[Rule]:
  """Every parameter of our decoder of config `c` from the keys of the HF checkpoint."""
  is_phi = c.name == "phi"
  rules = [Rule("embed/embedding", ("model.embed_tokens.weight",), lambda s: (s,), np.asarray),
           *_norm("norm", "model.final_layernorm" if is_phi else "model.norm", is_phi)]
  if not c.tie_embeddings:
    rules += _linear("head", "lm_head", bias=is_phi)
  attn_out = "dense" if is_phi else "o_proj"
  for i in range(c.depth):
    ours, theirs = f"blocks/{i}", f"model.layers.{i}"
    for mine, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                          ("out", attn_out)):
      rules += _linear(f"{ours}/attn/{mine}", f"{theirs}.self_attn.{hf_name}", bias=is_phi)
    if is_phi:
      rules += [*_norm(f"{ours}/norm", f"{theirs}.input_layernorm", True),
                *_linear(f"{ours}/mlp/fc1", f"{theirs}.mlp.fc1", True),
                *_linear(f"{ours}/mlp/fc2", f"{theirs}.mlp.fc2", True)]
    else:
      rules += [*_norm(f"{ours}/norm1", f"{theirs}.input_layernorm", False),
                *_norm(f"{ours}/norm2", f"{theirs}.post_attention_layernorm", False),
                *[r for mine, hf_name in (("gate", "gate_proj"), ("up", "up_proj"),
                                          ("down", "down_proj"))
                  for r in _linear(f"{ours}/mlp/{mine}", f"{theirs}.mlp.{hf_name}", False)]]
  return rules


def decoder_param_shapes(c: ml_collections.ConfigDict) -> dict[str, Shape]:
  """Flat `{path: shape}` of the decoder `c` builds (no allocation)."""
  decoder = nnx.eval_shape(lambda: model.build_decoder(c, rngs=nnx.Rngs(0)))
  state = nnx.to_pure_dict(nnx.state(decoder, nnx.Param))
  return {k: tuple(v.shape) for k, v in tree.flatten(state).items()}


def read_decoder_config(path: str) -> ml_collections.ConfigDict:
  """Our decoder config of the HF checkpoint directory `path` (its `config.json` only)."""
  with open(os.path.join(path, "config.json")) as f:
    return decoder_config_from_hf(json.load(f))


def import_hf_decoder(path: str) -> tuple[ml_collections.ConfigDict, dict[str, np.ndarray],
                                          ImportReport]:
  """(our decoder config, flat float32 parameters, report) of the HF checkpoint directory
  `path` (`config.json` + safetensors)."""
  config = read_decoder_config(path)
  shapes = decoder_param_shapes(config)
  params, report = apply_rules(_rules(config), read_safetensors(path), shapes, {}, path)
  return config, params, report


def load_hf_decoder(path: str, *, dtype: str = "float32", param_dtype: str = "float32",
                    scan_layers: bool = False
                    ) -> tuple[lm.CausalLM, ml_collections.ConfigDict, ImportReport]:
  """(decoder with the weights of `path`, its config, report); `dtype` computes, the weights
  are stored as `param_dtype` ('float32' or 'bfloat16'); `scan_layers` stacks the blocks
  (`moe_jax.checkpoints.layout`)."""
  config, params, report = import_hf_decoder(path)
  config.dtype, config.param_dtype, config.scan_layers = dtype, param_dtype, scan_layers
  lm.resolved(config)  # checks the dtypes
  decoder = nnx.eval_shape(lambda: model.build_decoder(config, rngs=nnx.Rngs(0)))
  state = nnx.state(decoder, nnx.Param)
  shapes = {k: v.shape for k, v in tree.flatten(nnx.to_pure_dict(state)).items()}
  params = layout.to_layout(params, shapes, path)
  nnx.replace_by_pure_dict(state, tree.unflatten(
      {k: jnp.asarray(v, jnp.dtype(param_dtype)) for k, v in params.items()}))
  nnx.update(decoder, state)
  return decoder, config, report
