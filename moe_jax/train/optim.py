"""Optimizer and learning-rate schedule from the `optimizer` config node."""
from __future__ import annotations

import functools
import re

import jax
import ml_collections
import optax


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="adamw",  # 'adamw' | 'sgd' (momentum)
      learning_rate=1e-3,  # peak
      warmup_steps=100,
      schedule="cosine",  # 'cosine' | 'constant' (after warmup)
      end_learning_rate=1e-5,
      b1=0.9, b2=0.999, momentum=0.9,
      weight_decay=1e-4,  # decoupled; not applied to 1-D params (biases, norms) or embeddings
      grad_clip_norm=1.0,  # 0 = off (the optimizer state is the same either way)
      # Regex over parameter paths ('a/b/c'); only matching ones are updated, the others are
      # frozen by an optax mask (no update, no optimizer state). '' = train everything.
      trainable="",
  ))


def schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = min(config.warmup_steps, max(total_steps - 1, 0))
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup, max(total_steps, warmup + 1), config.end_learning_rate)
  if config.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1)),
                                 optax.constant_schedule(config.learning_rate)], [warmup])
  raise ValueError(f"optimizer.schedule={config.schedule!r} must be 'cosine' or 'constant'")


def _path(path) -> str:
  return "/".join(str(getattr(p, "key", p)) for p in path)


def decay_mask(params):
  """True for weights that get weight decay: matrices and kernels, not biases/norms/embeddings."""
  def rule(path, x):
    names = _path(path)
    return x.ndim >= 2 and "posemb" not in names and "cls" not in names
  return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  lr = schedule(config, total_steps)
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
  return opt


def trainable_labels(pattern: str, params):
  """'train' / 'frozen' per parameter: does `pattern` match (re.search) its path 'a/b/c'?"""
  regex = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if regex.search(_path(path)) else "frozen", params)
