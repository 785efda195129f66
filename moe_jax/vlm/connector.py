"""MoCHA's sparse MoE connector: one per encoder, built from `moe_jax.moe.MoELayer`.

`x [B, T_i, D_i] -> [B, T_i, H]` (H = the LM width): a linear input projection D_i -> H, then an
MoE layer whose experts are H -> F -> H MLPs (F = H by default). Each routed expert therefore
computes Linear(D_i -> H) - GELU - Linear(H -> H) as in the paper, with its first Linear factored
through the shared projection (exact when D_i <= H, as for every encoder of the paper); the
router sees the projected tokens. The router's balance and z-losses leave through
`moe.capture_aux` like those of any MoE layer.
"""
from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from moe_jax import moe


def connector_config(width: int) -> ml_collections.ConfigDict:
  """The paper's connector: 4 experts, top-2 renormalised, no noise, balance 0.1 + z-loss 0.01.

  Switch balance `E * sum_e f_e P_e` equals the paper's `E^2 * mean_e(f_e P_e)` (f_e: fraction
  of tokens whose top-1 is e). capacity_factor = E / k gives every expert room for every token
  of its group (C = S): no token is dropped, as in the paper (no capacity limit there); it
  follows `num_experts` and `router.k` until it is set itself.
  """
  c = moe.default_config("top_k")
  c.num_experts, c.hidden_dim = 4, width
  c.router.k, c.router.renormalize, c.router.noise_std, c.router.bpr = 2, True, 0.0, False
  c.router.loss_weights.importance = c.router.loss_weights.load = 0.0
  c.router.loss_weights.balance, c.router.loss_weights.z_loss = 0.1, 0.01
  c.capacity_factor = c.get_ref("num_experts").to_float() / c.router.get_ref("k")
  return c


class MoEConnector(nnx.Module):
  """`[B, T, in_dim] -> [B, T, out_dim]`: projection, then a sparse MoE of out_dim-wide experts."""

  def __init__(self, in_dim: int, out_dim: int, config: ml_collections.ConfigDict, *,
               rngs: nnx.Rngs):
    self.proj = nnx.Linear(in_dim, out_dim, rngs=rngs)
    self.moe = moe.MoELayer(out_dim, config, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.moe(self.proj(x))
