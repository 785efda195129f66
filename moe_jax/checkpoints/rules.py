"""Checkpoint tensors -> our flat parameters by explicit per-parameter rules, shared by every
importer: each rule names the checkpoint keys one parameter comes from, their expected shapes and
the layout conversion; `apply_rules` checks them all and reports which keys it used."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import ml_collections
import numpy as np
from flax import nnx

from moe_jax.checkpoints.tree import CheckpointMismatch, flatten
from moe_jax.models import build_model

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ImportReport:
  """Which checkpoint keys filled which of our parameters, the keys left out on purpose, and
  the `data.normalization` preset the checkpoint was trained with (None: unknown)."""
  used: dict[str, tuple[str, ...]]  # our parameter path -> the checkpoint keys it came from
  ignored: dict[str, str]  # checkpoint key -> why
  normalization: str | None = None  # set by `importers.import_checkpoint`


@dataclasses.dataclass(frozen=True)
class Rule:
  """Our parameter `target` from checkpoint `keys`: `shapes(target shape)` gives each key's
  expected shape (None: checked by another rule), `convert(*arrays)` our value."""
  target: str
  keys: tuple[str, ...]
  shapes: Callable[[Shape], tuple[Shape | None, ...]]
  convert: Callable[..., np.ndarray]


def same(shape: Shape) -> tuple[Shape]:
  """`Rule.shapes` of a key stored in our layout."""
  return (shape,)


def copied(target: str, key: str) -> Rule:
  """`target` is checkpoint `key` as it is (same shape)."""
  return Rule(target, (key,), same, np.asarray)


def torch_linear(target: str, key: str, shapes: dict[str, Shape], n_in: int = 1) -> list[Rule]:
  """Our Linear / attention projection `target` (kernel `[*in, *out]`, the first `n_in` axes
  being inputs) from a torch Linear `key` (`weight [out, in]`, `bias [out]`)."""
  kernel_shape, bias_shape = shapes[f"{target}/kernel"], shapes[f"{target}/bias"]
  return [
      Rule(f"{target}/kernel", (f"{key}.weight",),
           lambda s: ((math.prod(s[n_in:]), math.prod(s[:n_in])),),
           lambda w: w.T.reshape(kernel_shape)),
      Rule(f"{target}/bias", (f"{key}.bias",), lambda s: ((math.prod(s),),),
           lambda b: b.reshape(bias_shape))]


def torch_norm(target: str, key: str) -> list[Rule]:
  """Our LayerNorm `target` from a torch LayerNorm `key` (weight, bias)."""
  return [copied(f"{target}/scale", f"{key}.weight"), copied(f"{target}/bias", f"{key}.bias")]


def apply_rules(rules: list[Rule], tensors: dict[str, np.ndarray], shapes: dict[str, Shape],
                ignored: dict[str, str], source: str) -> tuple[dict[str, np.ndarray], ImportReport]:
  """Our flat parameters from `tensors` by `rules`; CheckpointMismatch naming the first missing
  or mis-shaped key, the first checkpoint key no rule uses (unless `ignored`), or the first of
  our parameters no rule fills."""
  params, used = {}, {}
  for rule in rules:
    for key, expected in zip(rule.keys, rule.shapes(shapes[rule.target])):
      if key not in tensors:
        raise CheckpointMismatch(f"{source}: no key {key!r} (needed for our {rule.target})")
      if expected is not None and tuple(tensors[key].shape) != tuple(expected):
        raise CheckpointMismatch(f"{source}: {key!r} has shape {tuple(tensors[key].shape)}, our "
                                 f"{rule.target} {shapes[rule.target]} needs {tuple(expected)}")
    params[rule.target] = np.asarray(rule.convert(*(tensors[k] for k in rule.keys)), np.float32)
    used[rule.target] = rule.keys
  consumed = {k for keys in used.values() for k in keys}
  unused = sorted(k for k in tensors if k not in consumed and k not in ignored)
  if unused:
    raise CheckpointMismatch(f"{source}: key {unused[0]!r} maps onto no parameter of our model "
                             f"({len(unused)} such keys)")
  unfilled = sorted(set(shapes) - set(params))
  if unfilled:
    raise CheckpointMismatch(f"{source}: our parameter {unfilled[0]} has no checkpoint key")
  return params, ImportReport(used, {k: ignored[k] for k in sorted(ignored) if k in tensors})


def param_shapes(model_config: ml_collections.ConfigDict) -> dict[str, Shape]:
  """Flat `{path: shape}` of the parameters of the model `model_config` builds (no allocation)."""
  model = nnx.eval_shape(lambda: build_model(model_config, rngs=nnx.Rngs(0)))
  return {k: tuple(v.shape) for k, v in flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}
