r"""Decompressing a MoEC / INR file back into a volume.

    python -m moe_jax.inr decompress vol.moec --out vol.nii.gz [--reference original.nii]

The model itself comes from the file's header; this config holds how to render it.
"""
from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.render_chunk = 65536  # points per call when rendering the volume
  return c
