"""The MoE layer's configuration: the layer's knobs, the router's own node, build-time checks."""
from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from moe_jax.routing import ROUTERS
from moe_jax.routing.base import Router, fail

DISPATCHES = ("capacity", "dropless")
ACTIVATIONS = ("gelu", "gelu_exact", "relu", "silu", "tanh")


def _fields(node: Mapping[str, Any], prefix: str) -> set[str]:
  """Dotted paths of the leaves of config node `node`, each after `prefix`."""
  return set().union(*(
      _fields(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else {prefix + k}
      for k, v in node.items()))


def _difference(want: set[str], have: set[str]) -> str:
  """How `have` differs from `want`: 'lacks a, b and has c, which it does not read'."""
  parts = [f"lacks {', '.join(sorted(want - have))}"] if want - have else []
  if have - want:
    parts.append(f"has {', '.join(sorted(have - want))}, which it does not read")
  return " and ".join(parts)


def default_config(router: str = "top_k") -> ml_collections.ConfigDict:
  """The MoE layer config for `router` (a `moe_jax.routing.ROUTERS` name).

  `router` holds only the knobs that router reads (`Router.default_config()`) and the weights of
  the losses it returns, at their paper values. The layer's knobs are there for every router:
  `dispatch` is a layer-level switch that a locked config must let the command line flip, so
  `dropless.*` (read with dispatch='dropless') and `capacity_factor` / `min_capacity` (read with
  'capacity', and by 'dropless' on an expert-sharded mesh, which falls back to buffers) stay.
  """
  cls = ROUTERS.get(router)
  c = ml_collections.ConfigDict()
  c.num_experts = 8
  c.hidden_dim = 512  # F, hidden width of each expert MLP.
  c.activation = "gelu"
  c.dropout_rate = 0.0  # Dropout on the expert hidden layer (train only).
  c.dtype = "float32"  # Compute dtype of experts; params and router math stay float32.
  # Dispatch: `capacity` = [E, C, D] buffers, overflow dropped; `dropless` = grouped matmul.
  c.dispatch = "capacity"
  c.capacity_factor = 1.0  # C = ceil(K * S * capacity_factor / E); expert choice: round(cf*S/E).
  # > 0: the capacity factor in eval mode (`model.eval()`; vmoe evaluates V-MoE at 4.0, so
  # fewer tokens drop at test time); 0 = capacity_factor in both modes.
  c.eval_capacity_factor = 0.0
  c.min_capacity = 1
  # Tokens per routing group S. 0 = each example (row of x [B, T, D]) is one group.
  c.group_size = 0
  # 'token' routes every token; 'image' routes whole rows of x [B, T, D] (images): groups of
  # images, capacity and BPR over images, each image carrying all its T tokens.
  c.granularity = "token"
  c.image_pooling = "mean"  # granularity='image': route by the 'mean' token or token 0 ('cls').
  c.images_per_group = 0  # granularity='image': images per routing group; 0 = each device's batch.
  c.dropless = ml_collections.ConfigDict()
  # Rows per block: each expert's tokens are padded to a multiple; also the blocked grouped
  # matmul's smallest tile. Small blocks waste few rows when experts get ~100 tokens each
  # (bench/RESULTS.md: 16 beat 128 at E=32 and matched it at E=8 on CPU).
  c.dropless.block_size = 16
  # 'auto' = 'ragged_dot' where XLA has a real grouped GEMM (TPU), else 'blocked'.
  c.dropless.backend = "auto"
  # Under expert parallelism on TPU/GPU (ragged all-to-all): each device receives the rows routed
  # to its experts in windows of ceil(f x its own row count) rows (rounded up to 16), f = this
  # factor; a device that gets more takes more rounds (latency), nothing is dropped. 2.0: one
  # round while no device receives more than twice its balanced share; >= the expert axis size:
  # always one round (the worst-case buffer). See expert_parallel.ExpertsOverRaggedAllToAll.
  c.dropless.ragged_buffer_factor = 2.0

  c.router = ml_collections.ConfigDict(
      {"name": router, **cls.default_config(), "loss_weights": dict(cls.loss_weights)})

  # Debug: raise (FloatingPointError, from a host callback) when the layer's input or output
  # holds NaN/inf, instead of the per-router behaviour described in `MoELayer`'s docstring.
  c.check_finite = False

  c.shared_expert = ml_collections.ConfigDict()
  c.shared_expert.enabled = False
  c.shared_expert.hidden_dim = 0  # 0 = same as hidden_dim.
  c.shared_expert.combine = "sum"  # 'sum': y = shared + routed; 'gate': sigmoid(x w) * shared.
  return c


def validate(c: ml_collections.ConfigDict, router: type[Router] | None = None) -> None:
  """Raises ValueError naming the offending field; called when a layer is built.

  `router`: the class of a router handed to the layer (default: `ROUTERS.get(router.name)`).
  """
  r = c.router
  E = c.num_experts
  if router is None:
    if r.name not in ROUTERS:
      fail("router.name", f"={r.name!r} is unknown; use one of {ROUTERS.names()}")
    router = ROUTERS.get(r.name)
  knobs = {k: v for k, v in r.items() if k not in ("name", "loss_weights")}
  want, have = _fields(router.default_config(), "router."), _fields(knobs, "router.")
  if want != have:
    fail("router.name", f"={r.name!r}: the router node {_difference(want, have)} (it was built "
         f"for another router); build the config with moe.default_config({r.name!r}) (a ViMoE: "
         f"vimoe_config(router={r.name!r})) instead of setting router.name")
  known, named = set(router.loss_weights), set(r.get("loss_weights", {}))
  if named != known:
    fail("router.loss_weights", f"{_difference(known, named)} (router.name={r.name!r} returns "
         f"the losses {sorted(known)})")
  kind = router.plan_kind
  if c.dispatch not in DISPATCHES:
    fail("dispatch", f"={c.dispatch!r} is unknown; use one of {DISPATCHES}")
  if c.activation not in ACTIVATIONS:
    fail("activation", f"={c.activation!r} is unknown; use one of {ACTIVATIONS}")
  if not isinstance(E, int) or E < 1:
    fail("num_experts", f"={E!r} must be a positive integer")
  if c.hidden_dim < 1:
    fail("hidden_dim", f"={c.hidden_dim} must be >= 1")
  needs_capacity = kind == "expert_choice" or (kind == "token_choice" and c.dispatch == "capacity")
  if needs_capacity and not c.capacity_factor > 0:
    fail("capacity_factor", f"={c.capacity_factor} must be > 0 with dispatch='capacity' "
         "(or use dispatch='dropless')")
  if c.group_size < 0:
    fail("group_size", f"={c.group_size} must be >= 0 (0 = one group per example)")
  if c.granularity not in ("token", "image"):
    fail("granularity", f"={c.granularity!r} must be 'token' or 'image'")
  if c.image_pooling not in ("mean", "cls"):
    fail("image_pooling", f"={c.image_pooling!r} must be 'mean' or 'cls'")
  if c.images_per_group < 0:
    fail("images_per_group", f"={c.images_per_group} must be >= 0 (0 = each device's batch)")
  if c.granularity == "image" and (kind != "token_choice" or c.group_size != 0):
    fail("granularity", f"='image' needs a token-choice router (router.name={r.name!r} makes "
         f"{kind} plans) and group_size=0")
  if c.dispatch == "dropless" and kind != "token_choice":
    fail("dispatch", f"='dropless' applies to token-choice routers; router.name={r.name!r} "
         "uses its own dispatch (set dispatch='capacity')")
  if c.dropless.block_size < 1:
    fail("dropless.block_size", f"={c.dropless.block_size} must be >= 1")
  if c.dropless.backend not in ("auto", "blocked", "ragged_dot"):
    fail("dropless.backend", f"={c.dropless.backend!r}: use 'auto', 'blocked' or 'ragged_dot'")
  if not c.dropless.ragged_buffer_factor > 0:
    fail("dropless.ragged_buffer_factor", f"={c.dropless.ragged_buffer_factor} must be > 0 (the "
         "receive window in units of a device's rows; 2.0 is the default)")
  router.validate(c)
  if c.eval_capacity_factor < 0:
    fail("eval_capacity_factor", f"={c.eval_capacity_factor} must be >= 0 (0 = capacity_factor)")
  if not 0.0 <= c.dropout_rate < 1.0:
    fail("dropout_rate", f"={c.dropout_rate} must be in [0, 1)")
  if c.dtype not in ("float32", "bfloat16", "float16"):
    fail("dtype", f"={c.dtype!r} must be float32, bfloat16 or float16")
  if c.shared_expert.combine not in ("sum", "gate"):
    fail("shared_expert.combine", f"={c.shared_expert.combine!r} must be 'sum' or 'gate'")
