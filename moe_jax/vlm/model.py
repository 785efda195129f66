"""MoCHA (Pang et al. 2025): several vision encoders, one sparse MoE connector per encoder,
Hierarchical Group Attention over the connectors' tokens, and a decoder LM.

`model(inputs, tokens) -> logits [B, L, V]`: row i predicts text token i
(`moe_jax.vlm.lm.CausalLM.target_logits`); `inputs` is the batch dict (`image [B, H, W, C]`,
`features/<name> [B, T_i, D_i]` for precomputed encoders, optionally `image_pos int32 [B]`: the
text token the visual tokens go before, as the reference splices them at `<image>`; without it
they go before all the text), `tokens [B, L]` the text.
`model.encode(inputs) -> [B, P, H]` is the fused visual tokens (P = sum_i T_i) alone.
Encoders run in the order `model.encoder_order` (the order of the dict given to `mocha_config`;
the reference's is SigLIP, ConvNeXt, CLIP, DINOv2); their token groups are concatenated in it,
and HGA's group indices and the parameter paths `encoders/<i>`, `connectors/<i>` follow it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moe_jax.registry import Registry
from moe_jax.vlm import connector, encoders, generation, hga

# Stage -> parameter groups the optimizer updates (the rest is frozen by an optax mask).
STAGES = {"stage1": ("connectors", "hga"), "stage2": ("connectors", "hga", "decoder")}


def mocha_config(decoder: ml_collections.ConfigDict,
                 encoder_configs: dict[str, ml_collections.ConfigDict], *, image_size: int,
                 channels: int) -> ml_collections.ConfigDict:
  """The `model` node: encoders by name (run in the dict's order), the paper's connector and HGA,
  the given decoder."""
  c = ml_collections.ConfigDict(dict(name="mocha", image_size=image_size, channels=channels))
  c.encoders = ml_collections.ConfigDict(encoder_configs)
  c.encoder_order = tuple(encoder_configs)
  c.connector = connector.connector_config(decoder.width)
  c.hga = hga.hga_config()
  c.decoder = decoder
  return c


def trainable_pattern(config: ml_collections.ConfigDict, stage: str) -> str:
  """Regex over parameter paths of what `stage` trains: its groups plus the encoders marked
  trainable (in any stage)."""
  if stage not in STAGES:
    raise ValueError(f"stage={stage!r} is unknown; use one of {sorted(STAGES)}")
  encoder_list = [config.encoders[n] for n in encoders.encoder_order(config)]
  groups = list(STAGES[stage]) + [f"encoders/{i}" for i, e in enumerate(encoder_list)
                                  if e.trainable and e.kind != "features"]
  return "^(" + "|".join(groups) + ")/"


DECODERS = Registry("model.decoder.name", {"transformer": "moe_jax.vlm.decoder:Decoder",
                                          "phi": "moe_jax.vlm.phi:Phi",
                                          "llama": "moe_jax.vlm.llama:Llama"},
                    allow_paths=True)


def build_decoder(c: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
  """The decoder of `c.name` ('transformer', 'phi', 'llama' or any 'package.module:Class' of a
  `moe_jax.vlm.lm.CausalLM`), built (c, rngs)."""
  return DECODERS.get(c.name)(c, rngs=rngs)


class MoCHA(nnx.Module):
  """Vision-language model; see the module docstring."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    if not config.encoders:
      raise ValueError("model.encoders is empty; MoCHA needs at least one encoder")
    names = encoders.encoder_order(config)
    width = config.decoder.width
    self.encoders = nnx.List([
        encoders.Encoder(n, config.encoders[n], image_size=config.image_size,
                         channels=config.channels, rngs=rngs) for n in names])
    self.connectors = nnx.List([connector.MoEConnector(e.dim, width, config.connector, rngs=rngs)
                                for e in self.encoders])
    self.group_sizes = tuple(e.num_tokens for e in self.encoders)
    self.hga = hga.build_hga(width, config.hga, rngs=rngs)
    self.decoder = build_decoder(config.decoder, rngs=rngs)

  def encode(self, inputs: dict[str, jax.Array]) -> jax.Array:
    """The fused visual tokens `[B, P, H]`."""
    x = jnp.concatenate([c(e(inputs)) for e, c in zip(self.encoders, self.connectors)], axis=1)
    if self.hga is not None:
      x = self.hga(x, hga.group_ids(self.group_sizes))
    return x

  def __call__(self, inputs: dict[str, jax.Array], tokens: jax.Array) -> jax.Array:
    return self.decoder.target_logits(self.encode(inputs), tokens, inputs.get("image_pos"))


def generate(model: MoCHA, inputs: dict[str, jax.Array], tokens: jax.Array,
             prompt_len: jax.Array, steps: int, **sampling) -> jax.Array:
  """`[B, steps]` tokens after each row's prompt `tokens[b, :prompt_len[b]]` with the visual
  tokens of `inputs` spliced in at `inputs["image_pos"]` (if given, else before the text),
  through the decoder's KV cache (`moe_jax.vlm.generation.generate`, whose keywords `sampling`
  takes: eos_id, pad_id, temperature, top_p, rng; greedy by default)."""
  return generation.generate(model.decoder, model.encode(inputs), tokens, prompt_len, steps,
                             image_pos=inputs.get("image_pos"), **sampling)
