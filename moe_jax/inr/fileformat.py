"""The compressed file: a compact, versioned, checksummed binary (VERSION 2).

    field           encoding
    magic           4 bytes b"MOEC"
    version         uint8 (this module writes VERSION; version-1 files, b"MOECINR\\0" + JSON
                    header + raw floats, are still read)
    ndim, shape     uint8, then one varint per axis
    chunk_shape     one varint per axis: voxels per chunk (`moe_jax.inr.chunking`; = shape for
                    one chunk); N = prod(ceil(shape / chunk_shape)) chunks, each its own model
    dtype           uint8 index into DTYPES (the volume's numpy dtype, little-endian)
    range           lo, hi: zigzag varints for integer volumes, float64 for float volumes
                    (intensities were fitted as `2 (v - lo) / (hi - lo) - 1`)
    weights         uint8 storage (index into STORAGES: float32, float16, bfloat16, quantised),
                    uint8 bits, uint8 granularity (index into quantise.GRANULARITIES),
                    uint8 coder used (index into CODERS)
    model           varint length + records: the model config's fields that differ from
                    `model.model_config(kind)` (`model_diff`), `kind` first
    metadata        varint length + records: what the volume's format carries (NIfTI header
                    fields, TIFF resolution; `volumes.Volume.meta`), `affine` (16 float64) for a
                    volume whose affine no NIfTI field carries
    payload         varint length, then the chunk table: N - 1 varints, the byte length of
                    every record but the last (none for one chunk), then N records, one per chunk
                    in C order of the chunk grid, each decodable alone (ROI decode). A record:
                    quantised: per parameter tensor (leaf order of `nnx.state(model,
                    nnx.Param)`) its float16 lo[groups] then step[groups], then the codes of
                    every tensor (C order): raw LZMA2 of one byte per code (coder lzma; codes
                    of more than 8 bits: the low bytes of every code, then the high bytes) or
                    the bit-packed codes (coder none, `pack_codes`); float storage: the
                    little-endian floats, LZMA2-coded or raw
    crc32           uint32 little-endian of every byte before it

A record is a varint key (index into KEYS + 1; 0 = the key's UTF-8 name follows as varint length
+ bytes) and a typed value (tag byte, TAGS). A varint is unsigned LEB128; zigzag maps signed to
unsigned. Quantisation groups are per chunk: every chunk's tensors get their own (lo, step) per
tensor or output channel (chunks are fitted independently, their weight ranges differ). The
encoder uses lzma (for every record) only where the records come out smaller than packed, so the
payload never exceeds the packed size. Decoded sizes come from the model, so none is stored.

`decode` reads untrusted files: every field is checked against the file size and the bounds
below before anything is allocated; each problem is a one-line ValueError naming it.
"""
from __future__ import annotations

import dataclasses
import json
import lzma
import math
import struct
import zlib
from typing import Any

import ml_collections
import numpy as np

from moe_jax.inr import quantise
from moe_jax.inr.model import KINDS, model_config

MAGIC = b"MOEC"
VERSION = 2
DTYPES = ("u1", "i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8")
STORAGES = ("float32", "float16", "bfloat16", "quantised")
PARAM_DTYPES = STORAGES[:3]
CODERS = ("none", "lzma")  # config `entropy_coder`; the file records the one used
MAX_VOXELS = 1 << 34  # of the decoded volume (16 Gi voxels)
MAX_NDIM = 4
MAX_BLOCK_BYTES = 1 << 16  # model / metadata records (real ones are a few dozen bytes)
# Literal-only contexts (lc = lp = pb = 0): the codes are near i.i.d. symbols, not text
# (measured: 2-8% fewer bytes than the default lc = 3 on quantised MoEC weights, bench/RESULTS.md).
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 0, "lp": 0,
                  "pb": 0}]


def _lzma_filters(size: int) -> list[dict]:
  """`_LZMA_FILTERS` with a dictionary of the next power of two >= `size` bytes (4 KiB to
  64 MiB, preset 9's): the same stream for a record of `size` bytes (no match reaches further
  back than its start), without allocating preset 9's 674 MiB encoder / 64 MiB decoder per
  chunk record."""
  return [{**_LZMA_FILTERS[0], "dict_size": min(max(4096, 1 << max(size - 1, 1).bit_length()),
                                                1 << 26)}]


# Frozen for VERSION 2, append only (a record's key is its index here; any other name is
# spelled out).
MODEL_KEYS = (
    "kind", "width", "tail_width", "depth", "encoder_depth", "w0_first", "w0_hidden",
    "w0_expert", "gate_input", "grid", "moe.num_experts", "moe.router.k",
    "moe.router.renormalize", "moe.router.init_std", "moe.router.noise_std", "moe.dispatch",
    "moe.capacity_factor", "moe.min_capacity", "moe.dropless.block_size",
    "moe.dropless.backend", "moe.router.name", "gate", "gate_depth", "gate_width", "levels")
NIFTI_KEYS = tuple(f"nifti.{k}" for k in (  # the NIfTI-1 header's fields, in file order
    "sizeof_hdr", "data_type", "db_name", "extents", "session_error", "regular", "dim_info",
    "dim", "intent_p1", "intent_p2", "intent_p3", "intent_code", "datatype", "bitpix",
    "slice_start", "pixdim", "vox_offset", "scl_slope", "scl_inter", "slice_end", "slice_code",
    "xyzt_units", "cal_max", "cal_min", "slice_duration", "toffset", "glmax", "glmin",
    "descrip", "aux_file", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
    "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "intent_name",
    "magic"))
TIFF_KEYS = ("tiff.flavour", "tiff.x_resolution", "tiff.y_resolution", "tiff.resolution_unit",
             "tiff.spacing", "tiff.unit", "tiff.physical_size", "tiff.physical_unit", "affine",
             "nifti_sform_is_qform")
KEYS = MODEL_KEYS + NIFTI_KEYS + TIFF_KEYS
# Value tags: python int / float / str / bool, bytes, and numpy float32 / float64 / int arrays.
# Integral floats (most NIfTI affines and pixdims) are stored as zigzag varints, tags "f8=int",
# "f4[]=int" and "f8[]=int", and decode to the same float value and dtype.
TAGS = ("int", "float", "str", "false", "true", "bytes", "f4[]", "f8[]", "int[]", "list",
        "f8=int", "f4[]=int", "f8[]=int")


def param_dtype(name: str) -> np.dtype:
  """numpy dtype of float-stored parameters (bfloat16 through ml_dtypes, which jax ships)."""
  if name not in PARAM_DTYPES:
    raise ValueError(f"param_dtype={name!r}: use one of {PARAM_DTYPES}")
  import ml_dtypes
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name).newbyteorder("<")


@dataclasses.dataclass
class Weights:
  """How parameters are stored: `storage` in STORAGES; `bits`, `granularity` for quantised.
  `levels` (encode only, not stored: the decoder needs `bits`): codes in [0, levels], 0 =
  2^bits - 1 (the codec's rate control picks it to fill a byte budget)."""
  storage: str
  bits: int  # 0 for float storage
  granularity: str
  coder: str  # requested (encode) or used (decode)
  levels: int = 0

  def check(self) -> None:
    if self.storage not in STORAGES:
      raise ValueError(f"weight storage {self.storage!r}: use one of {STORAGES}")
    if self.storage == "quantised":
      quantise.check(self.bits, self.granularity)
      if not 0 <= self.levels < 1 << self.bits:
        raise ValueError(f"levels={self.levels} must be in [1, 2^{self.bits} - 1] (0 = all)")
    if self.coder not in CODERS:
      raise ValueError(f"entropy_coder={self.coder!r}: use one of {CODERS}")


@dataclasses.dataclass
class Header:
  shape: tuple[int, ...]
  dtype: np.dtype  # of the volume
  value_range: tuple[float, float]  # (lo, hi) of the fitted intensities
  model: dict[str, Any]  # `model_diff` of the model config
  weights: Weights
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)
  chunk_shape: tuple[int, ...] = ()  # voxels per chunk and axis; () = one chunk (the volume)

  @property
  def chunk_block(self) -> tuple[int, ...]:
    return tuple(self.chunk_shape) or tuple(self.shape)

  @property
  def num_chunks(self) -> int:
    """prod(ceil(shape / chunk_shape)), a python int (no overflow on crafted shapes)."""
    return math.prod(-(-int(n) // int(c)) for n, c in zip(self.shape, self.chunk_block))


@dataclasses.dataclass
class Compressed:
  header: Header
  payload: bytes  # records decoded into tensors by `decode_tensors` (needs the model's shapes)
  header_bytes: int  # bytes of the file that are not payload
  records: np.ndarray  # [N + 1] int64: record k is payload[records[k]:records[k + 1]]


def weights_from_config(config: ml_collections.ConfigDict) -> Weights:
  """Weights of a codec config: `quant_bits` (0 = floats of `param_dtype`),
  `quant_granularity`, `entropy_coder`."""
  if config.quant_bits:
    w = Weights("quantised", config.quant_bits, config.quant_granularity, config.entropy_coder)
  else:
    param_dtype(config.param_dtype)
    w = Weights(config.param_dtype, 0, config.quant_granularity, config.entropy_coder)
  w.check()
  return w


# --- model config diff ---------------------------------------------------------------------

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
    c.update_from_flattened_dict(diff)  # lists become tuples where the field is one
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    raise ValueError(f"model fields {sorted(diff)} do not fit a {diff['kind']} model config "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
  return c


# --- primitives ----------------------------------------------------------------------------

def _varint(n: int) -> bytes:
  if n < 0:
    raise ValueError(f"varint of negative {n}")
  out = bytearray()
  while True:
    out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
    n >>= 7
    if not n:
      return bytes(out)


def _zigzag(n: int) -> bytes:
  return _varint(2 * n if n >= 0 else -2 * n - 1)


def _bytes(b: bytes) -> bytes:
  return _varint(len(b)) + b


def _integral(a: np.ndarray) -> bool:
  """Whole numbers within +-2^31 (not -0.0), exactly representable as varints."""
  return bool(np.all(np.isfinite(a)) and np.all(a == np.rint(a)) and np.all(np.abs(a) < 2**31)
              and not np.any((a == 0) & np.signbit(a)))


def _value(v: Any) -> bytes:
  tag = lambda name: bytes([TAGS.index(name)])
  if isinstance(v, (bool, np.bool_)):
    return tag("true" if v else "false")
  if isinstance(v, (int, np.integer)):
    return tag("int") + _zigzag(int(v))
  if isinstance(v, float):
    if _integral(np.asarray([v])):
      return tag("f8=int") + _zigzag(int(v))
    return tag("float") + struct.pack("<d", v)
  if isinstance(v, str):
    return tag("str") + _bytes(v.encode())
  if isinstance(v, (bytes, np.bytes_)):
    return tag("bytes") + _bytes(bytes(v))
  if isinstance(v, (np.ndarray, np.floating)):
    a = np.asarray(v).reshape(-1)
    if a.dtype in (np.float32, np.float64) and _integral(a):
      return (tag("f4[]=int" if a.dtype == np.float32 else "f8[]=int") + _varint(a.size)
              + b"".join(_zigzag(int(x)) for x in a))
    if a.dtype == np.float32:
      return tag("f4[]") + _varint(a.size) + a.astype("<f4").tobytes()
    if a.dtype == np.float64:
      return tag("f8[]") + _varint(a.size) + a.astype("<f8").tobytes()
    if a.dtype.kind in "iu":
      return tag("int[]") + _varint(a.size) + b"".join(_zigzag(int(x)) for x in a)
  if isinstance(v, (list, tuple)):
    return tag("list") + _varint(len(v)) + b"".join(_value(x) for x in v)
  raise ValueError(f"cannot store a {type(v).__name__} value in the file's records")


def _records(d: dict[str, Any]) -> bytes:
  out = bytearray()
  for k, v in d.items():
    out += _varint(KEYS.index(k) + 1) if k in KEYS else _varint(0) + _bytes(k.encode())
    out += _value(v)
  return _bytes(bytes(out))


class _Damaged(ValueError):
  """A field that runs past its bounds (turned into the one-line file error by `decode`)."""


class _Reader:
  def __init__(self, blob: bytes, start: int = 0, end: int | None = None):
    self.blob, self.pos, self.end = blob, start, len(blob) if end is None else end

  def take(self, n: int, what: str) -> bytes:
    if n < 0 or self.pos + n > self.end:
      raise _Damaged(f"{what} runs past the end of its {self.end - self.pos} bytes")
    out = self.blob[self.pos:self.pos + n]
    self.pos += n
    return out

  def u8(self, what: str) -> int:
    return self.take(1, what)[0]

  def varint(self, what: str) -> int:
    n = shift = 0
    while True:
      b = self.u8(what)
      n |= (b & 0x7F) << shift
      if not b & 0x80:
        return n
      shift += 7
      if shift > 63:
        raise _Damaged(f"{what} is not a varint of at most 64 bits")

  def zigzag(self, what: str) -> int:
    n = self.varint(what)
    return n // 2 if n % 2 == 0 else -(n + 1) // 2

  def value(self, what: str, depth: int = 0) -> Any:
    tag = self.u8(what)
    if tag >= len(TAGS):
      raise _Damaged(f"{what} has an unknown value tag {tag}")
    name = TAGS[tag]
    if name in ("false", "true"):
      return name == "true"
    if name == "int":
      return self.zigzag(what)
    if name == "float":
      return struct.unpack("<d", self.take(8, what))[0]
    if name == "f8=int":
      return float(self.zigzag(what))
    if name == "str":
      try:
        return self.take(self.varint(what), what).decode()
      except UnicodeDecodeError:
        raise _Damaged(f"{what} is not UTF-8 text") from None
    if name == "bytes":
      return self.take(self.varint(what), what)
    n = self.varint(what)
    if name in ("f4[]", "f8[]"):
      size = 4 if name == "f4[]" else 8
      return np.frombuffer(self.take(n * size, what), f"<f{size}").astype(f"=f{size}")
    if depth > 4 or n > self.end - self.pos:  # every item takes at least one byte
      raise _Damaged(f"{what} nests too deep or lists more items than it has bytes")
    if name in ("int[]", "f4[]=int", "f8[]=int"):
      dtype = {"int[]": np.int64, "f4[]=int": np.float32, "f8[]=int": np.float64}[name]
      return np.array([self.zigzag(what) for _ in range(n)], dtype)
    return [self.value(what, depth + 1) for _ in range(n)]

  def records(self, what: str) -> dict[str, Any]:
    n = self.varint(f"{what} length")
    if n > MAX_BLOCK_BYTES:
      raise _Damaged(f"{what} length {n} exceeds the {MAX_BLOCK_BYTES}-byte limit")
    inner = _Reader(self.blob, self.pos, self.pos + n)
    self.take(n, what)
    out = {}
    while inner.pos < inner.end:
      key = inner.varint(f"{what} key")
      if key == 0:
        try:
          name = inner.take(inner.varint(f"{what} key"), f"{what} key").decode()
        except UnicodeDecodeError:
          raise _Damaged(f"{what} key is not UTF-8 text") from None
      elif key <= len(KEYS):
        name = KEYS[key - 1]
      else:
        raise _Damaged(f"{what} key {key} is unknown")
      out[name] = inner.value(f"{what} field {name}")
    return out


# --- parameter payload ---------------------------------------------------------------------

def _code_bytes(codes: np.ndarray) -> np.ndarray:
  """Codes `[n]` as `[n, 1 or 2]` little-endian bytes (uint8 / uint16 codes)."""
  return np.ascontiguousarray(codes.astype(codes.dtype.newbyteorder("<"))).view(
      np.uint8).reshape(codes.size, codes.dtype.itemsize)


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
  """Codes < 2^bits (`quantise.code_dtype(bits)`) as a little-endian bit stream,
  `ceil(n bits / 8)` bytes."""
  planes = np.unpackbits(_code_bytes(codes.reshape(-1)), axis=1, bitorder="little")[:, :bits]
  return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, n: int) -> np.ndarray:
  """Inverse of `pack_codes` for `n` codes (`quantise.code_dtype(bits)`)."""
  dtype = quantise.code_dtype(bits)
  planes = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[:n * bits]
  planes = np.pad(planes.reshape(n, bits), ((0, 0), (0, 8 * dtype.itemsize - bits)))
  return np.packbits(planes, axis=1, bitorder="little").view(dtype.newbyteorder("<")).reshape(
      -1).astype(dtype)


def _byte_planes(codes: np.ndarray) -> bytes:
  """The bytes lzma codes: one per code, or for 16-bit codes all low bytes then all high bytes
  (each plane's symbols are alike: the high plane is near-constant)."""
  return _code_bytes(codes).T.tobytes()


def _from_byte_planes(data: bytes, bits: int, n: int) -> np.ndarray:
  dtype = quantise.code_dtype(bits)
  planes = np.frombuffer(data, np.uint8).reshape(dtype.itemsize, n)
  return np.ascontiguousarray(planes.T).view(dtype.newbyteorder("<")).reshape(-1).astype(dtype)


def _uncode(data: bytes, coder: str, size: int, what: str) -> bytes:
  if coder == "none":
    out = data
  else:
    unpack = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=_lzma_filters(size))
    try:
      out = unpack.decompress(data, max_length=size)
      if not unpack.eof and len(out) == size and unpack.decompress(b"", max_length=1):
        raise _Damaged(f"{what} decodes to more than the {size} bytes the header's model needs")
    except lzma.LZMAError as e:
      raise _Damaged(f"{what} does not decode ({e})") from None
    if unpack.eof and unpack.unused_data:
      raise _Damaged(f"{what} has {len(unpack.unused_data)} bytes after its end")
  if len(out) != size:
    raise _Damaged(f"{what} decodes to {len(out)} bytes, the header's model needs {size}")
  return out


def _record(tensors: list[np.ndarray], w: Weights, coder: str) -> bytes:
  """One chunk's record: quantisation table + codes (lzma or packed), or its floats."""
  if w.storage != "quantised":
    raw = b"".join(np.ascontiguousarray(t, param_dtype(w.storage)).tobytes() for t in tensors)
    return _lzma(raw) if coder == "lzma" else raw
  qs = [quantise.quantise(t, w.bits, w.granularity, w.levels) for t in tensors]
  table = b"".join(np.concatenate([q.lo, q.step]).astype("<f2").tobytes() for q in qs)
  codes = (np.concatenate([q.codes.reshape(-1) for q in qs]) if qs
           else np.zeros(0, quantise.code_dtype(w.bits)))
  # lzma of byte planes (one byte per code up to 8 bits): what it models best.
  return table + (_lzma(_byte_planes(codes)) if coder == "lzma" else pack_codes(codes, w.bits))


def _lzma(raw: bytes) -> bytes:
  return lzma.compress(raw, lzma.FORMAT_RAW, filters=_lzma_filters(len(raw)))


def _payload(chunks: list[list[np.ndarray]], w: Weights) -> tuple[bytes, str]:
  """(payload, coder used) of every chunk's parameter tensors: the chunk table + records. lzma
  only where the records come out smaller than uncoded (the budget solver's upper bound)."""
  records = [_record(t, w, "none") for t in chunks]
  used = "none"
  if w.coder == "lzma":
    coded = [_record(t, w, "lzma") for t in chunks]
    if sum(map(len, coded)) < sum(map(len, records)):
      records, used = coded, "lzma"
  table = b"".join(_varint(len(r)) for r in records[:-1])
  return table + b"".join(records), used


def decode_tensors(compressed: Compressed, shapes: list[tuple[int, ...]], chunk: int,
                   source: str = "input") -> list[np.ndarray]:
  """The float32 parameter tensors of `shapes` (the header's model) of chunk `chunk`, from its
  record alone."""
  w = compressed.header.weights
  data = compressed.payload[compressed.records[chunk]:compressed.records[chunk + 1]]
  sizes = [int(np.prod(s)) for s in shapes]
  n, split = sum(sizes), np.cumsum(sizes)[:-1]
  try:
    if w.storage != "quantised":
      dtype = param_dtype(w.storage)
      raw = _uncode(data, w.coder, n * dtype.itemsize, "the parameter stream")
      flat = np.frombuffer(raw, dtype).astype(np.float32)
      return [x.reshape(s) for x, s in zip(np.split(flat, split), shapes)]
    groups = [quantise.num_groups(s, w.granularity) for s in shapes]
    reader = _Reader(data)
    tables = [np.frombuffer(reader.take(4 * g, "the quantisation table"), "<f2") for g in groups]
    rest = data[reader.pos:]
    if w.coder == "lzma":
      width = quantise.code_dtype(w.bits).itemsize
      codes = _from_byte_planes(_uncode(rest, "lzma", width * n, "the code stream"), w.bits, n)
    else:
      codes = unpack_codes(_uncode(rest, "none", -(-n * w.bits // 8), "the code stream"),
                           w.bits, n)
    if codes.size and codes.max() >= 1 << w.bits:
      raise _Damaged(f"the code stream holds code {codes.max()} >= 2^{w.bits}")
  except _Damaged as e:
    raise ValueError(f"{source}: {e}; the file is truncated or damaged") from None
  return [quantise.dequantise(quantise.Quantised(c.reshape(s), t[:g], t[g:]), w.granularity)
          for c, s, t, g in zip(np.split(codes, split), shapes, tables, groups)]


# --- file ----------------------------------------------------------------------------------

def encode(header: Header, chunks: list[list[np.ndarray]]) -> bytes:
  """File bytes of `header` and, per chunk (C order of the chunk grid), its model's parameter
  tensors (leaf order)."""
  header.weights.check()
  block = header.chunk_block
  if len(block) != len(header.shape) or not all(1 <= c <= n for c, n in zip(block,
                                                                              header.shape)):
    raise ValueError(f"chunk_shape={tuple(header.chunk_shape)} needs one size in [1, n] per axis "
                     f"of the volume {tuple(header.shape)} (or () for one chunk)")
  if len(chunks) != header.num_chunks:
    raise ValueError(f"{len(chunks)} chunks of parameters for a chunk grid of "
                     f"{header.num_chunks}")
  dtype = np.dtype(header.dtype).newbyteorder("<")
  code = dtype.str if dtype.itemsize > 1 else dtype.str[1:]
  if code not in DTYPES:
    raise ValueError(f"volume dtype {header.dtype} is not one of {DTYPES}")
  out = bytearray(MAGIC + bytes([VERSION, len(header.shape)]))
  out += b"".join(_varint(int(n)) for n in header.shape)
  out += b"".join(_varint(int(n)) for n in block) + bytes([DTYPES.index(code)])
  lo, hi = header.value_range
  out += (_zigzag(int(lo)) + _zigzag(int(hi)) if dtype.kind in "iu"
          else struct.pack("<2d", float(lo), float(hi)))
  w = header.weights
  payload, coder = _payload(chunks, w)
  out += bytes([STORAGES.index(w.storage), w.bits, quantise.GRANULARITIES.index(w.granularity),
                CODERS.index(coder)])
  out += _records(header.model) + _records(header.meta) + _bytes(payload)
  return bytes(out) + struct.pack("<I", zlib.crc32(out))


def _header(r: _Reader) -> Header:
  ndim = r.u8("ndim")
  if not 1 <= ndim <= MAX_NDIM:
    raise _Damaged(f"ndim {ndim} is not 1 to {MAX_NDIM}")
  shape = tuple(r.varint("shape") for _ in range(ndim))
  if min(shape) < 1 or int(np.prod(shape, dtype=object)) > MAX_VOXELS:
    raise _Damaged(f"shape {shape} is not positive or exceeds {MAX_VOXELS} voxels")
  chunk_shape = tuple(r.varint("chunk_shape") for _ in range(ndim))
  if not all(1 <= c <= n for c, n in zip(chunk_shape, shape)):
    raise _Damaged(f"chunk_shape {chunk_shape} is not in [1, shape {shape}] per axis")
  code = r.u8("dtype")
  if code >= len(DTYPES):
    raise _Damaged(f"dtype code {code} is unknown")
  dtype = np.dtype(DTYPES[code])
  if dtype.kind in "iu":
    value_range = (float(r.zigzag("range")), float(r.zigzag("range")))
  else:
    value_range = struct.unpack("<2d", r.take(16, "range"))
  if not all(np.isfinite(value_range)):
    raise _Damaged(f"range {value_range} is not finite")
  storage, bits, granularity, coder = (r.u8("weights") for _ in range(4))
  if storage >= len(STORAGES) or granularity >= len(quantise.GRANULARITIES) or coder >= len(
      CODERS):
    raise _Damaged(f"weight coding ({storage}, {bits}, {granularity}, {coder}) is unknown")
  weights = Weights(STORAGES[storage], bits, quantise.GRANULARITIES[granularity], CODERS[coder])
  try:
    weights.check()
  except ValueError as e:
    raise _Damaged(f"weight coding: {e}") from None
  model = r.records("model block")
  try:
    model_from_diff(model)
  except ValueError as e:
    raise _Damaged(f"model block: {e}") from None
  return Header(shape, dtype.newbyteorder("="), value_range, model, weights,
                r.records("metadata block"), chunk_shape)


def _decode_v1(blob: bytes, source: str) -> Compressed:
  """A version-1 file (moe_jax before the binary header): b"MOECINR\\0", uint16 version 1,
  uint32 length L, L bytes of zlib-compressed JSON header (model, shape, dtype, affine, range,
  param_dtype), then the raw little-endian float parameters."""
  damaged = "the file is truncated or damaged"
  prefix = struct.Struct("<8sHI")
  if len(blob) < prefix.size:
    raise ValueError(f"{source}: {len(blob)} bytes is too short for a version-1 header; {damaged}")
  _, version, length = prefix.unpack_from(blob)
  if version != 1 or length > MAX_BLOCK_BYTES or prefix.size + length > len(blob):
    raise ValueError(f"{source}: version-1 prefix (version {version}, header length {length}) "
                     f"does not fit the file's {len(blob)} bytes; {damaged}")
  inflate = zlib.decompressobj()
  try:
    header = json.loads(inflate.decompress(blob[prefix.size:prefix.size + length],
                                           MAX_BLOCK_BYTES))
    if inflate.unconsumed_tail or not inflate.eof:
      raise ValueError("over the size limit" if inflate.unconsumed_tail else "incomplete")
    shape, affine, (lo, hi) = tuple(header["shape"]), header["affine"], header["range"]
    weights = Weights(header["param_dtype"], 0, "tensor", "none")
    weights.check()
    if not (len(shape) and all(isinstance(n, int) and n >= 1 for n in shape)
            and all(isinstance(x, (int, float)) for x in (lo, hi))):
      raise ValueError(f"shape {shape} or range {[lo, hi]} is malformed")
    meta = {} if affine is None else {"affine": np.asarray(affine, np.float64).reshape(16)}
    out = Header(shape, np.dtype(header["dtype"]).newbyteorder("="), (float(lo), float(hi)),
                 header["model"], weights, meta)
    model_from_diff(out.model)
  except (zlib.error, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{source}: corrupt version-1 header ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:120]}); {damaged}") from None
  payload = blob[prefix.size + length:]
  return Compressed(out, payload, prefix.size + length, np.array([0, len(payload)], np.int64))


def decode(blob: bytes, source: str = "input") -> Compressed:
  """Parses a file's bytes (payload left coded); errors name what is wrong with `source`.
  Version-1 files (JSON header, raw float parameters) are read too."""
  if blob[:8] == b"MOECINR\0":
    return _decode_v1(blob, source)
  if len(blob) < len(MAGIC) + 1 or blob[:len(MAGIC)] != MAGIC:
    raise ValueError(f"{source} is not a moe_jax.inr compressed file (bad magic); pass a file "
                     "written by `python -m moe_jax.commands.inr compress`")
  if blob[len(MAGIC)] != VERSION:
    raise ValueError(f"{source} has format version {blob[len(MAGIC)]}; this moe_jax reads "
                     f"version {VERSION}: decompress it with the moe_jax that wrote it")
  damaged = "the file is truncated or damaged"
  if len(blob) < len(MAGIC) + 6:
    raise ValueError(f"{source}: {len(blob)} bytes is too short for a header; {damaged}")
  body, (crc,) = blob[:-4], struct.unpack("<I", blob[-4:])
  if zlib.crc32(body) != crc:
    raise ValueError(f"{source}: checksum mismatch (crc32 {zlib.crc32(body):08x}, stored "
                     f"{crc:08x}); {damaged}")
  r = _Reader(body, len(MAGIC) + 1)
  try:
    header = _header(r)
    payload = r.take(r.varint("payload length"), "payload")
  except _Damaged as e:
    raise ValueError(f"{source}: header {e}; {damaged}") from None
  if r.pos != len(body):
    raise ValueError(f"{source}: {len(body) - r.pos} bytes after the payload; {damaged}")
  try:
    records = _chunk_table(payload, header.num_chunks)
  except _Damaged as e:
    raise ValueError(f"{source}: {e}; {damaged}") from None
  return Compressed(header, payload, len(blob) - len(payload), records)


def _chunk_table(payload: bytes, num_chunks: int) -> np.ndarray:
  """Record offsets `[N + 1]` from the chunk table at the payload's start."""
  if num_chunks - 1 > len(payload):  # every length takes at least one byte
    raise _Damaged(f"{num_chunks} chunks need a chunk table of {num_chunks - 1} lengths, more "
                   f"than the payload's {len(payload)} bytes")
  r = _Reader(payload)
  lengths = [r.varint("the chunk table") for _ in range(num_chunks - 1)]
  offsets = np.cumsum([r.pos] + lengths + [0], dtype=np.int64)
  if offsets[-1] > len(payload):
    raise _Damaged(f"the chunk table's records end at byte {offsets[-1]}, past the payload's "
                   f"{len(payload)}")
  offsets[-1] = len(payload)
  return offsets
