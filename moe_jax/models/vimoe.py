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


UPCYCLE_SPLITS = ("shared", "copy")


def upcycle(dense: vit.ViT, sparse: ViMoE, *, split: str = "copy", noise_std: float = 0.0,
            key: jax.Array | None = None) -> ViMoE:
  """Initialises `sparse` from a trained dense ViT of the same size, in place; returns it.

  Every parameter outside the MoE layers is copied; the MoE layers' experts (and shared expert)
  start from the dense block's MLP as `upcycled_params` describes for `split`; routers keep
  their fresh initialisation.
  """
  state = nnx.state(sparse, nnx.Param)
  target = tree.flatten(nnx.to_pure_dict(state))
  source = upcycled_params(tree.flatten(nnx.to_pure_dict(nnx.state(dense, nnx.Param))),
                           {k: v.shape for k, v in target.items()}, sparse.moe_layer_indices,
                           split=split, noise_std=noise_std, key=key)
  merged = {k: source[k] if k in source and source[k].shape == v.shape else v
            for k, v in target.items()}
  nnx.replace_by_pure_dict(state, tree.unflatten(merged))
  nnx.update(sparse, state)
  return sparse


def upcycled_params(dense: dict[str, jax.Array], shapes: dict[str, tuple[int, ...]],
                    moe_layer_indices: Sequence[int], *, split: str, noise_std: float = 0.0,
                    key: jax.Array | None = None) -> dict[str, jax.Array]:
  """Flat dense-ViT parameters -> the same with each MoE block's MLP (`blocks/i/mlp/fc1/kernel`,
  ...) replaced by the expert bank `[E, ...]` (+ shared expert) of the ViMoE whose flat
  parameter `shapes` are given. The routers are not in the result (they keep their
  initialisation). With `MLP(x) = fc2(act(fc1(x)))` the dense block's MLP:

  - `split="shared"` (needs a shared expert): the shared expert is the MLP; every routed expert
    copies fc1 (+ noise) and has fc2 = 0, so the routed experts add exactly 0 and the layer is
    the MLP for *every* router and dispatch, dropped tokens included (the zero-init residual
    trick: the routed experts' fc2 and then the routers get gradients from the first step). With
    `shared_expert.combine='gate'` (y = routed + sigmoid(x w + b) * shared) the gate is set to
    w = 0, b = 0 and the shared fc2 doubled: sigmoid(0) * 2 = 1, exact in floating point.
  - `split="copy"` (sparse upcycling, Komatsuzaki et al. 2023): every routed expert is the MLP
    (+ noise); with a shared expert, the shared expert and every routed expert output half
    (fc2 * 0.5). Equal to the MLP only where a token's combine weights sum to 1 and it is not
    dropped: `upcycle_inexact_reason` says when that does not hold.

  `noise_std`: Gaussian noise of relative scale `noise_std` (times the std of the copied tensor)
  on each routed expert's copied tensors so that experts can diverge (with "shared", on fc1 only,
  which keeps the layer exact).
  """
  if split not in UPCYCLE_SPLITS:
    raise ValueError(f"init_from.upcycle_split={split!r} must be one of {UPCYCLE_SPLITS}")
  out = dict(dense)
  key = jax.random.key(0) if key is None else key
  for index in moe_layer_indices:
    mlp = f"blocks/{index}/mlp"
    src = {f"{fc}_{p}": out.pop(f"{mlp}/{fc}/{p}") for fc in ("fc1", "fc2")
           for p in ("kernel", "bias")}
    has_shared = f"{mlp}/shared_expert/fc1/kernel" in shapes
    gated = f"{mlp}/shared_expert/gate/kernel" in shapes
    if split == "shared" and not has_shared:
      raise ValueError("init_from.upcycle_split='shared' needs model.moe.shared_expert.enabled="
                       "True (or set init_from.upcycle_split='copy')")
    for name, value in src.items():
      fc2 = name.startswith("fc2")
      routed_scale = 0.0 if split == "shared" and fc2 else 0.5 if has_shared and fc2 else 1.0
      shared_scale = (1.0 if split == "shared" else 0.5) * (2.0 if gated else 1.0)
      target = shapes[f"{mlp}/experts/{name}"]
      expert = jnp.broadcast_to(routed_scale * value, target)
      if noise_std > 0 and routed_scale:
        key, sub = jax.random.split(key)
        expert = expert + noise_std * jnp.std(routed_scale * value) * jax.random.normal(sub, target)
      out[f"{mlp}/experts/{name}"] = expert
      if has_shared:
        out[f"{mlp}/shared_expert/{name.replace('_', '/')}"] = (shared_scale * value
                                                               if fc2 else value)
    if gated:
      for p in ("kernel", "bias"):
        out[f"{mlp}/shared_expert/gate/{p}"] = jnp.zeros(shapes[f"{mlp}/shared_expert/gate/{p}"])
  return out


def upcycle_inexact_reason(moe_config: ml_collections.ConfigDict, split: str,
                           noise_std: float) -> str | None:
  """Why an upcycled MoE layer of `moe_config` differs from the dense MLP at init (eval mode),
  or None when it equals it. "shared" is always exact; "copy" needs every token's combine
  weights to sum to 1 and no token dropped:

  - noise on the copies changes them;
  - Soft MoE experts see slot mixtures of tokens, not tokens;
  - expert choice gives a token 0 to E weights (softmax probabilities) that need not sum to 1;
  - top_k / clusters without `router.renormalize` weight the copies by probabilities (sum < 1);
    hash and random weight K copies by 1/K each (exact); another router is not known to be;
  - `dispatch='capacity'` with `capacity_factor < E / K` can drop tokens.
  """
  if split == "shared":
    return None
  r, E = moe_config.router, moe_config.num_experts
  if noise_std > 0:
    return f"init_from.upcycle_noise_std={noise_std} > 0 perturbs the expert copies"
  if r.name == "soft":
    return "Soft MoE experts see slot mixtures of tokens, not the tokens"
  if r.name == "expert_choice":
    return "expert choice gives a token 0 to E combine weights that need not sum to 1"
  if r.name in ("top_k", "clusters") and not r.renormalize:
    return (f"router.name={r.name!r} with router.renormalize=False weights the copies by router "
            "probabilities (sum < 1)")
  if r.name not in ("top_k", "clusters", "hash", "random"):
    return f"router.name={r.name!r} is not known to give combine weights that sum to 1"
  if moe_config.dispatch == "capacity" and moe_config.capacity_factor < E / r.k:
    return (f"dispatch='capacity' with capacity_factor={moe_config.capacity_factor} < "
            f"num_experts / k = {E / r.k:g} can drop tokens")
  return None
