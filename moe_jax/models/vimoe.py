"""ViMoE (Han et al. 2024): a ViT whose MLP blocks are MoE layers at chosen depths.

`config.moe` is an `moe_jax.moe.default_config()` node (any router, either dispatch path, shared
expert, per-token or per-image routing); `config.moe_layers` (a string, so it can be set from the command line) says where:

- comma-separated block indices, e.g. `"9,11"`;
- `"last:n"`: the last n blocks (the paper: 2-5 MoE layers in the deeper half suffice);
- `"every:n"`: every n-th block, counting from the last one (V-MoE's "every other layer").

MoEC (Mixture of Expert Clusters) is ViMoE with the clusters router:
`vimoe_config(router="clusters")`.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moe_jax import moe
from moe_jax.checkpoints import tree
from moe_jax.models import vit


def vimoe_config(variant: str = "S/16", moe_layers: str | Sequence[int] = "last:2",
                 router: str = "top_k", **vit_overrides) -> ml_collections.ConfigDict:
  """A ViT config of `variant` plus `router`'s MoE node; experts default to the dense MLP width.

  `moe.dtype` follows `dtype` (a lazy reference: `--config.model.dtype=bfloat16` sets both)
  until it is set itself (then only the experts change).
  """
  c = vit.vit_config(variant, **vit_overrides)
  c.name = "vimoe"
  c.moe_layers = moe_layers if isinstance(moe_layers, str) else ",".join(map(str, moe_layers))
  c.moe = moe.default_config(router)
  c.moe.hidden_dim = c.mlp_dim
  c.moe.dtype = c.get_ref("dtype").identity()
  return c


def moe_layer_indices(spec: str, depth: int) -> list[int]:
  """Block indices that get an MoE layer; ValueError naming `moe_layers` when invalid."""
  kind, _, n = spec.partition(":")
  if kind in ("last", "every") and n.isdigit() and int(n) >= 1:
    n = int(n)
    ids = sorted(range(depth - n, depth) if kind == "last" else range(depth - 1, -1, -n))
  elif all(i.strip().isdigit() for i in spec.split(",")):
    ids = sorted(int(i) for i in spec.split(","))
  else:
    raise ValueError(f"model.moe_layers={spec!r}: use block indices like '9,11', 'last:n' or "
                     "'every:n' (n >= 1)")
  if not ids or ids[0] < 0 or ids[-1] >= depth or len(set(ids)) != len(ids):
    raise ValueError(f"model.moe_layers={spec!r} must name distinct blocks in [0, depth={depth})")
  return ids


class ViMoE(vit.ViT):
  """ViT with `MoELayer`s replacing the MLP of the blocks named by `config.moe_layers`."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.moe_layer_indices = moe_layer_indices(config.moe_layers, config.depth)
    moe_config = config.moe
    if (moe_config.granularity == "image" and moe_config.image_pooling == "cls"
        and config.pool != "cls"):
      raise ValueError("model.moe.image_pooling='cls' routes each image by its CLS token: set "
                       "model.pool='cls' (or model.moe.image_pooling='mean')")

    def mlp_factory(index: int, dim: int, rngs: nnx.Rngs) -> nnx.Module | None:
      return moe.MoELayer(dim, moe_config, rngs=rngs) if index in self.moe_layer_indices else None

    super().__init__(config, rngs=rngs, mlp_factory=mlp_factory)


def upcycle(dense: vit.ViT, sparse: ViMoE, *, noise_std: float = 0.0,
            key: jax.Array | None = None) -> ViMoE:
  """Initialises `sparse` from a trained dense ViT of the same size, in place; returns it.

  Every parameter outside the MoE layers is copied; each expert (and the shared expert) of an MoE
  layer starts as the dense block's MLP, plus optional Gaussian noise of relative scale
  `noise_std` per expert so that experts can diverge; routers keep their fresh initialisation.
  """
  state = nnx.state(sparse, nnx.Param)
  target = tree.flatten(nnx.to_pure_dict(state))
  source = upcycled_params(tree.flatten(nnx.to_pure_dict(nnx.state(dense, nnx.Param))),
                           {k: v.shape for k, v in target.items()}, sparse.moe_layer_indices,
                           noise_std=noise_std, key=key)
  merged = {k: source[k] if k in source and source[k].shape == v.shape else v
            for k, v in target.items()}
  nnx.replace_by_pure_dict(state, tree.unflatten(merged))
  nnx.update(sparse, state)
  return sparse


def upcycled_params(dense: dict[str, jax.Array], shapes: dict[str, tuple[int, ...]],
                    moe_layer_indices: Sequence[int], *, noise_std: float = 0.0,
                    key: jax.Array | None = None) -> dict[str, jax.Array]:
  """Flat dense-ViT parameters -> the same with each MoE block's MLP (`blocks/i/mlp/fc1/kernel`,
  ...) replaced by the expert bank `[E, ...]` (+ shared expert) of the ViMoE whose flat
  parameter `shapes` are given: every expert a copy of the MLP, plus noise of relative scale
  `noise_std`. The routers are not in the result (they keep their initialisation)."""
  out = dict(dense)
  key = jax.random.key(0) if key is None else key
  for index in moe_layer_indices:
    mlp = f"blocks/{index}/mlp"
    src = {f"{fc}_{p}": out.pop(f"{mlp}/{fc}/{p}") for fc in ("fc1", "fc2")
           for p in ("kernel", "bias")}
    for name, value in src.items():
      target = shapes[f"{mlp}/experts/{name}"]
      expert = jnp.broadcast_to(value, target)
      if noise_std > 0:
        key, sub = jax.random.split(key)
        expert = expert + noise_std * jnp.std(value) * jax.random.normal(sub, target)
      out[f"{mlp}/experts/{name}"] = expert
      shared = f"{mlp}/shared_expert/{name.replace('_', '/')}"
      if shared in shapes:
        out[shared] = value
  return out
