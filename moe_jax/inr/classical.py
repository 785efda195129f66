"""Classical codecs at a byte budget: the baselines an INR codec has to beat at equal bytes.

    stream = at_budget("jpeg2000", data, max_bytes)   # best quality whose stream fits
    decoded = decode(stream.blob)

Codecs (each a monotone quality knob; `at_budget` bisects it):
- `spline`: downsample every axis by a factor f (scipy.ndimage.zoom, cubic B-spline, order 3),
  store the small volume as uint16 codes, zlib level 9; decode = cubic-spline zoom back. Knob f.
- `jpeg2000`: slices along the last axis tiled into one 2-D mosaic (one codestream, so the codec
  header is paid once), OpenJPEG J2K through `imagecodecs`. Knob: the target PSNR of OpenJPEG's
  distortion-ratio rate control (`level`), at the volume's bit depth.
- `jpegxl`: the same mosaic, libjxl (VarDCT) through `imagecodecs`. Knob: butteraugli distance.

Values become uint16 codes `round((v - lo) / step)`, step 1 for integer volumes whose range fits
16 bits (lossless so far), else `(hi - lo) / 65535`. Every stream starts with a small binary
header (codec, dtype, shape, lo, step, mosaic/small shape): the byte count is the whole stream.
`imagecodecs` is an optional bench dependency (pyproject extra `[bench]`); `spline` needs scipy
only. No HEVC/AV1 codec is here: the `imagecodecs` wheel has no HEVC encoder and its AVIF
encoder stays lossless on 16-bit grayscale mosaics (measured).
"""
from __future__ import annotations

import dataclasses
import math
import struct
import zlib

import numpy as np
from scipy import ndimage

CODECS = ("spline", "jpeg2000", "jpegxl")
_HEAD = struct.Struct("<B3sBdd")  # codec index, dtype.str, ndim, lo, step
_SEARCH_STEPS = 16


@dataclasses.dataclass
class Stream:
  codec: str
  knob: float  # the quality setting that met the budget
  blob: bytes


def _codes(data: np.ndarray) -> tuple[np.ndarray, float, float, int]:
  """uint16 codes, lo, step and the bit depth they need."""
  lo, hi = float(np.min(data)), float(np.max(data))
  exact = data.dtype.kind in "iu" and hi - lo < 65536
  step = 1.0 if exact or hi == lo else (hi - lo) / 65535
  codes = np.rint((data.astype(np.float64) - lo) / step).astype(np.uint16)
  return codes, lo, step, max(int(codes.max()).bit_length(), 1)


def _tiles(codes: np.ndarray) -> tuple[np.ndarray, int]:
  """Volume codes `[n_1, ..., n_{d-1}, S]` -> mosaic `[rows * A, cols * B]` of its S slices
  (each slice `[A = n_1, B = prod(n_2..n_{d-1})]`), cols = ceil(sqrt(S)); empty tiles are 0."""
  S = codes.shape[-1]
  slices = np.moveaxis(codes, -1, 0).reshape(S, codes.shape[0], -1)
  cols = math.ceil(math.sqrt(S))
  rows = -(-S // cols)
  grid = np.zeros((rows * cols,) + slices.shape[1:], np.uint16)
  grid[:S] = slices
  A, B = slices.shape[1:]
  return grid.reshape(rows, cols, A, B).transpose(0, 2, 1, 3).reshape(rows * A, cols * B), cols


def _untile(mosaic: np.ndarray, shape: tuple[int, ...], cols: int) -> np.ndarray:
  S, A = shape[-1], shape[0]
  B = math.prod(shape[1:-1])
  rows = mosaic.shape[0] // A
  slices = mosaic.reshape(rows, A, cols, B).transpose(0, 2, 1, 3).reshape(rows * cols, A, B)[:S]
  return np.moveaxis(slices.reshape((S,) + tuple(shape[:-1])), 0, -1)


def _image_codec(name: str):
  try:
    import imagecodecs
  except ImportError:
    raise ValueError(f"codec {name!r} needs imagecodecs: pip install 'moe_jax[bench]'") from None
  return imagecodecs


def encode(codec: str, data: np.ndarray, knob: float) -> bytes:
  """The stream of `data` (any ndim >= 2 for the image codecs) at quality `knob`."""
  if codec not in CODECS:
    raise ValueError(f"codec={codec!r} is unknown; use one of {CODECS}")
  codes, lo, step, bits = _codes(data)
  head = _HEAD.pack(CODECS.index(codec), data.dtype.str.encode(), data.ndim, lo, step)
  head += struct.pack(f"<{data.ndim}I", *data.shape)
  if codec == "spline":
    small = tuple(max(1, round(n * knob)) for n in data.shape)
    low = ndimage.zoom(codes.astype(np.float64), [s / n for s, n in zip(small, data.shape)],
                       order=3, mode="nearest", grid_mode=True)
    low = np.clip(np.rint(low), 0, 65535).astype("<u2")
    return head + struct.pack(f"<{data.ndim}I", *small) + zlib.compress(low.tobytes(), 9)
  if data.ndim < 2:
    raise ValueError(f"codec {codec!r} codes slices: the volume needs >= 2 axes")
  ic = _image_codec(codec)
  mosaic, cols = _tiles(codes)
  if codec == "jpeg2000":
    payload = ic.jpeg2k_encode(mosaic, level=knob, codecformat="j2k", bitspersample=bits)
  else:  # libjxl takes 8-bit samples as uint8 only
    payload = ic.jpegxl_encode(mosaic.astype(np.uint8) if bits <= 8 else mosaic, distance=knob,
                               bitspersample=bits)
  return head + struct.pack("<H", cols) + payload


def decode(blob: bytes) -> np.ndarray:
  """The volume a stream of `encode` holds (original shape and dtype)."""
  index, dtype, ndim, lo, step = _HEAD.unpack_from(blob)
  codec, dtype, pos = CODECS[index], np.dtype(dtype.decode()), _HEAD.size
  shape = struct.unpack_from(f"<{ndim}I", blob, pos)
  pos += 4 * ndim
  if codec == "spline":
    small = struct.unpack_from(f"<{ndim}I", blob, pos)
    low = np.frombuffer(zlib.decompress(blob[pos + 4 * ndim:]), "<u2").reshape(small)
    codes = ndimage.zoom(low.astype(np.float64), [n / s for n, s in zip(shape, small)],
                         order=3, mode="nearest", grid_mode=True)
  else:
    (cols,), ic = struct.unpack_from("<H", blob, pos), _image_codec(codec)
    payload = blob[pos + 2:]
    mosaic = ic.jpeg2k_decode(payload) if codec == "jpeg2000" else ic.jpegxl_decode(payload)
    codes = _untile(np.asarray(mosaic), shape, cols).astype(np.float64)
  values = codes * step + lo
  if dtype.kind in "iu":
    info = np.iinfo(dtype)
    values = np.clip(np.rint(values), info.min, info.max)
  return values.astype(dtype)


def _knob_range(codec: str, data: np.ndarray) -> tuple[float, float]:
  """(lowest, highest) quality knob; bytes grow from the first to the second."""
  if codec == "spline":
    return 1.0 / max(data.shape), 1.0
  if codec == "jpeg2000":
    return 1.0, 120.0  # target PSNR (dB)
  return 25.0, 0.05  # butteraugli distance: 25 is libjxl's coarsest


def at_budget(codec: str, data: np.ndarray, max_bytes: int) -> Stream:
  """The highest-quality stream of `data` with at most `max_bytes` bytes (bisection of the
  knob); ValueError when even the lowest quality does not fit."""
  low, high = _knob_range(codec, data)
  blob = encode(codec, data, low)
  if len(blob) > max_bytes:
    raise ValueError(f"codec {codec!r}: the smallest stream is {len(blob)} bytes, over the "
                     f"{max_bytes}-byte budget: lower the ratio")
  best = Stream(codec, low, blob)
  top = encode(codec, data, high)
  if len(top) <= max_bytes:
    return Stream(codec, high, top)
  for _ in range(_SEARCH_STEPS):
    mid = 0.5 * (low + high)
    blob = encode(codec, data, mid)
    if len(blob) <= max_bytes:
      low, best = mid, Stream(codec, mid, blob)
    else:
      high = mid
  return best
