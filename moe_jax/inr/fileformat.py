"""The compressed file: a flat, versioned binary.

    offset  size  content
    0       8     magic b"MOECINR\\0"
    8       2     format version, uint16 little-endian (this module writes VERSION)
    10      4     header length L in bytes, uint32 little-endian
    14      L     zlib-compressed UTF-8 JSON header (below)
    14 + L  rest  parameters, chunk after chunk (C order of the chunk grid), each chunk's
                  P = num_params(model) values at offset k P: every nnx.Param leaf of the model,
                  in `jax.tree.leaves` order of `nnx.state(model, nnx.Param)`, C order,
                  little-endian `param_dtype`, no padding (fixed-size records are the chunk table)

Header keys: `model` (the model config's fields that differ from `model.model_config(kind)`,
dotted paths, plus `kind`), `shape` and `dtype` (numpy `dtype.str`) of the volume, `affine`
(16 floats, row-major, or null), `range` ([lo, hi]: intensities were fitted as
`2 (v - lo) / (hi - lo) - 1`), `param_dtype` (float32, float16 or bfloat16), optional
`chunk_shape` (voxels per chunk and axis, `moe_jax.inr.chunking`; absent = one chunk).

`decode` reads untrusted files: every header field is checked against the file size and the
bounds below before anything is allocated, and each problem is a one-line ValueError.
"""
from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from typing import Any

import ml_collections
import numpy as np

from moe_jax.inr.model import KINDS, model_config

MAGIC = b"MOECINR\0"
VERSION = 1
PARAM_DTYPES = ("float32", "float16", "bfloat16")
_PREFIX = struct.Struct("<8sHI")
MAX_HEADER_BYTES = 1 << 20  # compressed and decompressed (real headers are a few hundred bytes)
MAX_VOXELS = 1 << 34  # of the decoded volume (16 Gi voxels)
MAX_NDIM = 4


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
  """Inverse of `model_diff`; ValueError naming the field for a diff no model config has."""
  if not isinstance(diff, dict) or diff.get("kind") not in KINDS:
    raise ValueError(f"model.kind must be one of {KINDS}")
  c = model_config(diff["kind"])
  c.lock()  # an unknown field is an error, not a new one
  try:
    c.update_from_flattened_dict(diff)  # JSON lists become tuples where the field is one
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    raise ValueError(f"model fields {sorted(diff)} do not fit a {diff['kind']} model config "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
  return c


def encode(compressed: Compressed) -> bytes:
  header = zlib.compress(json.dumps(compressed.header, separators=(",", ":")).encode(), 9)
  params = np.ascontiguousarray(compressed.params,
                                param_dtype(compressed.header["param_dtype"]))
  return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + params.tobytes()


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def _check_header(header: Any) -> str | None:
  """What is wrong with a decoded header, else None."""
  if not isinstance(header, dict):
    return "the header is not a JSON object"
  missing = {"model", "shape", "dtype", "affine", "range", "param_dtype"} - set(header)
  if missing:
    return f"the header lacks {sorted(missing)}"
  shape = header["shape"]
  if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_NDIM
      or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)):
    return f"header shape {str(shape)[:80]} is not 1 to {MAX_NDIM} positive integers"
  if int(np.prod(shape, dtype=object)) > MAX_VOXELS:
    return f"header shape {shape} exceeds {MAX_VOXELS} voxels"
  try:
    dtype = np.dtype(header["dtype"])
  except (TypeError, ValueError):
    dtype = None
  if dtype is None or dtype.kind not in "iuf":
    return f"header dtype {str(header['dtype'])[:40]!r} is not a numeric numpy dtype"
  affine = header["affine"]
  if affine is not None and not (isinstance(affine, list) and len(affine) == 16
                                 and all(map(_number, affine))):
    return "header affine is neither null nor 16 finite numbers"
  lo_hi = header["range"]
  if not (isinstance(lo_hi, list) and len(lo_hi) == 2 and all(map(_number, lo_hi))):
    return "header range is not 2 finite numbers"
  chunk = header.get("chunk_shape", shape)
  if (not isinstance(chunk, list) or len(chunk) != len(shape)
      or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in chunk)):
    return f"header chunk_shape {str(chunk)[:80]} is not {len(shape)} positive integers"
  if header["param_dtype"] not in PARAM_DTYPES:
    return f"header param_dtype {str(header['param_dtype'])[:40]!r} is not one of {PARAM_DTYPES}"
  try:
    model_from_diff(header["model"])
  except ValueError as e:
    return f"header {e}"
  return None


def decode(blob: bytes, source: str = "input") -> Compressed:
  """Parses a file's bytes; errors name what is wrong with `source` (one line each)."""
  if len(blob) < _PREFIX.size or blob[:8] != MAGIC:
    raise ValueError(f"{source} is not a moe_jax.inr compressed file (bad magic); pass a file "
                     "written by `python -m moe_jax.commands.inr compress`")
  _, version, length = _PREFIX.unpack_from(blob)
  if version != VERSION:
    raise ValueError(f"{source} has format version {version}; this moe_jax reads version "
                     f"{VERSION}: decompress it with the moe_jax that wrote it")
  damaged = "the file is truncated or damaged"
  if length > MAX_HEADER_BYTES or _PREFIX.size + length > len(blob):
    raise ValueError(f"{source}: header length {length} exceeds the file's {len(blob)} bytes "
                     f"or the {MAX_HEADER_BYTES}-byte limit; {damaged}")
  inflate = zlib.decompressobj()
  try:
    text = inflate.decompress(blob[_PREFIX.size:_PREFIX.size + length], MAX_HEADER_BYTES)
    if inflate.unconsumed_tail or not inflate.eof:
      raise ValueError("over the size limit" if inflate.unconsumed_tail else "incomplete")
    header = json.loads(text)
  except (zlib.error, ValueError) as e:
    raise ValueError(f"{source}: corrupt header ({str(e).splitlines()[0][:120]}); "
                     f"{damaged}") from None
  problem = _check_header(header)
  if problem:
    raise ValueError(f"{source}: {problem}; {damaged}")
  dtype = param_dtype(header["param_dtype"])
  data = blob[_PREFIX.size + length:]
  if len(data) % dtype.itemsize:
    raise ValueError(f"{source}: {len(data)} parameter bytes is not a whole number of "
                     f"{header['param_dtype']} values; {damaged}")
  return Compressed(header, np.frombuffer(data, dtype))
