"""Scan over layers (`scan_layers`, `moe_jax.models.stacked`).

Default run: HF fixtures (Phi, LLaMA, CLIP at its penultimate layer, ConvNeXt) imported into the
scanned layout give the fixtures' reference outputs; KV-cached generation on the stacked cache
equals the unscanned decoder's; a ViT read at an intermediate layer scans only the blocks it
needs; the stacked layer axis is never sharded and decays as its layers; init_from and the
layout conversion across layouts; non-identical blocks are one-line errors.
Slow (two to three compiles of a MoCHA train step each): with the same weights moved through
`moe_jax.checkpoints.layout`, scanned Phi / LLaMA decoders, a ViT read at an intermediate layer
and a ConvNeXt give the unscanned models' loss and gradients (rel <= 1e-6, f32), and the
scanned step sharded data=2 x fsdp=4 equals the unsharded one."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from moe_jax.checkpoints import hf_decoders, importers, init_from, layout, tree
from moe_jax.models import build_model, convnext, vit
from moe_jax.parallel import mesh as mesh_lib, sharding
from moe_jax.train import optim
from moe_jax.vlm import encoders, generation, llama, model, phi

DATA = os.path.join(os.path.dirname(__file__), "data")
B, L, VOCAB = 8, 6, 50


def mocha_config(decoder: ml_collections.ConfigDict, scan: bool) -> ml_collections.ConfigDict:
  """A tiny MoCHA (trainable encoders, no HGA): Phi gets a CLIP-style ViT (read at layer -2 of
  3) and a two-stage ConvNeXt; LLaMA a precomputed-features encoder."""
  if decoder.name == "phi":
    clip = vit.vit_config("Ti/4", width=32, depth=3, mlp_dim=64, num_heads=2, image_size=16,
                          num_classes=0, quick_gelu=True, pre_norm=True, patch_bias=False,
                          scan_layers=scan)
    net = convnext.convnext_config("T", widths=(8, 16), depths=(1, 2), image_size=16,
                                   num_classes=0, scan_layers=scan)
    encoder_nodes = {"clip": encoders.encoder_config("clip", backbone=clip, trainable=True),
                     "convnext": encoders.encoder_config("convnext", backbone=net,
                                                         trainable=True)}
  else:
    encoder_nodes = {"features": encoders.encoder_config("features", tokens=5, dim=12)}
  c = model.mocha_config(scanned(decoder) if scan else decoder, encoder_nodes, image_size=16,
                         channels=3)
  c.hga.kind = "none"
  return c


def decoder_config(name: str) -> ml_collections.ConfigDict:
  if name == "phi":
    return phi.phi_config(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=4,
                          vocab_size=VOCAB, max_len=32, rotary_fraction=0.5)
  return llama.llama_config(width=32, depth=3, mlp_dim=48, num_heads=4, num_kv_heads=2,
                            vocab_size=VOCAB, max_len=32)


def scanned(c: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
  """`c` with `scan_layers=True` and `changes`."""
  c = ml_collections.ConfigDict(c.to_dict())
  c.update(scan_layers=True, **changes)
  return c


def batch(seed: int = 0) -> tuple[dict[str, jax.Array], jax.Array]:
  rng = np.random.default_rng(seed)
  inputs = {"image": jnp.asarray(rng.normal(size=(B, 16, 16, 3)), jnp.float32),
            "features/features": jnp.asarray(rng.normal(size=(B, 5, 12)), jnp.float32)}
  return inputs, jnp.asarray(rng.integers(0, VOCAB, (B, L)), jnp.int32)


def flat_params(m: nnx.Module) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in tree.flatten(nnx.to_pure_dict(nnx.state(m, nnx.Param)))
          .items()}


def with_params(m: nnx.Module, flat: dict[str, np.ndarray]) -> nnx.Module:
  """`m` holding `flat` (any layer layout) in its own layout."""
  state = nnx.state(m, nnx.Param)
  shapes = {k: v.shape for k, v in tree.flatten(nnx.to_pure_dict(state)).items()}
  nnx.replace_by_pure_dict(state, tree.unflatten(layout.to_layout(flat, shapes, "test")))
  nnx.update(m, state)
  return m


def loss_and_grads(m: model.MoCHA, inputs, tokens) -> tuple[float, dict[str, np.ndarray]]:
  """Cross-entropy of the next text token and its gradients, in the per-layer layout."""
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)

  def loss_fn(params):
    logits = nnx.merge(graphdef, params, rest)(inputs, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  return float(loss), layout.unstack({k: np.asarray(v) for k, v in
                                      tree.flatten(nnx.to_pure_dict(grads)).items()})


def rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
  """Relative L2 distance of two gradient dicts over all their entries."""
  assert a.keys() == b.keys()
  num = sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a)
  return (num / sum(float(np.sum(b[k] ** 2)) for k in b)) ** 0.5


def abstract_params(c: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, abstract parameter state) of MoCHA `c`, built without allocating."""
  graphdef, params, _ = nnx.split(nnx.eval_shape(lambda: model.MoCHA(c, rngs=nnx.Rngs(0))),
                                  nnx.Param, ...)
  return graphdef, params


@pytest.fixture(scope="module")
def phi_pair():
  """(unscanned, scanned) tiny Phi MoCHAs with the same weights, and their loss / gradients."""
  inputs, tokens = batch()
  plain = model.MoCHA(mocha_config(decoder_config("phi"), False), rngs=nnx.Rngs(0))
  scan = with_params(model.MoCHA(mocha_config(decoder_config("phi"), True), rngs=nnx.Rngs(1)),
                     flat_params(plain))
  return plain, scan, loss_and_grads(plain, inputs, tokens), loss_and_grads(scan, inputs, tokens)


@pytest.mark.slow
def test_scanned_phi_vit_and_convnext_give_the_unscanned_loss_and_gradients(phi_pair):
  plain, scan, (loss, grads), (scan_loss, scan_grads) = phi_pair
  flat = flat_params(scan)
  assert flat["decoder/blocks/stacked/attn/query/kernel"].shape == (2, 32, 32)
  assert flat["encoders/0/backbone/blocks/stacked/mlp/fc1/kernel"].shape == (3, 32, 64)
  assert flat["encoders/1/backbone/stages/1/blocks/stacked/dwconv/kernel"].shape == (2, 7, 7, 1,
                                                                                     16)
  assert layout.unstack(flat).keys() == flat_params(plain).keys()
  assert abs(scan_loss - loss) <= 1e-6 * abs(loss)
  assert rel(scan_grads, grads) <= 1e-6
  # CLIP's layer -2 of 3: the third block is not run (zero gradient) in either layout.
  assert not np.any(grads["encoders/0/backbone/blocks/2/mlp/fc1/kernel"])
  assert np.any(grads["encoders/0/backbone/blocks/1/mlp/fc1/kernel"])


def test_scanned_vit_runs_only_the_blocks_its_layer_needs():
  """CLIP's layer -2 of 3 blocks: one scan of length 2 (SigLIP's -3 would run 1)."""
  vit_c = mocha_config(decoder_config("phi"), True).encoders.clip.backbone
  graphdef, state = nnx.split(nnx.eval_shape(lambda: vit.ViT(vit_c, rngs=nnx.Rngs(0))))
  for layer, length in ((-2, 2), (-3, 1), (-1, 3)):
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s).hidden_states(x, layer))(
        state, jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
    assert [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"] == [
        length]


@pytest.mark.slow
def test_scanned_llama_gives_the_unscanned_loss_and_gradients():
  inputs, tokens = batch(1)
  plain = model.MoCHA(mocha_config(decoder_config("llama"), False), rngs=nnx.Rngs(0))
  scan = with_params(model.MoCHA(mocha_config(decoder_config("llama"), True), rngs=nnx.Rngs(1)),
                     flat_params(plain))
  (loss, grads), (scan_loss, scan_grads) = (loss_and_grads(m, inputs, tokens)
                                            for m in (plain, scan))
  assert abs(scan_loss - loss) <= 1e-6 * abs(loss)
  assert rel(scan_grads, grads) <= 1e-6


def fsdp_mesh() -> jax.sharding.Mesh:
  c = mesh_lib.default_config()
  c.data, c.fsdp = 2, 4
  return mesh_lib.build_mesh(c)


def by_path(tree) -> dict:
  return {sharding.path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.slow
def test_sharded_scanned_step_equals_the_unsharded_one(phi_pair):
  """data=2 x fsdp=4 on 8 CPU devices: parameters placed by the default rules."""
  _, scan, _, (loss, grads) = phi_pair
  mesh = fsdp_mesh()
  params = nnx.state(scan, nnx.Param)
  shardings = sharding.tree_shardings(params, mesh)
  # [2, 32, 64]: the layer axis whole, FSDP on the per-layer largest dimension
  assert by_path(shardings)["decoder/blocks/stacked/mlp/fc1/kernel"].spec == P(None, None, "fsdp")
  sharded = nnx.clone(scan)
  nnx.update(sharded, jax.device_put(params, shardings))
  inputs, tokens = batch()
  with jax.set_mesh(mesh):
    sharded_loss, sharded_grads = loss_and_grads(sharded, inputs, tokens)
  assert abs(sharded_loss - loss) <= 1e-6 * abs(loss)
  assert rel(sharded_grads, grads) <= 1e-5


def test_stacked_parameters_shard_and_decay_as_their_layers():
  """Every stacked parameter: spec = (None, *spec of layer 0 without scan), same weight decay."""
  mesh = fsdp_mesh()
  specs, decays = {}, {}
  for scan in (False, True):
    params = abstract_params(mocha_config(decoder_config("phi"), scan))[1]
    specs[scan] = {k: s.spec for k, s in by_path(sharding.tree_shardings(params, mesh)).items()}
    decays[scan] = by_path(optim.decay_mask(params))
  stacked = [k for k in specs[True] if layout.split_stacked(k)]
  assert len(stacked) > 20
  for k in stacked:
    prefix, path = layout.split_stacked(k)
    per_layer = layout.layer_key(prefix, 0, path)
    assert specs[True][k] == P(None, *specs[False][per_layer]), k
    assert decays[True][k] == decays[False][per_layer], k
  assert any("fsdp" in specs[True][k] for k in stacked)


@pytest.mark.parametrize("name", ["hf_phi", "hf_llama"])
def test_hf_decoder_fixture_in_the_scanned_layout_gives_its_logits(name):
  dec, _, _ = hf_decoders.load_hf_decoder(os.path.join(DATA, name), scan_layers=True)
  ref = np.load(os.path.join(DATA, name, "reference.npz"))
  ids = jnp.asarray(ref["input_ids"])
  logits = dec(jnp.zeros((ids.shape[0], 0, dec.embed.embedding.shape[1])), ids)
  assert np.abs(np.asarray(logits) - ref["logits"]).max() <= 1e-5


def test_cached_generation_on_the_stacked_cache_equals_the_unscanned_decoder():
  """Greedy, prompts of different lengths after a visual prefix (the hf_llama fixture)."""
  path = os.path.join(DATA, "hf_llama")
  dec, plain = (hf_decoders.load_hf_decoder(path, scan_layers=s)[0] for s in (True, False))
  cache = dec.init_cache(2, 9)
  assert cache.keys.shape == (len(dec.blocks), 2, 9, dec.num_kv_heads, dec.head_dim)
  tokens = jnp.asarray([[3, 5, 7, 2, 0, 0], [4, 1, 0, 0, 0, 0]], jnp.int32)
  prompt_len = jnp.asarray([4, 2])
  prefix = jnp.zeros((2, 3, dec.embed.embedding.shape[1]))
  prefix = prefix + jnp.arange(3.0)[None, :, None] / 10
  got = generation.generate(dec, prefix, tokens, prompt_len, 3)
  want = generation.generate(plain, prefix, tokens, prompt_len, 3)
  assert got.tolist() == want.tolist()


@pytest.mark.parametrize("name, read", [
    ("hf_clip", lambda m, x: m.hidden_states(x, -2)),  # MoCHA's CLIP layer
    ("hf_convnext", lambda m, x: m.tokens(x))])
def test_hf_encoder_fixture_in_the_scanned_layout_gives_its_features(name, read):
  path = os.path.join(DATA, name)
  config, params, _ = importers.import_checkpoint(path)
  config.scan_layers = True
  encoder = with_params(build_model(config, rngs=nnx.Rngs(0)), params)
  encoder.eval()
  ref = dict(np.load(os.path.join(path, "reference.npz")))
  images = ref["pixel_values"].transpose(0, 2, 3, 1)
  want = ref["penultimate_hidden_state" if name == "hf_clip" else "last_hidden_state"]
  if name == "hf_convnext":  # [B, D, h, w] -> tokens [B, h*w, D]
    want = want.transpose(0, 2, 3, 1).reshape(want.shape[0], -1, want.shape[1])
  assert np.abs(np.asarray(read(encoder, images)) - want).max() <= 1e-5


def test_init_from_a_run_without_scan_fills_the_scanned_model_and_back():
  """Stage handover (`init_from.initialise`, as kind='run' uses it) across the two layouts."""
  rng = np.random.default_rng(0)
  values = lambda scan: {k: rng.normal(size=v.shape).astype(np.float32) for k, v in tree.flatten(
      nnx.to_pure_dict(abstract_params(mocha_config(decoder_config("phi"), scan))[1])).items()}
  c = init_from.default_config()
  c.path = "stage1"
  source, fresh = values(False), values(True)
  into_scan = init_from.initialise(fresh, source, c, [])
  assert into_scan.keys() == fresh.keys()
  assert np.array_equal(into_scan["decoder/blocks/stacked/mlp/fc1/kernel"][1],
                        source["decoder/blocks/1/mlp/fc1/kernel"])
  back = init_from.initialise(source, into_scan, c, [])
  assert back.keys() == source.keys() and all(np.array_equal(v, back[k])
                                              for k, v in source.items())


def test_layout_names_a_missing_layer():
  flat = {"blocks/0/w": np.zeros(2), "head": np.zeros(1)}
  with pytest.raises(ValueError, match=r"^src: no blocks/1/w for our blocks/stacked/w "
                                       r"\(stacked over 2 layers\)$"):
    layout.to_layout(flat, {"blocks/stacked/w": (2, 2), "head": (1,)}, "src")
  stacked = layout.to_layout({"blocks/1/w": np.ones(2), **flat}, {"blocks/stacked/w": (2, 2)},
                             "src")
  assert stacked["blocks/stacked/w"].tolist() == [[0, 0], [1, 1]] and "head" in stacked


@pytest.mark.parametrize("build, message", [
    (lambda: phi.Phi(scanned(decoder_config("phi"), moe_layers="1"), rngs=nnx.Rngs(0)),
     r"^model\.decoder\.scan_layers=True needs identical blocks, but model\.decoder\.moe_layers="
     r"'1' makes some MoE"),
    (lambda: vit.ViT(vit.vit_config("Ti/4", depth=2, image_size=8, stochastic_depth=0.1,
                                    scan_layers=True), rngs=nnx.Rngs(0)),
     r"^model\.scan_layers=True runs deterministic blocks only, but model\.stochastic_depth=0\.1"),
    (lambda: convnext.ConvNeXt(convnext.convnext_config("T", stochastic_depth=0.1,
                                                        scan_layers=True), rngs=nnx.Rngs(0)),
     r"^model\.scan_layers=True needs identical blocks, but model\.stochastic_depth=0\.1"),
])
def test_blocks_that_differ_are_a_one_line_error(build, message):
  with pytest.raises(ValueError, match=message):
    build()
