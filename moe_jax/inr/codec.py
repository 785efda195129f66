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

from moe_jax.inr import budget, fileformat, fitting, metrics, model as model_lib, sampling
from moe_jax.inr.volumes import Volume


def layout_for(c: ml_collections.ConfigDict, shape: tuple[int, ...]) -> sampling.GridLayout:
  """Block grid for BlockINR and TreeINR, the whole volume (one group) for MoEC."""
  if c.kind == "moec":
    return sampling.GridLayout(shape, (1,) * len(shape))
  return sampling.GridLayout(shape, model_lib.block_grid(c, len(shape)))


def _params(model: nnx.Module) -> list[jax.Array]:
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def _header(volume: Volume, c: ml_collections.ConfigDict, lo: float, hi: float,
            param_dtype: str) -> dict:
  affine = None if volume.affine is None else [float(a) for a in volume.affine.reshape(-1)]
  return {"model": fileformat.model_diff(c), "shape": list(volume.data.shape),
          "dtype": volume.data.dtype.str, "affine": affine, "range": [lo, hi],
          "param_dtype": param_dtype}


def solve_model(volume: Volume, ratio: float, config: ml_collections.ConfigDict
                ) -> tuple[ml_collections.ConfigDict, int]:
  """The model config with widths solved for `ratio`, and the parameter budget it met."""
  c, shape = config.model, volume.data.shape
  lo, hi = float(np.min(volume.data)), float(np.max(volume.data))
  # Header size with the widest width digits (the header is a few hundred bytes).
  wide = ml_collections.ConfigDict(c.to_dict())
  wide.width = wide.tail_width = 99999
  header_bytes = len(fileformat.encode(fileformat.Compressed(
      _header(volume, wide, lo, hi, config.param_dtype), np.zeros(0, np.float32))))
  bytes_per_param = fileformat.param_dtype(config.param_dtype).itemsize
  params = budget.param_budget(volume.data.nbytes, ratio, bytes_per_param, header_bytes)
  return budget.solve_widths(c, len(shape), params), params


def compress(volume: Volume, ratio: float, config: ml_collections.ConfigDict,
             log: Callable[[str], None] | None = None) -> tuple[bytes, dict, nnx.Module]:
  """Fits the model of `config` to `volume` at `ratio`. Returns (file bytes, report, model);
  the report holds psnr, ssim, ratios, sizes, widths and times."""
  start = time.perf_counter()
  c, budget_params = solve_model(volume, ratio, config)
  values, lo, hi = fitting.normalise(volume.data)
  model = model_lib.build(c, volume.data.ndim, rngs=nnx.Rngs(config.train.seed))
  layout = layout_for(c, volume.data.shape)
  fit = fitting.fit(model, layout, values, config.train, log)
  params = np.concatenate([np.asarray(p, np.float32).reshape(-1) for p in _params(model)])
  blob = fileformat.encode(fileformat.Compressed(
      _header(volume, c, lo, hi, config.param_dtype), params))
  compress_s = time.perf_counter() - start
  decoded = decompress(blob, config.render_chunk)
  report = {
      "kind": c.kind, "psnr": metrics.psnr(volume.data, decoded.data),
      "ssim": metrics.ssim(volume.data, decoded.data), "ratio_target": ratio,
      "ratio_actual": volume.data.nbytes / len(blob), "original_bytes": volume.data.nbytes,
      "file_bytes": len(blob), "num_params": int(params.size), "budget_params": budget_params,
      "width": c.width, "tail_width": c.tail_width, "train_mse": fit["final_mse"],
      "train_s": fit["train_s"], "compress_s": compress_s,
  }
  return blob, report, model


def restore(blob: bytes, source: str = "input") -> tuple[fileformat.Compressed, nnx.Module]:
  """The header and the model (parameters loaded, eval mode) of a compressed file."""
  compressed = fileformat.decode(blob, source)
  c = fileformat.model_from_diff(compressed.header["model"])
  ndim = len(compressed.header["shape"])
  try:  # shapes only: nothing is allocated before the parameter count matches the file
    abstract = nnx.eval_shape(lambda: model_lib.build(c, ndim, rngs=nnx.Rngs(0)))
  except Exception as e:  # the header's fields are checked, their combination may still fail
    raise ValueError(f"{source}: the header's model cannot be built ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:120]}); the file is damaged") from None
  shapes = [p.shape for p in jax.tree.leaves(nnx.state(abstract, nnx.Param))]
  sizes = [int(np.prod(s)) for s in shapes]
  if sum(sizes) != compressed.params.size:
    raise ValueError(f"{source}: {compressed.params.size} parameters stored, the header's model "
                     f"needs {sum(sizes)}; the file is truncated or damaged")
  model = model_lib.build(c, ndim, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  chunks = np.split(compressed.params.astype(np.float32), np.cumsum(sizes)[:-1])
  leaves = [jax.numpy.asarray(x.reshape(s)) for x, s in zip(chunks, shapes)]
  nnx.update(model, jax.tree.unflatten(jax.tree.structure(state), leaves))
  model.eval()
  return compressed, model


def decompress(blob: bytes, render_chunk: int, source: str = "input") -> Volume:
  """The volume a compressed file encodes: original shape, dtype and affine."""
  compressed, model = restore(blob, source)
  h = compressed.header
  c = fileformat.model_from_diff(h["model"])
  values = fitting.render(model, layout_for(c, tuple(h["shape"])), render_chunk)
  data = fitting.denormalise(values, *h["range"], np.dtype(h["dtype"]))
  affine = None if h["affine"] is None else np.asarray(h["affine"], np.float64).reshape(4, 4)
  return Volume(data, affine)
