"""Flat parameter dicts keyed by "/"-joined paths, and the one error every importer raises."""
from __future__ import annotations

from typing import Any, Mapping

from flax import traverse_util


class CheckpointMismatch(ValueError):
  """A checkpoint does not fit the model; the one-line message names the first offending key."""


def flatten(tree: Mapping) -> dict[str, Any]:
  """Nested pure dict (`nnx.to_pure_dict`) -> `{"a/0/b": leaf}`."""
  return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Inverse of `flatten` (digit path parts become int keys, as nnx.List's are)."""
  return traverse_util.unflatten_dict(
      {tuple(int(p) if p.isdigit() else p for p in k.split("/")): v for k, v in flat.items()})
