r"""MoEC neural compression of a volume (Zhao et al., arXiv 2312.01361), and its baselines.

    python -m moe_jax.commands.inr compress --input VOL --ratio 50 --out vol.moec \
        [--config configs/inr_compress.py:moec] [--set train.steps=3000]

Variants (all solve the network width from --ratio, so the parameters fit the same bytes):
- `moec`: 4 SIREN experts (w0 = 22.5 + 45 i) behind a top-2 gate, shared encoder and decoder.
- `single`: one SIREN (the single-INR baseline).
- `blocks`: a 2x2x2 grid of independent SIRENs (block-wise partition baseline; 3-D volumes, set
  model.grid for other ranks).
Big volumes: `--set chunk_shape=(64,64,64)` codes 64^3 chunks independently, `chunk_batch` at a
time (memory bounded by the chunk batch); `decompress --roi / --scale` decode a region or another
resolution.
Expected result (anatomical.nii, 33x41x25 int16, 10x, bench/RESULTS.md): see the MoEC section.
"""
from __future__ import annotations

import ml_collections

from configs import check_variant
from moe_jax.inr.model import model_config

VARIANTS = ("moec", "single", "blocks")


def get_config(variant: str = "moec") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.model = model_config("moec" if variant == "moec" else "blocks")
  if variant == "moec":
    m = c.model.moe
    m.num_experts = 4
    m.router.k, m.router.renormalize = 2, True
    m.router.init_std = 1.0  # a decisive initial partition instead of near-uniform gates
    c.model.gate_input = "coords"
    # Measured (anatomical.nii, 10x, 500 steps): the paper's gate (encoder features, top-1)
    # 26.2 dB; gate on coords 27.3; + top-2 renormalised 28.3; + init_std 1.0 28.4.
  if variant == "blocks":
    c.model.grid = (2, 2, 2)
  c.param_dtype = "float16"  # bytes of each stored parameter: float32, float16 or bfloat16
  c.train = ml_collections.ConfigDict(dict(
      steps=2000, batch_size=8192, learning_rate=1e-3, final_lr_fraction=0.05, seed=0,
      prefetch_threads=1, log_every=500))
  # Chunks coded independently (moe_jax.inr.chunking): the largest chunk, () = one chunk (the
  # whole volume), e.g. (64, 64, 64) for big volumes; chunk_batch chunks train in one jitted step.
  c.chunk_shape = ()
  c.chunk_batch = 8
  c.render_chunk = 65536  # points per call (over the chunk batch) when rendering the volume back
  # `compress --psnr P` (instead of --ratio): `trials` compressions, bisecting log(ratio) in
  # [min_ratio, max_ratio]; the most compressed file with PSNR >= P is kept.
  c.psnr_search = ml_collections.ConfigDict(dict(trials=6, min_ratio=5.0, max_ratio=1000.0))
  return c
