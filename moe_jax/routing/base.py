"""The router interface: besides `x [G, S, D] -> RoutingPlan`, a router class owns its config
knobs, its aux-loss weights, the kind of plan it makes and its config checks."""
from __future__ import annotations

from typing import ClassVar, Mapping, NoReturn

import ml_collections
from flax import nnx

from moe_jax.routing.plan import PlanKind


def fail(field: str, msg: str) -> NoReturn:
  """Raises the one-line `ValueError("MoE config: <field>=... <msg>")` naming `field`."""
  raise ValueError(f"MoE config: {field}{'' if msg.startswith('=') else ' '}{msg}")


class Router(nnx.Module):
  """Base of every router, built as `cls(dim, moe_config, rngs=...)` and called on `x [G, S, D]`.

  Class-level, so that `moe.default_config(name)` and `moe.validate` need no list of routers:
  - `plan_kind`: the plan it returns; token-choice plans go through `config.dispatch`
    (capacity or dropless), expert-choice and soft plans through their own dispatch;
  - `loss_weights`: every aux loss it returns -> its paper weight (`config.router.loss_weights`);
  - `default_config()`: the `config.router` knobs it reads, besides `name` and `loss_weights`;
  - `validate(config)`: its checks of the MoE config; errors go through `fail(field, msg)`.
  """

  plan_kind: ClassVar[PlanKind]
  loss_weights: ClassVar[Mapping[str, float]] = {}

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict()

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict) -> None:
    """Raises through `fail` when `config` (the whole MoE node) is bad for this router."""


class TokenChoiceRouter(Router):
  """Base of routers where every token picks `router.k` distinct experts `[G, S, K]`."""

  plan_kind = "token_choice"

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(k=1))

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict) -> None:
    k, E = config.router.k, config.num_experts
    if not 1 <= k <= E:
      fail("router.k", f"={k} must be in [1, num_experts={E}]")
