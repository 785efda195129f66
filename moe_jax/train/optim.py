"""Optimizer and learning-rate schedule from the `optimizer` config node."""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import optax

from moe_jax.parallel import sharding

SCHEDULES = ("cosine", "linear", "rsqrt", "constant")


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="adamw",  # 'adamw' | 'sgd' (momentum)
      learning_rate=1e-3,  # peak
      # The learning-rate schedule (big_vision's `create_learning_rate_schedule`): linear warmup
      # from 0 over `warmup_steps`, then `schedule` ('cosine' | 'linear' to end_learning_rate,
      # 'rsqrt': peak / sqrt(1 + (step - warmup) / rsqrt_timescale), 'constant'), times a linear
      # cooldown to 0 over the last `cooldown_steps` (0 = none).
      schedule="cosine",
      warmup_steps=100,
      end_learning_rate=1e-5,  # 'cosine' / 'linear' decay to this
      rsqrt_timescale=10_000,
      cooldown_steps=0,
      b1=0.9, b2=0.999, momentum=0.9,
      weight_decay=1e-4,  # decoupled; not applied to 1-D params (biases, norms) or embeddings
      grad_clip_norm=1.0,  # 0 = off (the optimizer state is the same either way)
      # Regex over parameter paths ('a/b/c'); only matching ones are updated, the others are
      # frozen by an optax mask (no update, no optimizer state). '' = train everything.
      trainable="",
      # ((regex, multiplier), ...): each parameter's update (= its learning rate, weight decay
      # included) is scaled by the multiplier of the first regex that matches (re.search) its
      # path 'a/b/c', e.g. (("^blocks/[0-5]/", 0.1),) for a lower rate on a pretrained trunk;
      # 0 freezes a group (its optimizer state still runs). Unmatched parameters: 1.
      lr_multipliers=(),
      # Micro-batches per step (moe_jax.train.step): the gradient of the batch is the mean of
      # the micro-batches' (batch_size / grad_accum_steps examples each). 1 = off.
      grad_accum_steps=1,
      # Exponential moving average of the parameters, updated every step and evaluated as
      # `<eval name>_ema/...`: ema = ema_decay * ema + (1 - ema_decay) * params. 0 = off (no copy).
      ema_decay=0.0,
  ))


def validate(config: ml_collections.ConfigDict, total_steps: int) -> None:
  """One-line ValueError naming the `optimizer.*` field and the fix."""
  if config.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={config.schedule!r} must be one of {SCHEDULES}")
  for field in ("warmup_steps", "cooldown_steps", "end_learning_rate"):
    if config[field] < 0:
      raise ValueError(f"optimizer.{field}={config[field]} must be >= 0")
  if config.cooldown_steps > total_steps:
    raise ValueError(f"optimizer.cooldown_steps={config.cooldown_steps} must be <= "
                     f"total_steps={total_steps}")
  if config.rsqrt_timescale <= 0:
    raise ValueError(f"optimizer.rsqrt_timescale={config.rsqrt_timescale} must be > 0")
  if not isinstance(config.grad_accum_steps, int) or config.grad_accum_steps < 1:
    raise ValueError(f"optimizer.grad_accum_steps={config.grad_accum_steps!r} must be an "
                     "integer >= 1 (1 = no accumulation)")
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f"optimizer.ema_decay={config.ema_decay} must be in [0, 1) (0 = no EMA)")
  lr_multipliers(config)


def lr_multipliers(config: ml_collections.ConfigDict) -> list[tuple[re.Pattern, float]]:
  """`optimizer.lr_multipliers` compiled: [(regex, multiplier)]; ValueError when malformed."""
  out = []
  for entry in config.lr_multipliers:
    ok = (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
          and isinstance(entry[1], (int, float)) and entry[1] >= 0)
    if not ok:
      raise ValueError(f"optimizer.lr_multipliers entry {entry!r} must be a pair (regex, "
                       "multiplier >= 0), e.g. ((\"^blocks/\", 0.1),)")
    try:
      out.append((re.compile(entry[0]), float(entry[1])))
    except re.error as e:
      raise ValueError(f"optimizer.lr_multipliers regex {entry[0]!r} is not a regex: {e}") from None
  return out


def schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """`lr(step)`, step = number of updates already applied (0 for the first), as big_vision:

      progress = clip((step - warmup) / (total_steps - warmup), 0, 1)
      cosine:   end + (peak - end) * (1 + cos(pi * progress)) / 2
      linear:   end + (peak - end) * (1 - progress)
      rsqrt:    peak / sqrt(1 + max(step - warmup, 0) / rsqrt_timescale)
      constant: peak
      lr = that * min(1, step / warmup) * min(1, (total_steps - step) / cooldown)

  `end` (end_learning_rate) is where big_vision's `linear_end` goes; its cosine decays to 0, ours
  to `end` (as optax.warmup_cosine_decay_schedule). The warmup is capped at total_steps - 1 so
  that short debug runs of a long recipe keep working."""
  validate(config, total_steps)
  peak, end, kind = config.learning_rate, config.end_learning_rate, config.schedule
  warmup = min(config.warmup_steps, max(total_steps - 1, 0))
  cooldown, timescale = config.cooldown_steps, config.rsqrt_timescale

  def lr(step):
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
    if kind == "cosine":
      value = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif kind == "linear":
      value = end + (peak - end) * (1.0 - progress)
    elif kind == "rsqrt":
      value = peak / jnp.sqrt(1.0 + jnp.maximum(step - warmup, 0.0) / timescale)
    else:
      value = jnp.full((), peak, jnp.float32)
    if warmup:
      value = value * jnp.minimum(1.0, step / warmup)
    if cooldown:
      value = value * jnp.minimum(1.0, (total_steps - step) / cooldown)
    return value.astype(jnp.float32)

  return lr


def _path(path) -> str:
  return "/".join(str(getattr(p, "key", p)) for p in path)


def decay_mask(params):
  """True for weights that get weight decay: matrices and kernels, not biases/norms/embeddings
  (by the per-layer rank of blocks stacked for scan, `sharding.STACKED`)."""
  def rule(path, x):
    names = _path(path)
    ndim = x.ndim - (sharding.STACKED in names.split("/"))
    return ndim >= 2 and "posemb" not in names and "cls" not in names
  return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  lr = schedule(config, total_steps)  # validates the optimizer node
  if config.name == "adamw":
    opt = optax.adamw(lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                      mask=decay_mask)
  elif config.name == "sgd":
    opt = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
                      optax.sgd(lr, momentum=config.momentum))
  else:
    raise ValueError(f"optimizer.name={config.name!r} must be 'adamw' or 'sgd'")
  # Always chained (inf = off leaves finite gradients bit-identical), so the optimizer state,
  # and a checkpoint's tree, does not depend on clipping: a run can resume with it changed.
  opt = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm or float("inf")), opt)
  if config.get("trainable"):
    try:
      re.compile(config.trainable)
    except re.error as e:
      raise ValueError(f"optimizer.trainable={config.trainable!r} is not a regex: {e}") from None
    opt = optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()},
                                functools.partial(trainable_labels, config.trainable))
  return with_multipliers(opt, lr_multipliers(config))


def multipliers(patterns: list[tuple[re.Pattern, float]], params):
  """The multiplier of each parameter: that of the first pattern matching its path, else 1."""
  def rule(path, _):
    name = _path(path)
    return next((m for regex, m in patterns if regex.search(name)), 1.0)
  return jax.tree_util.tree_map_with_path(rule, params)


def with_multipliers(inner: optax.GradientTransformation,
                     patterns: list[tuple[re.Pattern, float]]) -> optax.GradientTransformation:
  """`inner` with each parameter's update scaled by its `multipliers` value. The state is
  `inner`'s own (not a chain's tuple), so checkpoints do not depend on the multipliers: a run
  can resume with them changed, and checkpoints from before they existed restore."""
  def update(updates, state, params=None):
    updates, state = inner.update(updates, state, params)
    factors = multipliers(patterns, updates)
    return jax.tree.map(lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype),
                        updates, factors), state
  return optax.GradientTransformation(inner.init, update)


def trainable_labels(pattern: str, params):
  """'train' / 'frozen' per parameter: does `pattern` match (re.search) its path 'a/b/c'?"""
  regex = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if regex.search(_path(path)) else "frozen", params)
