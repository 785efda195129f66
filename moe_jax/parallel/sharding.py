"""Shardings of parameters, optimizer state and batches, from one rule set.

Rules (by parameter path): expert banks (`.../experts/...`, leading axis E) are sharded over
`expert`; every other parameter with a dimension divisible by the `fsdp` axis is sharded over
`fsdp` on its largest such dimension (FSDP; XLA gathers it where a layer needs it), otherwise
replicated. Batches are sharded over all batch axes (data, fsdp, expert).
"""
from __future__ import annotations

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp", "expert")


def param_spec(path: tuple, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
  names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
  if "experts" in names and len(shape) >= 2 and shape[0] % mesh.shape["expert"] == 0:
    return P("expert")
  fsdp = mesh.shape.get("fsdp", 1)
  if fsdp > 1 and len(shape) >= 2:
    dims = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d]) if shape[d] % fsdp == 0]
    if dims:
      spec = [None] * len(shape)
      spec[dims[0]] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree, mesh: jax.sharding.Mesh):
  """NamedShardings for a tree of (abstract) arrays, by the rules above."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, param_spec(path, getattr(x, "shape", ()), mesh)), tree)


def optimizer_shardings(tx: optax.GradientTransformation, opt_state, param_shardings,
                        mesh: jax.sharding.Mesh):
  """Optimizer-state shardings: moments follow their parameters; counters are replicated;
  the empty `optax.MaskedNode`s of masked (frozen) parameters stay as they are."""
  return optax.tree_map_params(
      tx, lambda x, s: x if isinstance(x, optax.MaskedNode) else s, opt_state, param_shardings,
      transform_non_params=lambda _: NamedSharding(mesh, P()),
      is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.axis_names)))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
