"""Shardings of parameters, optimizer state and batches.

Parameters are sharded by `mesh.param_rules` (default `moe_jax.parallel.mesh.PARAM_RULES`): a
sequence of `(regex, spec)` pairs. Each parameter takes the spec of the first rule whose regex
`re.search`es its path, e.g. `blocks/2/mlp/experts/fc1_kernel`; a parameter no rule matches is
replicated. A spec is either

- a tuple, one entry per leading dimension as in `PartitionSpec`: None, an axis name or a tuple
  of axis names; `()` replicates. It must not be longer than the parameter's rank, and each
  dimension must divide over its axes. E.g. `("expert",)` shards an expert bank's E.
- an axis name (a string), e.g. `"fsdp"`: the parameter's largest dimension that the axis
  divides is sharded over it (FSDP; XLA gathers it where a layer needs it). Parameters of rank
  < 2, an axis of size 1 or no divisible dimension leave the parameter replicated.

Axis names are those of `moe_jax.parallel.mesh.AXES`; an axis the mesh lacks counts as size 1.
The defaults shard expert banks (`.../experts/...`) over `expert` (experts E) and `fsdp`
(hidden dimension F), and everything else FSDP-style over `fsdp`. In a config file, e.g. to keep the routers replicated:

    c.mesh.param_rules = ((r"/router/", ()),) + mesh.PARAM_RULES

Parameters of blocks stacked for scan over layers (`moe_jax.models.stacked`: a `STACKED`
component in the path, e.g. `decoder/blocks/stacked/attn/query/kernel [depth, D, H*Dh]`) take the
rules of their per-layer path and shape (the regexes see `.../blocks/stacked/attn/...`, the
specs `[D, H*Dh]`), with the leading layer axis never sharded: FSDP splits the same weight
dimension as without scan.

Rules are checked before anything compiles; a bad one is a one-line ValueError naming
`mesh.param_rules[i]`. Batches are sharded over `moe_jax.parallel.mesh.batch_axes(mesh)`.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax.parallel.mesh import AXES, PARAM_RULES, batch_axes

# Path component of variables stacked on a leading layer axis (`moe_jax.models.stacked.Stacked`).
STACKED = "stacked"
Spec = str | Sequence[str | Sequence[str] | None]
Rule = tuple[str, Spec]
_RULE_FORM = ("must be (regex, spec), spec an axis name or a tuple of per-dimension entries "
              "(None, an axis name or a tuple of axis names)")


def _bad(i: int, rule, problem: str) -> ValueError:
  return ValueError(f"mesh.param_rules[{i}] = {rule!r}: {problem}")


def _entry_axes(entry) -> tuple[str, ...] | None:
  """The axes of one spec entry, or None when it is not of the form None | str | tuple[str]."""
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  if isinstance(entry, (tuple, list)) and all(isinstance(a, str) for a in entry):
    return tuple(entry)
  return None


def check_rules(rules: Sequence[Rule]) -> list[tuple[re.Pattern, Rule]]:
  """Validates the form of every rule; returns (compiled regex, rule) pairs."""
  compiled = []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise _bad(i, rule, _RULE_FORM)
    try:
      regex = re.compile(rule[0])
    except re.error as e:
      raise _bad(i, rule, f"bad regex ({e}); fix the pattern") from None
    entries = [rule[1]] if isinstance(rule[1], str) else rule[1]
    if not isinstance(entries, (tuple, list)):
      raise _bad(i, rule, _RULE_FORM)
    for entry in entries:
      axes = _entry_axes(entry)
      if axes is None:
        raise _bad(i, rule, _RULE_FORM)
      for a in axes:
        if a not in AXES:
          raise _bad(i, rule, f"unknown mesh axis {a!r}; use one of {', '.join(AXES)}")
    compiled.append((regex, rule))
  return compiled


def path_name(path: tuple) -> str:
  """"a/b/c" for a key path (without the trailing `value` of an nnx Variable)."""
  names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
  if names and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
    names.pop()
  return "/".join(names)


def _largest_divisible(axis: str, shape: tuple[int, ...], sizes: dict[str, int]) -> P:
  n = sizes.get(axis, 1)
  dims = [d for d in range(len(shape)) if shape[d] % n == 0]
  if n == 1 or len(shape) < 2 or not dims:
    return P()
  spec = [None] * len(shape)
  spec[max(dims, key=lambda d: shape[d])] = axis  # the first of equally large ones
  return P(*spec)


def _rule_spec(i: int, rule: Rule, name: str, shape: tuple[int, ...],
               sizes: dict[str, int]) -> P:
  spec = rule[1]
  if isinstance(spec, str):
    return _largest_divisible(spec, shape, sizes)
  where = f"parameter {name} of shape {list(shape)}"
  if len(spec) > len(shape):
    raise _bad(i, rule, f"spec of {len(spec)} dimensions for the {len(shape)}-D {where}; "
                        "shorten the spec or narrow the regex")
  entries = []
  for d, entry in enumerate(spec):
    axes = tuple(a for a in _entry_axes(entry) if a in sizes)
    n = math.prod(sizes[a] for a in axes)
    if shape[d] % n:
      raise _bad(i, rule, f"dimension {d} (size {shape[d]}) of {where} does not divide over "
                          f"{axes} ({n} devices); change the spec, the regex or the mesh")
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*entries)


def _spec(compiled: list[tuple[re.Pattern, Rule]], path: tuple, shape: tuple[int, ...],
          mesh: jax.sharding.Mesh) -> P:
  name = path_name(path)
  stacked = STACKED in name.split("/")
  for i, (regex, rule) in enumerate(compiled):
    if regex.search(name):
      spec = _rule_spec(i, rule, name, shape[1:] if stacked else shape, dict(mesh.shape))
      return P(None, *spec) if stacked else spec
  return P()


def param_spec(path: tuple, shape: tuple[int, ...], mesh: jax.sharding.Mesh,
               rules: Sequence[Rule] = PARAM_RULES) -> P:
  """The PartitionSpec of the parameter at key path `path` under `rules`."""
  return _spec(check_rules(rules), path, shape, mesh)


def tree_shardings(tree, mesh: jax.sharding.Mesh, rules: Sequence[Rule] = PARAM_RULES):
  """NamedShardings for a tree of (abstract) parameters, by `rules` (see the module docstring)."""
  compiled = check_rules(rules)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(
          mesh, _spec(compiled, path, getattr(x, "shape", ()), mesh)), tree)


def optimizer_shardings(tx: optax.GradientTransformation, opt_state, param_shardings,
                        mesh: jax.sharding.Mesh):
  """Optimizer-state shardings: moments follow their parameters; counters are replicated;
  the empty `optax.MaskedNode`s of masked (frozen) parameters stay as they are."""
  return optax.tree_map_params(
      tx, lambda x, s: x if isinstance(x, optax.MaskedNode) else s, opt_state, param_shardings,
      transform_non_params=lambda _: NamedSharding(mesh, P()),
      is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
