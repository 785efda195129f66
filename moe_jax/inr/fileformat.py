"""The compressed file: a flat, versioned binary.

    offset  size  content
    0       8     magic b"MOECINR\\0"
    8       2     format version, uint16 little-endian (this module writes VERSION)
    10      4     header length L in bytes, uint32 little-endian
    14      L     zlib-compressed UTF-8 JSON header (below)
    14 + L  rest  parameters: every nnx.Param leaf of the model, in `jax.tree.leaves` order of
                  `nnx.state(model, nnx.Param)`, C order, little-endian `param_dtype`, no padding

Header keys: `model` (the model config's fields that differ from `model.model_config(kind)`,
dotted paths, plus `kind`), `shape` and `dtype` (numpy `dtype.str`) of the volume, `affine`
(16 floats, row-major, or null), `range` ([lo, hi]: intensities were fitted as
`2 (v - lo) / (hi - lo) - 1`), `param_dtype` (float32, float16 or bfloat16).
"""
from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from typing import Any

import ml_collections
import numpy as np

from moe_jax.inr.model import model_config

MAGIC = b"MOECINR\0"
VERSION = 1
PARAM_DTYPES = ("float32", "float16", "bfloat16")
_PREFIX = struct.Struct("<8sHI")


def param_dtype(name: str) -> np.dtype:
  """numpy dtype of stored parameters (bfloat16 through ml_dtypes, which jax ships)."""
  if name not in PARAM_DTYPES:
    raise ValueError(f"param_dtype={name!r}: use one of {PARAM_DTYPES}")
  import ml_dtypes
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name).newbyteorder("<")


@dataclasses.dataclass
class Compressed:
  header: dict[str, Any]
  params: np.ndarray  # flat, dtype param_dtype(header["param_dtype"])


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def model_diff(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """Fields of model config `c` that differ from its kind's defaults, as {dotted path: value}."""
  default = _flat(model_config(c.kind).to_dict())
  diff = {k: v for k, v in _flat(c.to_dict()).items() if default.get(k) != v}
  return {"kind": c.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in diff.items()}}


def model_from_diff(diff: dict[str, Any]) -> ml_collections.ConfigDict:
  """Inverse of `model_diff`."""
  c = model_config(diff["kind"])
  c.update_from_flattened_dict(diff)  # JSON lists become tuples where the field is one
  return c


def encode(compressed: Compressed) -> bytes:
  header = zlib.compress(json.dumps(compressed.header, separators=(",", ":")).encode(), 9)
  params = np.ascontiguousarray(compressed.params,
                                param_dtype(compressed.header["param_dtype"]))
  return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + params.tobytes()


def decode(blob: bytes, source: str = "input") -> Compressed:
  """Parses a file's bytes; errors name what is wrong with `source`."""
  if len(blob) < _PREFIX.size or blob[:8] != MAGIC:
    raise ValueError(f"{source} is not a moe_jax.inr compressed file (bad magic); pass a file "
                     "written by `python -m moe_jax.commands.inr compress`")
  _, version, length = _PREFIX.unpack_from(blob)
  if version != VERSION:
    raise ValueError(f"{source} has format version {version}; this moe_jax reads version "
                     f"{VERSION}: decompress it with the moe_jax that wrote it")
  try:
    header = json.loads(zlib.decompress(blob[_PREFIX.size:_PREFIX.size + length]))
  except (zlib.error, ValueError) as e:
    raise ValueError(f"{source}: corrupt header ({e}); the file is truncated or damaged") from e
  params = np.frombuffer(blob[_PREFIX.size + length:], param_dtype(header["param_dtype"]))
  return Compressed(header, params)
