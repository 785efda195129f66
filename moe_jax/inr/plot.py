"""PNG of MoEC's learned partition: a slice of the volume beside the expert id of each voxel."""
from __future__ import annotations

import os

import numpy as np

from moe_jax.inr import codec, fileformat


def middle_slice(volume: np.ndarray) -> np.ndarray:
  """The 2-D slice through the middle of the third axis (first index of any later axis)."""
  index = tuple(s // 2 if i == 2 else 0 for i, s in enumerate(volume.shape[2:], start=2))
  return volume[(slice(None), slice(None)) + index]


def partition_png(blob: bytes, volume: np.ndarray, path: str, render_chunk: int,
                  chunk_batch: int) -> np.ndarray:
  """Writes `path` (volume slice | expert id slice) for the MoEC file `blob` (expert ids are per
  chunk model); returns the expert id volume (int32)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  decoder = codec.Decoder(blob)
  if decoder.compressed.header.model["kind"] != "moec":
    raise ValueError("--partition needs a MoEC model (config variant moec)")
  experts, _ = decoder.render(render_chunk, chunk_batch, method="expert_of",
                              convert=lambda e: e.astype(np.int32), dtype=np.int32)
  E = fileformat.model_from_diff(decoder.compressed.header.model).moe.num_experts
  fig, axes = plt.subplots(1, 2, figsize=(8, 4))
  axes[0].imshow(middle_slice(volume).T, cmap="gray", origin="lower")
  axes[0].set_title("volume (middle slice)")
  im = axes[1].imshow(middle_slice(experts).T, cmap=plt.get_cmap("tab10", E), vmin=-0.5,
                      vmax=E - 0.5, origin="lower", interpolation="nearest")
  axes[1].set_title("learned partition: expert id (top-1)")
  fig.colorbar(im, ax=axes[1], ticks=range(E))
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return experts
