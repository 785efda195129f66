"""compress: volume -> solved widths -> trained INR -> file bytes; decompress: bytes -> volume.

The quality reported by `compress` is measured on `decompress(file)` itself (quantised
parameters, rounding to the volume's dtype), so it is what a reader of the file gets.
"""
from __future__ import annotations

import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from moe_jax.inr import (budget, fileformat, fitting, metrics, model as model_lib, quantise,
                         sampling, volumes)
from moe_jax.inr.volumes import Volume


# A bound on decoded parameters per payload byte, checked before anything is decoded (real files
# store >= 2 bits per parameter; lzma would reach 64 only on near-constant weights).
MAX_PARAMS_PER_BYTE = 64


def layout_for(c: ml_collections.ConfigDict, shape: tuple[int, ...]) -> sampling.GridLayout:
  """Block grid for BlockINR and TreeINR, the whole volume (one group) for MoEC."""
  if c.kind == "moec":
    return sampling.GridLayout(shape, (1,) * len(shape))
  return sampling.GridLayout(shape, model_lib.block_grid(c, len(shape)))


def _params(model: nnx.Module) -> list[jax.Array]:
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def _header(volume: Volume, c: ml_collections.ConfigDict, lo: float, hi: float,
            weights: fileformat.Weights) -> fileformat.Header:
  """The file header: the volume's metadata, and its affine where no NIfTI field carries it."""
  meta = dict(volume.meta)
  if volume.affine is not None and not any(k.startswith("nifti.") for k in meta):
    meta["affine"] = np.asarray(volume.affine, np.float64).reshape(-1)
  return fileformat.Header(tuple(volume.data.shape), volume.data.dtype, (lo, hi),
                           fileformat.model_diff(c), weights, meta)


def _bytes_per_param(weights: fileformat.Weights) -> float:
  """Upper bound of the stored bytes per parameter (packed codes or floats, before coding)."""
  if weights.storage == "quantised":
    return weights.bits / 8
  return fileformat.param_dtype(weights.storage).itemsize


def _table_bytes(c: ml_collections.ConfigDict, ndim: int, weights: fileformat.Weights) -> int:
  """Bytes of the quantisation table (float16 lo, step per group) of model `c`."""
  if weights.storage != "quantised":
    return 0
  abstract = nnx.eval_shape(lambda: model_lib.build(c, ndim, rngs=nnx.Rngs(0)))
  return 4 * sum(quantise.num_groups(p.shape, weights.granularity)
                 for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def solve_model(volume: Volume, ratio: float, config: ml_collections.ConfigDict,
                bytes_per_param: float | None = None) -> tuple[ml_collections.ConfigDict, int]:
  """The model config with widths solved for `ratio` at `bytes_per_param` (default: the upper
  bound of `config`'s weight storage), and the parameter budget it met."""
  c, shape = config.model, volume.data.shape
  weights = fileformat.weights_from_config(config)
  bpp = _bytes_per_param(weights) if bytes_per_param is None else bytes_per_param
  lo, hi = float(np.min(volume.data)), float(np.max(volume.data))
  # Header bytes with the widest width digits; +3 bytes for the payload length's varint.
  wide = ml_collections.ConfigDict(c.to_dict())
  wide.width = wide.tail_width = 1 << 20
  header_bytes = len(fileformat.encode(_header(volume, wide, lo, hi, weights), [])) + 3
  table = 0
  for _ in range(3):  # the table grows with the widths (per-channel groups): settle it
    params = budget.param_budget(volume.data.nbytes, ratio, bpp, header_bytes + table)
    solved = budget.solve_widths(c, len(shape), params)
    if _table_bytes(solved, len(shape), weights) <= table:
      break
    table = _table_bytes(solved, len(shape), weights)
  return solved, params


def _compress_once(volume: Volume, ratio: float, config: ml_collections.ConfigDict,
                   bytes_per_param: float, log: Callable[[str], None] | None
                   ) -> tuple[bytes, dict, nnx.Module]:
  start = time.perf_counter()
  c, budget_params = solve_model(volume, ratio, config, bytes_per_param)
  weights = fileformat.weights_from_config(config)
  values, lo, hi = fitting.normalise(volume.data)
  model = model_lib.build(c, volume.data.ndim, rngs=nnx.Rngs(config.train.seed))
  layout = layout_for(c, volume.data.shape)
  fit = fitting.fit(model, layout, values, config.train, log)
  tensors = [np.asarray(p, np.float32) for p in _params(model)]
  blob = fileformat.encode(_header(volume, c, lo, hi, weights), tensors)
  compress_s = time.perf_counter() - start
  decoded = decompress(blob, config.render_chunk)
  header_bytes = fileformat.decode(blob).header_bytes
  table = _table_bytes(c, volume.data.ndim, weights)
  original, restored = volumes.physical(volume), volumes.physical(decoded)
  report = {
      "kind": c.kind, "psnr": metrics.psnr(original, restored),
      "ssim": metrics.ssim(original, restored), "ratio_target": ratio,
      "ratio_actual": volume.data.nbytes / len(blob), "original_bytes": volume.data.nbytes,
      "file_bytes": len(blob), "header_bytes": header_bytes,
      "param_bytes": len(blob) - header_bytes - table, "table_bytes": table,
      "num_params": sum(t.size for t in tensors), "budget_params": budget_params,
      "width": c.width, "tail_width": c.tail_width, "train_mse": fit["final_mse"],
      "train_s": fit["train_s"], "compress_s": compress_s,
  }
  return blob, report, model


def compress(volume: Volume, ratio: float, config: ml_collections.ConfigDict,
             log: Callable[[str], None] | None = None) -> tuple[bytes, dict, nnx.Module]:
  """Fits the model of `config` to `volume` so the file meets `ratio` (up to
  `config.budget_trials` trainings: `budget.fit_to_budget`). Returns (file bytes, report,
  model); the report holds psnr, ssim (physical values), ratios, sizes, widths and times."""
  weights = fileformat.weights_from_config(config)
  return budget.fit_to_budget(
      lambda bpp: _compress_once(volume, ratio, config, bpp, log),
      volume.data.nbytes / ratio, _bytes_per_param(weights), config.budget_trials, log)


def compress_to_psnr(volume: Volume, psnr: float, config: ml_collections.ConfigDict,
                     log: Callable[[str], None] | None = None
                     ) -> tuple[bytes, dict, nnx.Module]:
  """The smallest file reaching `psnr` dB that `config.psnr_search` finds (`budget.search_psnr`
  over `compress` at bisected ratios)."""
  s = config.psnr_search
  return budget.search_psnr(lambda ratio: compress(volume, ratio, config, log), psnr,
                            s.min_ratio, s.max_ratio, s.trials, log)


def restore(blob: bytes, source: str = "input") -> tuple[fileformat.Compressed, nnx.Module]:
  """The header and the model (parameters loaded, eval mode) of a compressed file."""
  compressed = fileformat.decode(blob, source)
  c = fileformat.model_from_diff(compressed.header.model)
  ndim = len(compressed.header.shape)
  try:  # shapes only: nothing is allocated before the payload is checked against them
    abstract = nnx.eval_shape(lambda: model_lib.build(c, ndim, rngs=nnx.Rngs(0)))
  except Exception as e:  # the header's fields are checked, their combination may still fail
    raise ValueError(f"{source}: the header's model cannot be built ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:120]}); the file is damaged") from None
  shapes = [p.shape for p in jax.tree.leaves(nnx.state(abstract, nnx.Param))]
  needed = sum(int(np.prod(s)) for s in shapes)
  if needed > MAX_PARAMS_PER_BYTE * len(compressed.payload):
    raise ValueError(f"{source}: {len(compressed.payload)} payload bytes stored, the header's "
                     f"model needs {needed} parameters (at most {MAX_PARAMS_PER_BYTE} per byte); "
                     "the file is truncated or damaged")
  tensors = fileformat.decode_tensors(compressed, shapes, source)
  model = model_lib.build(c, ndim, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.unflatten(jax.tree.structure(state),
                                       [jax.numpy.asarray(t) for t in tensors]))
  model.eval()
  return compressed, model


def decompress(blob: bytes, render_chunk: int, source: str = "input") -> Volume:
  """The volume a compressed file encodes: original shape, dtype, affine and metadata."""
  compressed, model = restore(blob, source)
  h = compressed.header
  c = fileformat.model_from_diff(h.model)
  values = fitting.render(model, layout_for(c, h.shape), render_chunk)
  data = fitting.denormalise(values, *h.value_range, h.dtype)
  meta = {k: v for k, v in h.meta.items() if k != "affine"}
  if "affine" in h.meta:
    affine = np.asarray(h.meta["affine"], np.float64).reshape(4, 4)
  elif any(k.startswith("nifti.") for k in meta):
    affine = volumes.nifti_header(Volume(data, None, meta)).get_best_affine()
  else:
    affine = None
  return Volume(data, affine, meta)
