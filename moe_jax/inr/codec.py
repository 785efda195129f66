"""compress: volume -> chunks -> solved widths -> trained INRs -> file bytes; decompress: bytes ->
the volume, a region of interest of it, or either at another resolution.

The volume is tiled into chunks (`config.chunk_shape`, `chunking.Tiling`; () = one chunk), each
coded by its own model of the same config, widths solved for the same per-chunk budget
(original bytes / ratio - header, split evenly). `config.chunk_batch` chunks train at once in
one jitted step. Memory is bounded by the chunk batch (parameters, optimizer state, a batch of
coordinates) and the volume itself: no full-volume coordinate or float32 grid is made.

The quality reported by `compress` is measured on `decompress(file)` itself (quantised
parameters, rounding to the volume's dtype), so it is what a reader of the file gets.
"""
from __future__ import annotations

import functools
import time
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from moe_jax.inr import budget, chunking, fileformat, fitting, metrics, model as model_lib
from moe_jax.inr.volumes import Volume
from moe_jax.train.metrics import progress_bar


RATIO_SLACK = 1.05  # compress warns when the file is this much smaller than the ratio allows


def tiling_for(c: ml_collections.ConfigDict, shape: Sequence[int],
               chunk_shape: Sequence[int]) -> chunking.Tiling:
  """Chunks of `chunk_shape` (() = one); inside one chunk, BlockINR's block grid."""
  return chunking.Tiling(shape, chunk_shape, c.grid if c.kind == "blocks" else (1,) * len(shape))


def _header(volume: Volume, c: ml_collections.ConfigDict, lo: float, hi: float,
            param_dtype: str, tiling: chunking.Tiling) -> dict:
  affine = None if volume.affine is None else [float(a) for a in volume.affine.reshape(-1)]
  return {"model": fileformat.model_diff(c), "shape": list(volume.data.shape),
          "dtype": volume.data.dtype.str, "affine": affine, "range": [lo, hi],
          "param_dtype": param_dtype, "chunk_shape": list(tiling.chunk_block)}


def solve_model(volume: Volume, ratio: float, config: ml_collections.ConfigDict
                ) -> tuple[ml_collections.ConfigDict, int, chunking.Tiling]:
  """The model config with widths solved for `ratio`, the per-chunk parameter budget it met,
  and the tiling."""
  c, shape = config.model, volume.data.shape
  tiling = tiling_for(c, shape, config.chunk_shape)
  lo, hi = float(np.min(volume.data)), float(np.max(volume.data))
  # Header size with the widest width digits (the header is a few hundred bytes).
  wide = ml_collections.ConfigDict(c.to_dict())
  wide.width = wide.tail_width = 99999
  header_bytes = len(fileformat.encode(fileformat.Compressed(
      _header(volume, wide, lo, hi, config.param_dtype, tiling), np.zeros(0, np.float32))))
  bytes_per_param = fileformat.param_dtype(config.param_dtype).itemsize
  params = budget.param_budget(volume.data.nbytes, ratio, bytes_per_param, header_bytes)
  per_chunk = params // tiling.num_chunks
  return budget.solve_widths(c, len(shape), per_chunk), per_chunk, tiling


def _flat_rows(params: nnx.State) -> np.ndarray:
  """Stacked parameters (leading axis B) -> `[B, P]` float32, leaves in file order."""
  leaves = jax.tree.leaves(params)
  return np.concatenate([np.asarray(p, np.float32).reshape(p.shape[0], -1) for p in leaves], 1)


def compress(volume: Volume, ratio: float, config: ml_collections.ConfigDict,
             log: Callable[[str], None] | None = None) -> tuple[bytes, dict]:
  """Fits the chunk models of `config` to `volume` at `ratio`. Returns (file bytes, report);
  the report holds psnr, ssim, ratios, sizes, widths, chunks and times, and a `warning` when
  the file is more than RATIO_SLACK times smaller than the ratio allows (coarse widths)."""
  start = time.perf_counter()
  c, budget_params, tiling = solve_model(volume, ratio, config)
  tc, N = config.train, tiling.num_chunks
  if config.chunk_batch < 1:
    raise ValueError(f"chunk_batch={config.chunk_batch} must be >= 1 (chunks trained at once)")
  B = min(config.chunk_batch, N)
  lo, hi = float(np.min(volume.data)), float(np.max(volume.data))
  fitter = fitting.ChunkFitter(c, volume.data.ndim, tc)
  dtype = fileformat.param_dtype(config.param_dtype)
  rows, mses = [], []
  bar = progress_bar(0, N * tc.steps, unit="chunk-step")
  with bar:
    for index, first in enumerate(range(0, N, B)):
      real = min(B, N - first)
      ids = np.minimum(np.arange(first, first + B), N - 1)  # a short batch repeats a chunk
      batches = fitting.training_batches(tiling.cells, tiling.cells_of(ids), volume.data, lo, hi,
                                         tc, tc.seed + index)

      def on_step(i, mse, first=first, real=real):
        bar.update(real)
        if log is not None and tc.log_every and i % tc.log_every == 0:
          log(f"chunks {first}-{first + real - 1}/{N}  step {i}/{tc.steps}  "
              f"mse {float(np.mean(np.asarray(mse)[:real])):.3e}")

      params, mse = fitter.fit(ids, batches, on_step)
      rows.append(_flat_rows(params)[:real].astype(dtype))
      mses.append(mse[:real])
  train_s = time.perf_counter() - start
  flat = np.concatenate(rows).reshape(-1)
  blob = fileformat.encode(fileformat.Compressed(
      _header(volume, c, lo, hi, config.param_dtype, tiling), flat))
  compress_s = time.perf_counter() - start
  decode_start = time.perf_counter()
  decoded = decompress(blob, config.render_chunk, config.chunk_batch)
  decompress_s = time.perf_counter() - decode_start
  report = {
      "kind": c.kind, "psnr": metrics.psnr(volume.data, decoded.data),
      "ssim": metrics.ssim(volume.data, decoded.data), "ratio_target": ratio,
      "ratio_actual": volume.data.nbytes / len(blob), "original_bytes": volume.data.nbytes,
      "file_bytes": len(blob), "chunks": N, "chunk_shape": "x".join(map(str, tiling.chunk_block)),
      "num_params": int(flat.size), "budget_params": budget_params * N,
      "width": c.width, "tail_width": c.tail_width,
      "train_mse": float(np.mean(np.concatenate(mses))), "train_s": train_s,
      "compress_s": compress_s, "decompress_s": decompress_s,
  }
  if report["ratio_actual"] > RATIO_SLACK * ratio:
    report["warning"] = (f"the file is {len(blob)} bytes for a budget of "
                         f"{volume.data.nbytes / ratio:.0f} ({report['ratio_actual']:.1f}x, not "
                         f"{ratio:g}x): at width {c.width} the next width does not fit; lower "
                         "--ratio, use fewer chunks or a smaller model")
  return blob, report


def compress_to_psnr(volume: Volume, target_psnr: float, config: ml_collections.ConfigDict,
                     log: Callable[[str], None] | None = None) -> tuple[bytes, dict]:
  """The most compressed file found with PSNR >= `target_psnr`: `config.psnr_search.trials`
  compressions, the first at `min_ratio`, then a bisection of log(ratio) up to `max_ratio`.
  When even `min_ratio` misses the target, that file is returned with a warning in the
  report. The report lists every trial as [ratio, psnr]."""
  ps = config.psnr_search
  if not 1 < ps.min_ratio < ps.max_ratio or ps.trials < 1:
    raise ValueError(f"psnr_search: need 1 < min_ratio ({ps.min_ratio}) < max_ratio "
                     f"({ps.max_ratio}) and trials ({ps.trials}) >= 1")
  lo, hi, best, trials = ps.min_ratio, ps.max_ratio, None, []
  for i in range(ps.trials):
    ratio = lo if i == 0 else float(np.sqrt(lo * hi))
    blob, report = compress(volume, ratio, config)
    trials.append([ratio, report["psnr"]])
    if log is not None:
      log(f"trial {i + 1}/{ps.trials}: {ratio:.4g}x -> {report['psnr']:.2f} dB")
    if report["psnr"] >= target_psnr:
      best, lo = (blob, report), ratio
    elif i == 0:
      report["warning"] = (f"--psnr {target_psnr:g} dB is not reached even at "
                           f"psnr_search.min_ratio={ps.min_ratio:g}x ({report['psnr']:.2f} dB): "
                           "lower min_ratio or train longer (train.steps)")
      best = (blob, report)
      break
    else:
      hi = ratio
  blob, report = best
  return blob, {**report, "psnr_target": target_psnr, "trials": trials}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply_chunks(graphdef: nnx.GraphDef, method: str, params: nnx.State, rest: nnx.State,
                  coords: jax.Array) -> jax.Array:
  """Model `method` of each chunk: stacked params `[B, ...]`, coords `[B, G, n, d]` (one
  compile per model, method and shape, shared by every file and decoder)."""
  apply = lambda p, x: getattr(nnx.merge(graphdef, p, rest), method)(x)
  return jax.vmap(apply)(params, coords)


class Decoder:
  """A compressed file opened for rendering: its header, tiling and the models of its chunks.

  Every header field is checked, and the stored parameter count against chunks x the header's
  model, before any model is built.
  """

  def __init__(self, blob: bytes, source: str = "input"):
    self.compressed = compressed = fileformat.decode(blob, source)
    h = compressed.header
    c = fileformat.model_from_diff(h["model"])
    ndim = len(h["shape"])
    chunk_shape = h.get("chunk_shape", h["shape"])
    try:  # shapes only: nothing is allocated before the parameter count matches the file
      abstract = nnx.eval_shape(lambda: model_lib.build(c, ndim, rngs=nnx.Rngs(0)))
    except Exception as e:  # the header's fields are checked, their combination may still fail
      raise ValueError(f"{source}: the header's model cannot be built ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:120]}); the file is damaged") from None
    state = nnx.state(abstract, nnx.Param)
    self.shapes = [p.shape for p in jax.tree.leaves(state)]
    self.sizes = [int(np.prod(s)) for s in self.shapes]
    self.per_chunk = sum(self.sizes)
    stored = compressed.params.size
    N = int(np.prod(chunking.chunk_grid(h["shape"], chunk_shape), dtype=object))
    if stored != N * self.per_chunk:
      raise ValueError(f"{source}: {stored} parameters stored, the header's model needs "
                       f"{N} chunk(s) x {self.per_chunk}; the file is truncated or damaged")
    try:
      self.tiling = tiling_for(c, h["shape"], chunk_shape)
    except ValueError as e:
      raise ValueError(f"{source}: {e}; the file is damaged") from None
    model = model_lib.build(c, ndim, rngs=nnx.Rngs(0))
    model.eval()
    self.graphdef, _, self.rest = nnx.split(model, nnx.Param, ...)
    self.treedef = jax.tree.structure(state)

  def params(self, chunks: np.ndarray) -> nnx.State:
    """Stacked parameters (leading axis B, float32) of chunks `[B]`."""
    P, flat = self.per_chunk, self.compressed.params
    rows = np.stack([flat[int(k) * P:(int(k) + 1) * P].astype(np.float32) for k in chunks])
    parts = np.split(rows, np.cumsum(self.sizes)[:-1], axis=1)
    leaves = [jax.numpy.asarray(x.reshape((len(chunks),) + s)) for x, s in zip(parts,
                                                                                self.shapes)]
    return jax.tree.unflatten(self.treedef, leaves)

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
      out_dtype = np.dtype(h["dtype"])
      convert = lambda v: fitting.denormalise(v, *h["range"], out_dtype)
      dtype = out_dtype
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
  """The volume a compressed file encodes (original dtype and affine), or its region `roi`
  (slices of the output grid), at `scale` times the original resolution; only the chunks the
  ROI touches are decoded."""
  decoder = Decoder(blob, source)
  data, grid = decoder.render(render_chunk, chunk_batch, scale, roi)
  h = decoder.compressed.header
  affine = None if h["affine"] is None else _affine(
      np.asarray(h["affine"], np.float64).reshape(4, 4), grid, h["shape"])
  return Volume(data, affine)
