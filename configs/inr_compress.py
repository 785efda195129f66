r"""MoEC neural compression of a volume (Zhao et al., arXiv 2312.01361), and its baselines.

    python -m moe_jax.commands.inr compress --input VOL --ratio 50 --out vol.moec \
        [--config configs/inr_compress.py:moec] [--set train.steps=3000]
    python -m moe_jax.commands.inr compress --input VOL --psnr 30 --out vol.moec  # PSNR target

Variants (all solve the network width from --ratio, so the parameters fit the same bytes):
- `moec`: 4 SIREN experts (w0 = 22.5 + 45 i) behind a top-2 gate, shared encoder and decoder.
- `single`: one SIREN (the single-INR baseline).
- `moec_mlp`: `moec` with the paper's gating network (a ReLU MLP on the shared encoder's
  features) in place of the linear gate on coordinates.
- `blocks`: a 2x2x2 grid of independent SIRENs (block-wise partition baseline; 3-D volumes, set
  model.grid for other ranks).
- `octree`: TINC's tree-structured INR (model.TreeINR): an octree of per-node SIRENs chained from
  the root to each leaf block (hierarchical parameter sharing), one level below the root.
Big volumes: `--set chunk_shape=(64,64,64)` codes 64^3 chunks independently, `chunk_batch` at a
time (memory bounded by the chunk batch); `decompress --roi / --scale` decode a region or another
resolution. `octree` (and `blocks` with model.grid not all ones) partitions one chunk only.
Expected result (anatomical.nii, 33x41x25 int16, 10x, bench/RESULTS.md): see the MoEC section.
"""
from __future__ import annotations

import ml_collections

from configs import check_variant
from moe_jax.inr.model import model_config

VARIANTS = ("moec", "moec_mlp", "single", "blocks", "octree")


def get_config(variant: str = "moec") -> ml_collections.ConfigDict:
  check_variant(variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.model = model_config({"moec_mlp": "moec", "single": "blocks"}.get(variant, variant))
  if variant in ("moec", "moec_mlp"):
    m = c.model.moe
    m.num_experts = 4
    m.router.k, m.router.renormalize = 2, True
    m.router.init_std = 1.0  # a decisive initial partition instead of near-uniform gates
    c.model.gate_input = "coords"
    # Measured (anatomical.nii, 10x, 500 steps): the paper's gate (encoder features, top-1)
    # 26.2 dB; gate on coords 27.3; + top-2 renormalised 28.3; + init_std 1.0 28.4.
  if variant == "moec_mlp":  # the paper's gating network: an MLP on the encoder's features
    c.model.gate, c.model.gate_input = "mlp", "features"
    # Not the default: measured (bench/inr.py, example4d.nii.gz, 3 seeds, 500 steps, lr 1e-3
    # each) linear gate on coords vs this: 29.54 +- 0.37 vs 29.32 +- 0.20 dB at 50x, 27.96 vs
    # 26.45 at 200x, 19.53 vs 16.14 at 1000x (bench/RESULTS.md, second pass).
  if variant == "blocks":
    c.model.grid = (2, 2, 2)
  if variant == "octree":  # TINC: root + 8 leaves (3-D); TINC's default has 2 levels (64 leaves)
    c.model.levels = 1
  # Stored weights (moe_jax/inr/fileformat.py): quant_bits-bit uniform codes (0 = floats of
  # param_dtype: float32, float16 or bfloat16), one (lo, step) per tensor or per output channel,
  # then entropy coded ('lzma', or 'none' = bit-packed codes). Measured on anatomical.nii:
  # bench/RESULTS.md, MoEC section.
  c.quant_bits = 8
  # Rate control (moe_jax/inr/codec.py encode_to_budget): widths are solved for quant_bits codes;
  # after training the encoder re-quantises with the most levels (up to 2^quant_max_bits - 1)
  # that keep the coded file within the budget (fewer than 2^quant_bits - 1 when it is over):
  # files land within a few bytes of original/ratio. 0 = codes at quant_bits exactly.
  c.quant_max_bits = 12
  c.quant_granularity = "tensor"
  c.entropy_coder = "lzma"
  c.param_dtype = "float16"
  # Trainings to meet the ratio: the first solves the widths for packed codes (an upper bound),
  # the next re-solve with the coded bytes per parameter measured (moe_jax/inr/budget.py).
  c.budget_trials = 2
  # --psnr mode: ratios bisected (log scale) in [min_ratio, max_ratio], `trials` compressions.
  c.psnr_search = ml_collections.ConfigDict(dict(min_ratio=5.0, max_ratio=2000.0, trials=6))
  c.train = ml_collections.ConfigDict(dict(
      steps=2000, batch_size=8192, learning_rate=1e-3, final_lr_fraction=0.05, seed=0,
      steps_per_call=100, log_every=500))
  # steps_per_call: training steps per jitted call (a lax.scan; points drawn on the device), so
  # the host dispatches once per call (moe_jax/inr/fitting.py).
  # Chunks coded independently (moe_jax.inr.chunking): the largest chunk, () = one chunk (the
  # whole volume), e.g. (64, 64, 64) for big volumes; chunk_batch chunks train at once (one
  # vmapped step).
  c.chunk_shape = ()
  c.chunk_batch = 8
  c.render_chunk = 65536  # points per call (over the chunk batch) when rendering the volume back
  return c
