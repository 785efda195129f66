"""Per-layer <-> stacked parameter layouts (scan over layers, `moe_jax.models.stacked`).

A model built with `scan_layers` holds `<prefix>/stacked/<path>` of shape `[depth, ...]` where
the same model without scan holds `<prefix>/<i>/<path>` for i = 0 .. depth - 1, e.g.
`decoder/blocks/stacked/attn/query/kernel [32, D, H*Dh]` <-> `decoder/blocks/{i}/attn/query/
kernel [D, H*Dh]`. The importers always give the per-layer layout (they build the checkpoint's
own config, which has no scan); `to_layout` then converts a flat parameter dict in either
layout to the layout of the model it fills (`moe_jax.vlm.pretrained`, `init_from`,
`hf_decoders.load_hf_decoder`), so a stage-1 run without scan hands over to a stage 2 with scan
and back. Nothing is dropped: keys that fit no stacked parameter pass through unchanged (the
caller's checks then name them), and a stacked parameter whose layers are only partly there is
a one-line CheckpointMismatch.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from moe_jax.checkpoints.tree import CheckpointMismatch
from moe_jax.parallel.sharding import STACKED

Shape = tuple[int, ...]


def split_stacked(key: str) -> tuple[str, str] | None:
  """(prefix, per-layer path) of a stacked key `<prefix>/stacked/<path>`, else None."""
  parts = key.split("/")
  if STACKED not in parts[1:-1]:
    return None
  j = parts.index(STACKED, 1)
  return "/".join(parts[:j]), "/".join(parts[j + 1:])


def layer_key(prefix: str, layer: int, path: str) -> str:
  """The per-layer key `<prefix>/<layer>/<path>`."""
  return f"{prefix}/{layer}/{path}"


def unstack(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`flat` in the per-layer layout: every stacked `[depth, ...]` entry split into its layers."""
  out = {}
  for key, value in flat.items():
    where = split_stacked(key)
    if where is None:
      out[key] = value
      continue
    value = np.asarray(value)
    out.update({layer_key(where[0], i, where[1]): value[i] for i in range(value.shape[0])})
  return out


def to_layout(flat: Mapping[str, np.ndarray], shapes: Mapping[str, Shape],
              source: str) -> dict[str, np.ndarray]:
  """`flat` (either layout) in the layout of the model whose flat parameter shapes are
  `shapes`: per-layer entries stacked where the model holds a stacked parameter, stacked
  entries split where it holds layers. CheckpointMismatch (naming `source`) if a stacked
  parameter finds some of its layers but not all."""
  out = unstack(flat)
  for key, shape in shapes.items():
    where = split_stacked(key)
    if where is None:
      continue
    names = [layer_key(where[0], i, where[1]) for i in range(shape[0])]
    found = [n for n in names if n in out]
    if not found:
      continue  # the caller reports the missing parameter
    if len(found) < len(names):
      missing = next(n for n in names if n not in out)
      raise CheckpointMismatch(f"{source}: no {missing} for our {key} (stacked over "
                               f"{shape[0]} layers)")
    out[key] = np.stack([np.asarray(out.pop(n)) for n in names])
  return out
