"""`MoELayer`: router + dispatch + expert bank (+ shared expert), `x [B, T, D] -> [B, T, D]`
(`[B, T, D_out]` with `out_dim`)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import PartitionSpec as P

from moe_jax.moe import aux_outputs, dispatch, expert_parallel
from moe_jax.moe.config import validate
from moe_jax.moe.experts import ACTIVATIONS, ExpertBank
from moe_jax.parallel import grad_precision
from moe_jax.parallel.mesh import batch_axes, batch_shards
from moe_jax.routing import Router, build_router, ops
from moe_jax.routing.plan import RoutingPlan


class SharedExpert(nnx.Module):
  """Always-on dense MLP beside the routed experts (ViMoE), combined by sum or a learned gate."""

  def __init__(self, dim: int, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    hidden = config.shared_expert.hidden_dim or config.hidden_dim
    self.dtype = jnp.dtype(config.dtype)
    self.fc1 = grad_precision.Linear(dim, hidden, dtype=self.dtype, rngs=rngs)
    self.fc2 = grad_precision.Linear(hidden, dim, dtype=self.dtype, rngs=rngs)
    self.activation = ACTIVATIONS[config.activation]
    self.gate = (nnx.Linear(dim, 1, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
                 if config.shared_expert.combine == "gate" else None)

  def __call__(self, x: jax.Array, routed: jax.Array) -> jax.Array:
    """`x, routed [B, T, D]` -> routed + shared(x) (times sigmoid(x w + b) with a gate)."""
    shared = self.fc2(self.activation(self.fc1(x)))
    if self.gate is not None:
      shared = jax.nn.sigmoid(self.gate(x.astype(jnp.float32))).astype(shared.dtype) * shared
    return routed + shared


def _raise_if_not_finite(input_finite: jax.Array, output_finite: jax.Array) -> None:
  """Host side of `check_finite`."""
  if not (input_finite and output_finite):
    where = "input" if not input_finite else "output"
    raise FloatingPointError(f"MoE layer (check_finite=True): its {where} holds NaN or inf")


class MoELayer(nnx.Module):
  """Sparse Mixture-of-Experts MLP. See `moe_jax.moe.default_config()` for every knob.

  Aux losses and routing metrics are recorded under `moe_jax.moe.capture_aux`.
  `model.train()` / `model.eval()` switch router noise, expert dropout and expert dropout masks,
  and in eval mode the capacity factor is `eval_capacity_factor` when that is > 0.
  `router`: a router to use instead of building `config.router.name`'s; `config` is checked
  against its class (any `Router` subclass, registered or not).
  `out_dim`: experts `D -> F -> out_dim` (MoCHA's connectors); no shared expert then.

  Non-finite inputs: a token whose input holds NaN/inf gets non-finite router logits. Every
  router still returns a plan: a dispatched token's output is NaN (top_k, clusters, hash,
  random, expert choice); a token that no expert takes (dropped at capacity, or picked by no
  expert under expert choice) gets 0 from the routed experts (the shared expert's output, if
  any, is still NaN); Soft MoE mixes every token of a group into every slot, so one NaN token
  makes its whole routing group NaN. Other tokens are not affected (Soft MoE aside). Set
  `check_finite=True` to raise instead (a debug option: one host callback per call).
  """

  def __init__(self, dim: int, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               router: Router | None = None, out_dim: int | None = None):
    if router is not None and not isinstance(router, Router):
      raise ValueError(f"MoELayer(router=...) got a {type(router).__name__}: pass an instance of "
                       "a moe_jax.routing.Router subclass")
    validate(config, None if router is None else type(router))
    if out_dim not in (None, dim) and config.shared_expert.enabled:
      raise ValueError(f"MoE config: shared_expert.enabled needs the output width {out_dim} to "
                       f"equal the input width {dim}; set shared_expert.enabled=False")
    self.config = ml_collections.FrozenConfigDict(config)
    self.router = build_router(dim, config, rngs=rngs) if router is None else router
    self.experts = ExpertBank(config.num_experts, dim, config.hidden_dim,
                              activation=config.activation, dropout_rate=config.dropout_rate,
                              dtype=config.dtype, out_dim=out_dim, rngs=rngs)
    self.shared_expert = (SharedExpert(dim, config, rngs=rngs)
                          if config.shared_expert.enabled else None)
    self.deterministic = False  # set by model.train() / model.eval()

  def _groups(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`x [B, T, D]` -> (router input `[G, S, D]`, dispatch rows `[G, S, R*D]`).

    Per token (R = 1) both are the token groups. Per image (R = T) a group holds S images: the
    router sees each image's pooled token (mean or CLS) and a dispatch row is a whole image.
    """
    B, T, D = x.shape
    c = self.config
    if c.granularity == "image":
      mesh = ops.current_mesh()
      S = c.images_per_group or B // (1 if mesh is None else batch_shards(mesh))
      if B % S:
        raise ValueError(f"MoE config: images_per_group={S} must divide the batch of {B} images "
                         "(or set images_per_group=0 for one group per device's batch)")
      pooled = jnp.mean(x, axis=1) if c.image_pooling == "mean" else x[:, 0]
      return pooled.reshape(B // S, S, D), x.reshape(B // S, S, T * D)
    S = c.group_size or T
    if (B * T) % S:
      raise ValueError(f"MoE config: group_size={S} must divide the {B}x{T}={B * T} tokens of "
                       "the batch (or set group_size=0 for one group per example)")
    groups = x.reshape(B * T // S, S, D)
    return groups, groups

  def route(self, x: jax.Array) -> RoutingPlan:
    """The routing plan for `x [B, T, D]`, over groups `[G, S]` of tokens (or of images)."""
    return self.router(self._groups(x)[0])

  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    mesh = ops.current_mesh()
    if mesh is not None:  # keep routing local: tokens stay sharded over the batch axes
      expert_parallel.check_divisible(x.shape[0], "batch size", mesh)
      x = jax.lax.with_sharding_constraint(x, P(batch_axes(mesh)))
    router_input, groups = self._groups(x)
    plan = self.router(router_input)
    capacity_factor = (c.eval_capacity_factor if self.deterministic and c.eval_capacity_factor
                       else c.capacity_factor)
    if plan.kind == "token_choice":
      mode = c.dispatch
      ragged = mode == "dropless" and expert_parallel.ragged_dropless(mesh)
      if mode == "dropless" and expert_parallel.expert_shards(mesh) > 1 and not ragged:
        mode, capacity_factor = expert_parallel.dropless_as_capacity(c.num_experts, plan.k)
      dispatch_fn = functools.partial(
          dispatch.token_choice, mode=mode, capacity_factor=capacity_factor,
          min_capacity=c.min_capacity, block_size=c.dropless.block_size,
          backend=c.dropless.backend,
          tokens_per_row=x.shape[1] if c.granularity == "image" else 1)
    else:
      ragged = False
      dispatch_fn = functools.partial(getattr(dispatch, plan.kind),
                                      capacity_factor=capacity_factor)
    if mesh is None:
      y, metrics = dispatch_fn(plan, groups, self.experts)
    else:
      y, metrics = expert_parallel.dispatch(
          dispatch_fn, plan, groups, self.experts, mesh,
          ragged_buffer_factor=c.dropless.ragged_buffer_factor if ragged else None)
    y = y.reshape(*x.shape[:-1], -1).astype(x.dtype)
    if c.check_finite:
      jax.debug.callback(_raise_if_not_finite, jnp.isfinite(x).all(), jnp.isfinite(y).all())
    if self.shared_expert is not None:
      y = self.shared_expert(x, y).astype(x.dtype)
    weights = c.router.loss_weights
    weighted = sum((weights[name] * value for name, value in plan.aux_losses.items()),
                   jnp.zeros((), jnp.float32))
    B, E = x.shape[0], c.num_experts
    S = groups.shape[1]
    mass = plan.token_expert_mass(S).reshape(B, -1, E).sum(axis=1)
    primary = jax.nn.one_hot(plan.primary_expert(S), E + 1, dtype=jnp.float32)
    aux_outputs.record(self, aux_outputs.LayerAux(
        losses=plan.aux_losses, weighted_loss=weighted, metrics={**plan.metrics, **metrics},
        example_load=mass / jnp.maximum(mass.sum(-1, keepdims=True), 1e-9),
        example_tokens=primary.reshape(B, -1, E + 1).sum(axis=1)))
    return y
