r"""Decompressing a MoEC / INR file back into a volume.

    python -m moe_jax.commands.inr decompress vol.moec --out vol.nii.gz [--reference original.nii]
        [--roi 0:64,:,10:20] [--scale 2]

The model itself comes from the file's header; this config holds how to render it.
"""
from __future__ import annotations

import ml_collections

from configs import check_variant

VARIANTS = ("default",)


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.render_chunk = 65536  # points per call (over the chunk batch) when rendering the volume
  c.chunk_batch = 8  # chunks evaluated per call
  return c
