"""compress: volume -> chunks -> solved widths -> trained INRs -> file bytes; decompress: bytes ->
the volume, a region of interest of it, or either at another resolution.

The volume is tiled into chunks (`config.chunk_shape`, `chunking.Tiling`; () = one chunk), each
coded by its own model of the same config, widths solved for the same per-chunk budget
((original bytes / ratio - header - chunk table - N quantisation tables) / N chunks, at the
stored bytes per parameter; `budget.fit_to_budget` re-solves with the coded size measured).
`config.chunk_batch` chunks train at once (one vmapped step, `fitting`). Every chunk's tensors are
quantised with their own groups and coded into their own record (`fileformat`), so a chunk is
decoded alone. Memory is bounded by the chunk batch (parameters, optimizer state, the float32
training targets of its chunks' voxels, a batch of coordinates) and the volume itself: no
full-volume coordinate grid is made (with one chunk, the targets are a float32 copy of the volume).
TreeINR (kind 'octree') is one octree over one chunk: it takes no `chunk_shape`.

Rate control: the widths are solved for `quant_bits`-bit codes, so the coded file (entropy coded:
smaller) lands under the budget; after training, `encode_to_budget` raises the number of code
levels (finer steps, up to `2^quant_max_bits - 1`) to the largest that still fits, or lowers it
(coarser steps) when the file at `quant_bits` is over: the file lands within a few bytes of the
budget from one training, never over it (when no level count fits, the smallest model is over
the budget and `compress` warns).

The quality reported by `compress` is measured on `decompress(file)` itself (quantised
parameters, rounding to the volume's dtype, physical values of a scaled NIfTI), so it is what a
reader of the file gets.
"""
from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from moe_jax.inr import (budget, chunking, fileformat, fitting, metrics, model as model_lib,
                         quantise, volumes)
from moe_jax.inr.volumes import Volume
from moe_jax.train.metrics import progress_bar


RATIO_SLACK = 1.05  # compress warns when the file is this much smaller than the ratio allows
# A bound on decoded parameters per payload byte, checked before anything is decoded (real files
# store >= 2 bits per parameter; lzma would reach 64 only on near-constant weights).
MAX_PARAMS_PER_BYTE = 64
# Metadata that places the voxels (NIfTI qform / sform, pixdim; TIFF spacing): left out of a
# ROI or rescaled decode, whose affine is recomputed for its own grid.
_GEOMETRY_KEYS = ("nifti.pixdim", "nifti.qform_code", "nifti.sform_code", "nifti.quatern_",
                  "nifti.qoffset_", "nifti.srow_", volumes.SFORM_IS_QFORM, "tiff.x_resolution",
                  "tiff.y_resolution", "tiff.resolution_unit", "tiff.spacing", "tiff.unit",
                  "tiff.physical_")


def tiling_for(c: ml_collections.ConfigDict, shape: Sequence[int],
               chunk_shape: Sequence[int]) -> chunking.Tiling:
  """Chunks of `chunk_shape` (() = one); inside one chunk, BlockINR's or TreeINR's block grid."""
  ndim = len(shape)
  if c.kind == "octree" and chunking.chunk_grid(shape, chunk_shape) != (1,) * ndim:
    raise ValueError(f"chunk_shape={tuple(chunk_shape)} with model.kind='octree': TreeINR's "
                     "octree partitions one chunk; set chunk_shape=() (or kind 'blocks' / 'moec')")
  grid = (1,) * ndim if c.kind == "moec" else model_lib.block_grid(c, ndim)
  return chunking.Tiling(shape, chunk_shape, grid)


def _header(volume: Volume, c: ml_collections.ConfigDict, lo: float, hi: float,
            weights: fileformat.Weights, tiling: chunking.Tiling) -> fileformat.Header:
  """The file header: the volume's metadata, and its affine where no NIfTI field carries it."""
  meta = dict(volume.meta)
  if volume.affine is not None and not any(k.startswith("nifti.") for k in meta):
    meta["affine"] = np.asarray(volume.affine, np.float64).reshape(-1)
  return fileformat.Header(tuple(volume.data.shape), volume.data.dtype, (lo, hi),
                           fileformat.model_diff(c), weights, meta, tiling.chunk_block)


def _bytes_per_param(weights: fileformat.Weights) -> float:
  """Upper bound of the stored bytes per parameter (packed codes or floats, before coding)."""
  if weights.storage == "quantised":
    return weights.bits / 8
  return fileformat.param_dtype(weights.storage).itemsize


def _table_bytes(c: ml_collections.ConfigDict, ndim: int, weights: fileformat.Weights) -> int:
  """Bytes of one chunk's quantisation table (float16 lo, step per group) of model `c`."""
  if weights.storage != "quantised":
    return 0
  abstract = nnx.eval_shape(lambda: model_lib.build(c, ndim, rngs=nnx.Rngs(0)))
  return 4 * sum(quantise.num_groups(p.shape, weights.granularity)
                 for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def solve_model(volume: Volume, ratio: float, config: ml_collections.ConfigDict,
                bytes_per_param: float | None = None
                ) -> tuple[ml_collections.ConfigDict, int, chunking.Tiling]:
  """The model config with widths solved for `ratio` at `bytes_per_param` (default: the upper
  bound of `config`'s weight storage), the per-chunk parameter budget it met, and the tiling."""
  c, shape = config.model, volume.data.shape
  tiling = tiling_for(c, shape, config.chunk_shape)
  N = tiling.num_chunks
  weights = fileformat.weights_from_config(config)
  bpp = _bytes_per_param(weights) if bytes_per_param is None else bytes_per_param
  lo, hi = float(np.min(volume.data)), float(np.max(volume.data))
  # Header bytes with the widest width digits and empty records; the chunk table's lengths
  # and the payload length take up to the varint size of a chunk's (whole file's) budget.
  wide = ml_collections.ConfigDict(c.to_dict())
  wide.width = wide.tail_width = 1 << 20
  empty = fileformat.encode(_header(volume, wide, lo, hi, weights, tiling), [[]] * N)
  budget_bytes = int(volume.data.nbytes / ratio) + 1
  overhead = (len(empty) + (N - 1) * (len(fileformat._varint(budget_bytes // N)) - 1)
              + len(fileformat._varint(budget_bytes)))
  table = 0
  for _ in range(3):  # the table grows with the widths (per-channel groups): settle it
    per_chunk = budget.param_budget(volume.data.nbytes, ratio, bpp, overhead + N * table) // N
    solved = budget.solve_widths(c, len(shape), per_chunk)
    if _table_bytes(solved, len(shape), weights) <= table:
      break
    table = _table_bytes(solved, len(shape), weights)
  return solved, per_chunk, tiling


def _train_chunks(volume: Volume, c: ml_collections.ConfigDict, tiling: chunking.Tiling,
                  config: ml_collections.ConfigDict, log: Callable[[str], None] | None
                  ) -> tuple[list[list[np.ndarray]], float]:
  """Every chunk's trained float32 parameter tensors (leaf order), chunk_batch chunks trained at
  once, and the mean training MSE of the last steps."""
  tc, N = config.train, tiling.num_chunks
  B = min(config.chunk_batch, N)
  lo, hi = float(np.min(volume.data)), float(np.max(volume.data))
  fitter = fitting.ChunkFitter(c, volume.data.ndim, tc)
  chunks, mses = [], []
  bar = progress_bar(0, N * tc.steps, unit="chunk-step")
  with bar:
    for index, first in enumerate(range(0, N, B)):
      real = min(B, N - first)
      ids = np.minimum(np.arange(first, first + B), N - 1)  # a short batch repeats a chunk
      sampler = fitting.sampler_for(tiling.cells, tiling.cells_of(ids), volume.data, lo, hi, tc,
                                    tc.seed + index)

      def on_call(done, count, mse, first=first, real=real):
        bar.update(real * count)
        every = tc.log_every
        if log is not None and every and done // every > (done - count) // every:
          log(f"chunks {first}-{first + real - 1}/{N}  step {done}/{tc.steps}  "
              f"mse {float(np.mean(mse[:real])):.3e}")

      params, mse = fitter.fit(ids, sampler, on_call)
      leaves = [np.asarray(p, np.float32) for p in jax.tree.leaves(params)]
      chunks += [[leaf[b] for leaf in leaves] for b in range(real)]
      mses.append(mse[:real])
  return chunks, float(np.mean(np.concatenate(mses)))


def _check_max_bits(config: ml_collections.ConfigDict) -> None:
  q = config.quant_max_bits
  if q and not (config.quant_bits <= q <= max(quantise.BITS)):
    raise ValueError(f"quant_max_bits={q} must be 0 (no rate control) or in [quant_bits "
                     f"({config.quant_bits}), {max(quantise.BITS)}]")


def encode_to_budget(header: fileformat.Header, chunks: list[list[np.ndarray]],
                     max_bytes: int, max_bits: int) -> tuple[bytes, int, bytes]:
  """(file, its code levels, file at the header's bits): rate control of quantised weights.

  The largest number of code levels L in [3, 2^max_bits - 1] (stored bits: those of L) whose file has at most
  `max_bytes` bytes, bisected from the header's `2^bits - 1` (up when that file fits, down when
  it does not; the coded size grows with L, so about log2(range) encodes). `max_bits` = 0, float
  storage, or no L that fits: the file at the header's bits (levels 2^bits - 1; 0 for floats)."""
  base = fileformat.encode(header, chunks)
  w = header.weights
  start = (1 << w.bits) - 1 if w.storage == "quantised" else 0
  if not start or not max_bits:
    return base, start, base

  def at(levels: int) -> bytes:
    bits = max(levels.bit_length(), min(quantise.BITS))
    return fileformat.encode(dataclasses.replace(
        header, weights=dataclasses.replace(w, bits=bits, levels=levels)), chunks)

  # Invariant: `lo` fits (or is the sentinel 2: none tried fits), `hi` does not (or is past the
  # range).
  lo, hi, best = (start, 1 << max_bits, base) if len(base) <= max_bytes else (2, start, None)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    blob = at(mid)
    if len(blob) <= max_bytes:
      lo, best = mid, blob
    else:
      hi = mid
  return (base, start, base) if best is None else (best, lo, base)


def _coded_param_bytes(blob: bytes, table_bytes: int) -> int:
  """Bytes of the coded parameters of a file (payload less the chunk table and the quantisation
  tables)."""
  compressed = fileformat.decode(blob)
  return len(blob) - compressed.header_bytes - int(compressed.records[0]) - table_bytes


def _compress_once(volume: Volume, ratio: float, config: ml_collections.ConfigDict,
                   bytes_per_param: float, log: Callable[[str], None] | None
                   ) -> tuple[bytes, dict]:
  start = time.perf_counter()
  c, budget_params, tiling = solve_model(volume, ratio, config, bytes_per_param)
  weights = fileformat.weights_from_config(config)
  lo, hi = float(np.min(volume.data)), float(np.max(volume.data))
  chunks, train_mse = _train_chunks(volume, c, tiling, config, log)
  train_s = time.perf_counter() - start
  blob, levels, base = encode_to_budget(_header(volume, c, lo, hi, weights, tiling), chunks,
                                        int(volume.data.nbytes / ratio), config.quant_max_bits)
  compress_s = time.perf_counter() - start
  decode_start = time.perf_counter()
  decoded = decompress(blob, config.render_chunk, config.chunk_batch)
  decompress_s = time.perf_counter() - decode_start
  compressed = fileformat.decode(blob)
  N = tiling.num_chunks
  table = N * _table_bytes(c, volume.data.ndim, weights)
  chunk_table = int(compressed.records[0])
  original, restored = volumes.physical(volume), volumes.physical(decoded)
  return blob, {
      "kind": c.kind, "psnr": metrics.psnr(original, restored),
      "ssim": metrics.ssim(original, restored), "ratio_target": ratio,
      "ratio_actual": volume.data.nbytes / len(blob), "original_bytes": volume.data.nbytes,
      "file_bytes": len(blob), "header_bytes": compressed.header_bytes,
      "chunk_table_bytes": chunk_table, "table_bytes": table,
      "param_bytes": _coded_param_bytes(blob, table),
      "levels": levels, "code_bits": compressed.header.weights.bits,
      "base_file_bytes": len(base), "base_param_bytes": _coded_param_bytes(base, table),
      "chunks": N, "chunk_shape": "x".join(map(str, tiling.chunk_block)),
      "num_params": sum(t.size for ts in chunks for t in ts), "budget_params": budget_params * N,
      "width": c.width, "tail_width": c.tail_width, "train_mse": train_mse, "train_s": train_s,
      "compress_s": compress_s, "decompress_s": decompress_s,
  }


def compress(volume: Volume, ratio: float, config: ml_collections.ConfigDict,
             log: Callable[[str], None] | None = None) -> tuple[bytes, dict]:
  """Fits the chunk models of `config` to `volume` so the file meets `ratio` (up to
  `config.budget_trials` trainings: `budget.fit_to_budget`). Returns (file bytes, report);
  the report holds psnr, ssim (physical values), ratios, sizes, widths, chunks and times. Warns
  when the file is more than RATIO_SLACK times smaller than the ratio allows (coarse widths)."""
  if config.chunk_batch < 1:
    raise ValueError(f"chunk_batch={config.chunk_batch} must be >= 1 (chunks trained at once)")
  weights = fileformat.weights_from_config(config)
  _check_max_bits(config)
  blob, report = budget.fit_to_budget(
      lambda bpp: _compress_once(volume, ratio, config, bpp, log),
      volume.data.nbytes / ratio, _bytes_per_param(weights), config.budget_trials, log)
  if report["ratio_actual"] > RATIO_SLACK * ratio:
    warnings.warn(f"the file is {len(blob)} bytes for a budget of {volume.data.nbytes / ratio:.0f} "
                  f"({report['ratio_actual']:.1f}x, not {ratio:g}x): the best of "
                  f"{report['budget_trials']} training(s) (width {report['width']}, tail_width "
                  f"{report['tail_width']}, {report['levels']} code levels) leaves that much "
                  "unused; raise quant_max_bits or budget_trials, or lower --ratio / use fewer "
                  "chunks for finer widths", stacklevel=2)
  return blob, report


def compress_to_psnr(volume: Volume, psnr: float, config: ml_collections.ConfigDict,
                     log: Callable[[str], None] | None = None) -> tuple[bytes, dict]:
  """The smallest file reaching `psnr` dB that `config.psnr_search` finds (`budget.search_psnr`
  over `compress` at bisected ratios)."""
  s = config.psnr_search
  return budget.search_psnr(lambda ratio: compress(volume, ratio, config, log), psnr,
                            s.min_ratio, s.max_ratio, s.trials, log)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply_chunks(graphdef: nnx.GraphDef, method: str, params: nnx.State, rest: nnx.State,
                  coords: jax.Array) -> jax.Array:
  """Model `method` of each chunk: stacked params `[B, ...]`, coords `[B, G, n, d]` (one
  compile per model, method and shape, shared by every file and decoder)."""
  apply = lambda p, x: getattr(nnx.merge(graphdef, p, rest), method)(x)
  return jax.vmap(apply)(params, coords)


class Decoder:
  """A compressed file opened for rendering: its header, tiling and the models of its chunks.

  Every header field is checked, and the payload size against chunks x the header's model,
  before any model is built; a chunk's record is decoded only when that chunk is rendered.
  """

  def __init__(self, blob: bytes, source: str = "input"):
    self.compressed = compressed = fileformat.decode(blob, source)
    self.source = source
    h = compressed.header
    c = fileformat.model_from_diff(h.model)
    ndim = len(h.shape)
    try:  # shapes only: nothing is allocated before the payload is checked against them
      abstract = nnx.eval_shape(lambda: model_lib.build(c, ndim, rngs=nnx.Rngs(0)))
    except Exception as e:  # the header's fields are checked, their combination may still fail
      raise ValueError(f"{source}: the header's model cannot be built ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:120]}); the file is damaged") from None
    state = nnx.state(abstract, nnx.Param)
    self.shapes = [p.shape for p in jax.tree.leaves(state)]
    per_chunk = sum(int(np.prod(s)) for s in self.shapes)
    N, stored = h.num_chunks, len(compressed.payload)
    if N * per_chunk > MAX_PARAMS_PER_BYTE * stored:
      raise ValueError(f"{source}: {stored} payload bytes stored, the header's model needs {N} "
                       f"chunk(s) x {per_chunk} parameters (at most {MAX_PARAMS_PER_BYTE} per "
                       "byte); the file is truncated or damaged")
    try:
      self.tiling = tiling_for(c, h.shape, h.chunk_block)
    except ValueError as e:
      raise ValueError(f"{source}: {e}; the file is damaged") from None
    model = model_lib.build(c, ndim, rngs=nnx.Rngs(0))
    model.eval()
    self.graphdef, _, self.rest = nnx.split(model, nnx.Param, ...)
    self.treedef = jax.tree.structure(state)
    self._last: tuple[tuple[int, ...] | None, nnx.State | None] = (None, None)

  def tensors(self, chunk: int) -> list[np.ndarray]:
    """Chunk `chunk`'s float32 parameter tensors (leaf order), decoded from its record."""
    return fileformat.decode_tensors(self.compressed, self.shapes, int(chunk), self.source)

  def params(self, chunks: np.ndarray) -> nnx.State:
    """Stacked parameters (leading axis B, float32) of chunks `[B]` (the last batch's are kept:
    rendering calls this once per batch of points of the same chunks)."""
    key = tuple(int(k) for k in chunks)
    if self._last[0] != key:
      per_chunk = [self.tensors(k) for k in key]
      leaves = [jax.numpy.asarray(np.stack(x)) for x in zip(*per_chunk)]
      self._last = (key, jax.tree.unflatten(self.treedef, leaves))
    return self._last[1]

  def evaluate(self, method: str = "__call__") -> Callable[[np.ndarray, np.ndarray], jax.Array]:
    """`(chunks [B], coords [B, G, n, d]) -> [B, G, n]`: model `method` of each chunk."""
    return lambda chunks, coords: _apply_chunks(self.graphdef, method, self.params(chunks),
                                                self.rest, coords)

  def render(self, render_chunk: int, chunk_batch: int, scale: float = 1.0,
             roi: Sequence[slice] | None = None, method: str = "__call__",
             convert: Callable[[np.ndarray], np.ndarray] | None = None,
             dtype: np.dtype | None = None) -> tuple[np.ndarray, chunking.OutputGrid]:
    """The model outputs on the ROI of the grid at `scale`: intensities in the volume's dtype
    by default (`convert`, `dtype` for another method's outputs)."""
    h = self.compressed.header
    if chunk_batch < 1 or render_chunk < 1:
      raise ValueError(f"chunk_batch={chunk_batch} / render_chunk={render_chunk} must be >= 1")
    grid = chunking.OutputGrid(self.tiling, scale, roi)
    if convert is None:
      convert = lambda v: fitting.denormalise(v, *h.value_range, h.dtype)
      dtype = h.dtype
    bar = progress_bar(0, len(grid.touched_chunks()), unit="chunk")
    with bar:
      out = chunking.render(self.evaluate(method), grid, min(chunk_batch, self.tiling.num_chunks),
                            render_chunk, convert, dtype, bar.update)
    return out, grid


def _affine(affine: np.ndarray, grid: chunking.OutputGrid, shape: Sequence[int]) -> np.ndarray:
  """Voxel -> world of the rendered grid: output voxel k of axis a is source voxel
  `start_a + k step_a` (spatial axes: the first three)."""
  out = np.array(affine, np.float64)
  for a in range(min(3, len(shape))):
    n, m = shape[a], grid.full_shape[a]
    step = (n - 1) / (m - 1) if m > 1 else 1.0
    start = grid.index[a][0] * step if m > 1 else 0.0
    stride = (grid.index[a][1] - grid.index[a][0]) * step if len(grid.index[a]) > 1 else step
    out[:3, 3] = out[:3, 3] + affine[:3, a] * start
    out[:3, a] = affine[:3, a] * stride
  return out


def decompress(blob: bytes, render_chunk: int, chunk_batch: int, source: str = "input", *,
               scale: float = 1.0, roi: Sequence[slice] | None = None) -> Volume:
  """The volume a compressed file encodes (original shape, dtype, affine and metadata), or its
  region `roi` (slices of the output grid) at `scale` times the original resolution: only the
  chunks the ROI touches are decoded, its affine maps its own voxels and the metadata that
  places voxels (`_GEOMETRY_KEYS`) is left out."""
  decoder = Decoder(blob, source)
  data, grid = decoder.render(render_chunk, chunk_batch, scale, roi)
  h = decoder.compressed.header
  meta = {k: v for k, v in h.meta.items() if k != "affine"}
  if "affine" in h.meta:
    affine = np.asarray(h.meta["affine"], np.float64).reshape(4, 4)
  elif any(k.startswith("nifti.") for k in meta):
    affine = volumes.nifti_header(Volume(data, None, meta)).get_best_affine()
  else:
    affine = None
  if grid.shape != tuple(h.shape) or scale != 1:
    meta = {k: v for k, v in meta.items() if not k.startswith(_GEOMETRY_KEYS)}
    affine = None if affine is None else _affine(affine, grid, h.shape)
  return Volume(data, affine, meta)
