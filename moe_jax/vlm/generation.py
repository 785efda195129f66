"""Text generation with a KV cache for any `moe_jax.vlm.lm.CausalLM`: one prefill over the
(visual prefix +) prompts, then one-token steps, greedy or sampled (temperature, top-p), stopping
at `<eos>`.

Prompts of different lengths share one right-padded `tokens [B, L]` array: row b's prompt is
`tokens[b, :prompt_len[b]]` with the P visual tokens spliced in before text token
`image_pos[b] <= prompt_len[b]` (`moe_jax.vlm.lm.splice`; None: before all the text). The
prefill writes all P + L positions into the cache; row b's first generated token comes from
position `P + prompt_len[b] - 1` (the last visual token when the prompt ends with the image),
and its i-th generated token is written at slot `P + prompt_len[b] + i`, over the padding,
before any query can see that slot (`moe_jax.vlm.attention`). So each row computes exactly what
a full recompute of its own sequence would.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.vlm import lm


def next_token(logits: jax.Array, key: jax.Array | None, temperature: float,
               top_p: float) -> jax.Array:
  """`[B]` int32 tokens from `logits [B, V]`: argmax if `temperature == 0`, else a sample of
  `softmax(logits / temperature)` restricted to the smallest set of most likely tokens whose
  probability reaches `top_p` (nucleus sampling, Holtzman et al. 2020; ties at the cut stay)."""
  if temperature < 0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if key is None:
    raise ValueError(f"temperature={temperature} > 0 samples: pass a PRNG key (rng=...)")
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1.0:
    ranked = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
    kept = jnp.sum(before < top_p, axis=-1)  # >= 1: the top token has 0 before it
    cut = jnp.take_along_axis(ranked, kept[:, None] - 1, axis=-1)
    logits = jnp.where(logits >= cut, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def step_key(rng: jax.Array | None, step: int | jax.Array) -> jax.Array | None:
  """The sampling key of generation step `step` (None when greedy)."""
  return None if rng is None else jax.random.fold_in(rng, step)


def _check(prompt_len: jax.Array, image_pos: jax.Array | None, steps: int, length: int,
           num_visual: int) -> None:
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1")
  if not isinstance(prompt_len, jax.core.Tracer):
    lengths = np.asarray(prompt_len)
    longest = int(lengths.max())
    if longest + steps - 1 > length or lengths.min() + num_visual < 1:
      raise ValueError(f"prompts of {longest} tokens + {steps} steps need tokens of length >= "
                       f"{longest + steps - 1} (got {length}), and every prompt (visual + "
                       "text) at least one token")
    if image_pos is not None and not isinstance(image_pos, jax.core.Tracer) and np.any(
        np.asarray(image_pos) > lengths):
      raise ValueError("image_pos must be <= prompt_len in every row: the image belongs to "
                       "the prompt")


def _choose(logits: jax.Array, i, done: jax.Array, *, eos_id, pad_id, temperature, top_p,
            rng) -> tuple[jax.Array, jax.Array]:
  """(token of step i `[B]`, rows ended `[B]`): `pad_id` for rows already ended."""
  nxt = jnp.where(done, pad_id, next_token(logits, step_key(rng, i), temperature, top_p))
  return nxt, done | (nxt == eos_id) if eos_id is not None else done


def generate(decoder: lm.CausalLM, prefix: jax.Array, tokens: jax.Array, prompt_len: jax.Array,
             steps: int, *, image_pos: jax.Array | None = None, eos_id: int | None = None,
             pad_id: int = 0, temperature: float = 0.0, top_p: float = 1.0,
             rng: jax.Array | None = None) -> jax.Array:
  """`[B, steps]` int32 tokens generated after each row's prompt `tokens[b, :prompt_len[b]]`
  with the visual tokens `prefix [B, P, D]` (P may be 0) spliced in before text token
  `image_pos[b]` (None: before all the text).

  `tokens [B, L]` must leave room: `prompt_len[b] + steps - 1 <= L` (checked when `prompt_len`
  is concrete). After a row emits `eos_id` it emits `pad_id`; the loop ends when every row has
  ended or after `steps`. Step i samples with `step_key(rng, i)`. The cache has P + L slots,
  sharded over the mesh's batch axes.
  """
  B, L = tokens.shape
  P = prefix.shape[1]
  _check(prompt_len, image_pos, steps, L, P)
  choose = functools.partial(_choose, eos_id=eos_id, pad_id=pad_id, temperature=temperature,
                             top_p=top_p, rng=rng)
  rows = jnp.arange(B)
  cache = decoder.init_cache(B, P + L)
  x = decoder.embed_sequence(prefix, tokens, image_pos)
  h, cache = decoder.forward(x, jnp.broadcast_to(jnp.arange(P + L), (B, P + L)), cache)
  first, done = choose(decoder.logits(h[rows, P + prompt_len - 1]), 0, jnp.zeros((B,), bool))
  out = jnp.full((B, steps), pad_id, jnp.int32).at[:, 0].set(first)
  graphdef, state = nnx.split(decoder)

  def body(carry):
    i, last, cache, out, done = carry
    model = nnx.merge(graphdef, state)
    position = (P + prompt_len + i - 1)[:, None]  # where `last` (the token of step i-1) goes
    h, cache = model.forward(model.embed(last[:, None]), position, cache)
    nxt, done = choose(model.logits(h[:, 0]), i, done)
    return i + 1, nxt, cache, out.at[:, i].set(nxt), done

  def cond(carry):
    i, *_, done = carry
    return (i < steps) & ~jnp.all(done)

  return jax.lax.while_loop(cond, body, (jnp.int32(1), first, cache, out, done))[3]


def generate_without_cache(decoder: lm.CausalLM, prefix: jax.Array, tokens: jax.Array,
                           prompt_len: jax.Array, steps: int, *,
                           image_pos: jax.Array | None = None, eos_id: int | None = None,
                           pad_id: int = 0, temperature: float = 0.0, top_p: float = 1.0,
                           rng: jax.Array | None = None) -> jax.Array:
  """The reference `generate` is tested and benchmarked against: the same tokens, from the
  whole spliced sequence run through the decoder at every step (no cache, all `steps`)."""
  B, L = tokens.shape
  P = prefix.shape[1]
  _check(prompt_len, image_pos, steps, L, P)
  choose = functools.partial(_choose, eos_id=eos_id, pad_id=pad_id, temperature=temperature,
                             top_p=top_p, rng=rng)
  rows = jnp.arange(B)
  graphdef, state = nnx.split(decoder)

  def body(i, carry):
    tokens, out, done = carry
    last = (P + prompt_len + i - 1)[:, None]  # the sequence position before the next token
    logits = nnx.merge(graphdef, state).logits_at(prefix, tokens, image_pos, last)[:, 0]
    nxt, done = choose(logits, i, done)
    return tokens.at[rows, prompt_len + i].set(nxt), out.at[:, i].set(nxt), done

  init = (tokens, jnp.full((B, steps), pad_id, jnp.int32), jnp.zeros((B,), bool))
  return jax.lax.fori_loop(0, steps, body, init)[1]
