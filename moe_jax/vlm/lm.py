"""What every decoder LM shares: the config node of the pretrained families (Phi, LLaMA), the
MoE node of their optional MoE MLPs, and the `CausalLM` base class (the interface of
`moe_jax.vlm.generation` and MoCHA).

`decoder(visual [B, P, D], tokens [B, L], image_pos [B] | None) -> logits [B, L, V]` (float32):
the text with the P visual tokens spliced in before text token `image_pos[b]` (None: before all
the text, a visual prefix), under a causal mask; the logits at text token i's place predict the
next element of the sequence (HF's convention). `decoder.target_logits(...)` instead gives, for
each text token i, the logits that predict it (from the element before it: the last visual
token for i = image_pos), which is what a loss over the text needs.

Splicing is the reference's (LLaVA `prepare_inputs_labels_for_multimodal`): text before the
image, the image's features, text after, positions 0 .. P + L - 1 over the whole sequence; with
static shapes it is a gather with per-row offsets (`splice`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moe_jax import moe
from moe_jax.models import remat, stacked, vimoe
from moe_jax.parallel.grad_precision import Embed
from moe_jax.vlm import attention

DTYPES = ("float32", "bfloat16")


def moe_node(mlp_dim: int, dtype_ref) -> ml_collections.ConfigDict:
  """The `moe` node of a decoder's MoE MLPs (`moe_layers`): dropless, since with capacity drops
  whether a token is dropped depends on the tokens after it, which breaks causality (and makes
  generation differ from training). `moe.dtype` follows the decoder's `dtype` until set."""
  c = moe.default_config("top_k")
  c.hidden_dim = mlp_dim
  c.dispatch = "dropless"
  c.dtype = dtype_ref.identity()
  return c


def lm_config(name: str, *, width: int, depth: int, mlp_dim: int, num_heads: int,
              num_kv_heads: int, vocab_size: int, max_len: int, rotary_fraction: float,
              rope_theta: float, norm_eps: float, tie_embeddings: bool, head_dim: int = 0,
              moe_layers: str = "", checkpoint: str = "") -> ml_collections.ConfigDict:
  """The decoder node of a pretrained-LM family `name` ('phi', 'llama').

  `checkpoint`: an HF directory whose weights a fresh MoCHA run loads (`moe_jax.vlm.pretrained`;
  "" = random init);
  `head_dim` 0 = width / num_heads; `rotary_fraction` of each head's dims carry the rotary
  embedding (HF `partial_rotary_factor`); `max_len`: the longest sequence (visual + text) a run
  may feed, at most the checkpoint's HF `max_position_embeddings` unless
  `extrapolate_positions`: then rotary angles are computed for positions the checkpoint never
  saw, as HF's rotary embeddings (and the MoCHA reference's Phi, trained at model_max_length 2560
  on Phi-2's 2048) recompute their cos / sin cache for longer inputs; `dtype` computes,
  `param_dtype` stores the weights ('float32' or 'bfloat16');
  `remat_policy` rematerialises each block in training (`moe_jax.models.remat.POLICIES`; 'full'
  keeps only the blocks' inputs, as HF's `gradient_checkpointing`); `scan_layers` builds the
  blocks once, stacked on a leading layer axis, and runs them with one `jax.lax.scan`
  (`moe_jax.models.stacked`; the same function, parameters `blocks/stacked/...`; dense blocks
  only: refused with `moe_layers`). The KV cache is then stacked per layer too.
  """
  c = ml_collections.ConfigDict(dict(
      name=name, width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
      num_kv_heads=num_kv_heads, head_dim=head_dim, vocab_size=vocab_size, max_len=max_len,
      rotary_fraction=rotary_fraction, rope_theta=rope_theta, norm_eps=norm_eps,
      tie_embeddings=tie_embeddings, dtype="float32", param_dtype="float32",
      remat_policy="none", scan_layers=False, moe_layers=moe_layers, checkpoint=checkpoint,
      extrapolate_positions=False))
  c.moe = moe_node(mlp_dim, c.get_ref("dtype"))
  return c


def resolved(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`c` checked (ValueError naming the field) with `head_dim` and `rotary_dims` filled in."""
  f = "model.decoder."
  head_dim = c.head_dim or c.width // max(c.num_heads, 1)
  if not c.head_dim and c.width % c.num_heads:
    raise ValueError(f"{f}width={c.width} must be divisible by {f}num_heads={c.num_heads} "
                     f"(or set {f}head_dim)")
  if c.num_kv_heads < 1 or c.num_heads % c.num_kv_heads:
    raise ValueError(f"{f}num_heads={c.num_heads} must be a multiple of "
                     f"{f}num_kv_heads={c.num_kv_heads}")
  rotary_dims = int(head_dim * c.rotary_fraction)
  if not 0.0 <= c.rotary_fraction <= 1.0 or rotary_dims % 2:
    raise ValueError(f"{f}rotary_fraction={c.rotary_fraction} must be in [0, 1] and give an "
                     f"even number of the head's {head_dim} dims (got {rotary_dims})")
  for field in ("dtype", "param_dtype"):
    if c[field] not in DTYPES:
      raise ValueError(f"{f}{field}={c[field]!r}: use one of {DTYPES}")
  remat.validate(c.remat_policy, f"{f}remat_policy")
  if c.scan_layers and c.moe_layers:
    raise ValueError(f"{f}scan_layers=True needs identical blocks, but {f}moe_layers="
                     f"{c.moe_layers!r} makes some MoE: set {f}moe_layers='' or "
                     f"{f}scan_layers=False")
  out = ml_collections.ConfigDict(c.to_dict())
  out.head_dim, out.rotary_dims = head_dim, rotary_dims
  return out


def moe_mlps(c: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> list[nnx.Module | None]:
  """Per block: a `moe.MoELayer` where `c.moe_layers` says so, else None (the dense MLP)."""
  ids = vimoe.moe_layer_indices(c.moe_layers, c.depth) if c.moe_layers else []
  return [moe.MoELayer(c.width, c.moe, rngs=rngs) if i in ids else None for i in range(c.depth)]


def run_blocks(blocks, x: jax.Array, positions: jax.Array, cache, final_norm: nnx.Module,
               remat_policy: str = "none", block_fn: Callable[..., Any] = remat.call_module):
  """(`final_norm` of `x [B, T, D]` through `blocks`, the new cache or None without one):
  `block_fn(block, x, positions, layer_cache) -> (x, layer_cache)` (default `block(x,
  positions, layer_cache)`) per block, each rematerialised under `remat_policy`. `blocks` is an
  `nnx.List` with `cache` a list of `attention.LayerCache`, or a `stacked.Stacked` run by one
  scan with `cache` one `LayerCache` of `[depth, B, S, Hkv, Dh]` arrays. Each block's input
  is constrained to the batch sharding of the current mesh (`attention.shard_batch`): FSDP
  all-gathers the weights to the batch-sharded tokens instead of spreading the tokens over the
  weights' shards and reducing the partial products."""
  if isinstance(blocks, stacked.Stacked):  # each layer's input batch-sharded by the scan
    layer = lambda block, x, layer_cache: block_fn(block, x, positions, layer_cache)
    x, new_cache = blocks.scan(layer, x, cache, policy=remat_policy)
    return final_norm(attention.shard_batch(x)), new_cache
  new_cache = []
  for i, block in enumerate(blocks):
    x, layer_cache = remat.call(block, remat_policy, attention.shard_batch(x), positions,
                                None if cache is None else cache[i], fn=block_fn)
    new_cache.append(layer_cache)
  return final_norm(attention.shard_batch(x)), None if cache is None else new_cache


class CausalLM(nnx.Module):
  """Base of the decoders. Subclasses set `embed` (an `nnx.Embed`), `blocks`, `norm`,
  `max_len`, `dtype`, `num_kv_heads`, `head_dim`, `remat_policy` (`init_trunk` does all but
  `norm` for blocks built `block(c, mlp, rngs=...)`) and define `logits`."""

  def init_trunk(self, c: ml_collections.ConfigDict, block: type[nnx.Module], *,
                 rngs: nnx.Rngs) -> ml_collections.ConfigDict:
    """Sets the embedding, the blocks and the sizes from `c`; returns `resolved(c)`."""
    c = resolved(c)
    self.max_len, self.dtype = c.max_len, jnp.dtype(c.dtype)
    self.num_kv_heads, self.head_dim = c.num_kv_heads, c.head_dim
    self.remat_policy = c.remat_policy
    self.embed = Embed(c.vocab_size, c.width, dtype=self.dtype,
                       param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)
    if c.scan_layers:
      self.blocks = stacked.Stacked(lambda r: block(c, None, rngs=r), c.depth, rngs=rngs)
    else:
      self.blocks = nnx.List([block(c, mlp, rngs=rngs) for mlp in moe_mlps(c, rngs=rngs)])
    return c

  def forward(self, x: jax.Array, positions: jax.Array, cache):
    """Final hidden states `[B, T, D]` of the embedded tokens `x [B, T, D]` at `positions
    [B, T]`, and the cache (`init_cache`'s layout) with their keys / values written (see
    `moe_jax.vlm.attention`)."""
    return run_blocks(self.blocks, x, positions, cache, self.norm, self.remat_policy)

  def logits(self, h: jax.Array) -> jax.Array:
    """float32 next-token logits `[..., V]` of final hidden states `h [..., D]`."""
    raise NotImplementedError

  def init_cache(self, batch: int, length: int):
    """An empty KV cache of `length` slots (positions 0 .. length - 1): a list of one
    `attention.LayerCache` per block, or with scanned blocks one `LayerCache` whose arrays
    `[depth, B, S, Hkv, Dh]` stack the layers (the batch sharded as each layer's)."""
    if length > self.max_len:
      raise ValueError(f"model.decoder.max_len={self.max_len} < {length} positions to cache")
    layer = lambda: attention.init_cache(1, batch, length, self.num_kv_heads, self.head_dim,
                                         self.dtype)[0]
    if isinstance(self.blocks, stacked.Stacked):
      return jax.vmap(lambda _: layer(), axis_size=len(self.blocks))(None)
    return [layer() for _ in self.blocks]

  def embed_sequence(self, visual: jax.Array, tokens: jax.Array,
                     image_pos: jax.Array | None = None) -> jax.Array:
    """`[B, P + L, D]` in `dtype`: the embedded `tokens [B, L]` with `visual [B, P, D]` spliced in
    before text token `image_pos[b]` (`splice`; None: before all the text)."""
    P, L = visual.shape[1], tokens.shape[1]
    if P + L > self.max_len:
      raise ValueError(f"model.decoder.max_len={self.max_len} < {P} visual + {L} text tokens")
    # Batch-sharded embeddings and logits (`attention.shard_batch`): with the vocabulary-sharded
    # table and head of the FSDP rules, XLA otherwise gathers the whole batch there and
    # all-reduces [B, L, D] embeddings and [B, L, V] logit-sized tensors on every device.
    embedded = attention.shard_batch(self.embed(tokens))
    return splice(visual.astype(self.dtype), embedded, image_pos)

  def logits_at(self, visual: jax.Array, tokens: jax.Array, image_pos: jax.Array | None,
                positions: jax.Array) -> jax.Array:
    """float32 logits `[B, N, V]` at sequence `positions [B, N]` of the spliced sequence (each
    predicts the element after it), the whole sequence run once."""
    x = self.embed_sequence(visual, tokens, image_pos)
    B, T, _ = x.shape
    h = self.forward(x, jnp.broadcast_to(jnp.arange(T), (B, T)), None)[0]
    return attention.shard_batch(
        self.logits(jnp.take_along_axis(h, positions[..., None], axis=1)))

  def __call__(self, visual: jax.Array, tokens: jax.Array,
               image_pos: jax.Array | None = None) -> jax.Array:
    """`[B, L, V]`: at each text token's place, the logits of the next element (HF's)."""
    where = text_positions(visual.shape[1], tokens.shape[1], image_pos, tokens.shape[0])
    return self.logits_at(visual, tokens, image_pos, where)

  def target_logits(self, visual: jax.Array, tokens: jax.Array,
                    image_pos: jax.Array | None = None) -> jax.Array:
    """`[B, L, V]`: row i holds the logits that predict text token i (those of the element
    before it; for i = image_pos the last visual token's). Row 0 predicts nothing unless the
    visual tokens come first (image_pos 0, P > 0): a loss must mask it."""
    where = text_positions(visual.shape[1], tokens.shape[1], image_pos, tokens.shape[0])
    return self.logits_at(visual, tokens, image_pos, jnp.maximum(where - 1, 0))


def text_positions(num_visual: int, length: int, image_pos: jax.Array | None,
                   batch: int) -> jax.Array:
  """`[B, L]` int32: the sequence position of each text token when `num_visual` (P) visual tokens
  sit before text token `image_pos[b]`: i before it, i + P from it on (None: all after)."""
  i = jnp.arange(length, dtype=jnp.int32)[None]
  if image_pos is None:
    return jnp.broadcast_to(i + num_visual, (batch, length))
  return i + num_visual * (i >= image_pos[:, None]).astype(jnp.int32)


def splice(visual: jax.Array, text: jax.Array, image_pos: jax.Array | None) -> jax.Array:
  """`[B, P + L, D]`: per row, `text[:image_pos]`, `visual [B, P, D]`, `text[image_pos:]` (`text
  [B, L, D]`; `image_pos [B]` in 0 .. L; None: visual first), as the reference's
  `prepare_inputs_labels_for_multimodal` concatenates, with static shapes (a gather)."""
  if image_pos is None:
    return jnp.concatenate([visual, text], axis=1)
  (B, P), L = visual.shape[:2], text.shape[1]
  if P == 0:
    return text
  j = jnp.arange(P + L)[None]
  start = image_pos[:, None]
  is_visual = (j >= start) & (j < start + P)
  gather = lambda x, index: jnp.take_along_axis(
      x, jnp.broadcast_to(index, (B, P + L))[..., None], axis=1)
  from_text = gather(text, jnp.clip(jnp.where(j < start, j, j - P), 0, L - 1))
  from_visual = gather(visual, jnp.clip(j - start, 0, P - 1))
  return jnp.where(is_visual[..., None], from_visual, from_text)
