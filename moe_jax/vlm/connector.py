"""MoCHA's sparse MoE connector: one per encoder, a `moe_jax.moe.MoELayer` from D_i to H.

`x [B, T_i, D_i] -> [B, T_i, H]` (H = the LM width), as the reference's `MLPMoE`
(Pbhgit/MoCHA `llava/model/multimodal_projector/moec_builder.py`): a bias-free router on the raw
encoder tokens, softmax, top-2 renormalised; each expert is Linear(D_i -> H) - GELU (exact erf,
torch's `nn.GELU()`) - Linear(H -> H); no projection in front, no capacity limit. The router's
balance and z-losses leave through `moe.capture_aux` like those of any MoE layer.
"""
from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from moe_jax import moe


def connector_config(width: int) -> ml_collections.ConfigDict:
  """The paper's connector: 4 experts of hidden width H, top-2 renormalised, no noise, balance
  0.1 + z-loss 0.01.

  Switch balance `E * sum_e f_e P_e` equals the reference's `E^2 * mean_e(f_e P_e)` (f_e: fraction
  of tokens whose top-1 is e). capacity_factor = E / k gives every expert room for every token
  of its group (C = S): no token is dropped, as in the reference (no capacity limit there); it
  follows `num_experts` and `router.k` until it is set itself.
  """
  c = moe.default_config("top_k")
  c.num_experts, c.hidden_dim, c.activation = 4, width, "gelu_exact"
  c.router.k, c.router.renormalize, c.router.noise_std, c.router.bpr = 2, True, 0.0, False
  c.router.loss_weights.importance = c.router.loss_weights.load = 0.0
  c.router.loss_weights.balance, c.router.loss_weights.z_loss = 0.1, 0.01
  c.capacity_factor = c.get_ref("num_experts").to_float() / c.router.get_ref("k")
  return c


class MoEConnector(nnx.Module):
  """`[B, T, in_dim] -> [B, T, out_dim]`: a sparse MoE whose experts map in_dim -> out_dim."""

  def __init__(self, in_dim: int, out_dim: int, config: ml_collections.ConfigDict, *,
               rngs: nnx.Rngs):
    self.moe = moe.MoELayer(in_dim, config, out_dim=out_dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.moe(x)
