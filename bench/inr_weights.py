"""How MoEC stores its weights: float16 vs 8-bit vs 6-bit codes, per tensor vs per channel, and
which entropy coder, on a real MRI at fixed ratios.

    python -m bench.inr_weights [--quick] [--volume anatomical.nii] [--ratios 50,200]
        [--steps 1000] [--seeds 0] [--settings "8-bit tensor,6-bit tensor"]
        [--out bench/out/inr_weights.json]

Every row compresses the volume with `configs/inr_compress.py:moec` at the ratio (widths
re-solved for the coded size, `budget_trials` trainings), so the whole file fits original/ratio;
PSNR / SSIM are measured on the decompressed file (physical values). The coder table re-codes
each row's quantised codes with: raw LZMA2 as the file stores it (lc=lp=pb=0), LZMA2 with its
default contexts (lc=3), zstd level 19 (through imagecodecs, if installed; not a dependency of
moe_jax) and the bit-packed codes (`entropy_coder='none'`).
"""
from __future__ import annotations

import lzma

import numpy as np

from bench import common
from moe_jax.commands.common import load_config
from moe_jax.inr import codec, fileformat, quantise, volumes

SETTINGS = {  # name: config overrides
    "float16": ["quant_bits=0", "param_dtype=float16"],
    "8-bit tensor": ["quant_bits=8", "quant_granularity=tensor"],
    "8-bit channel": ["quant_bits=8", "quant_granularity=channel"],
    "6-bit tensor": ["quant_bits=6", "quant_granularity=tensor"],
}


def coder_bytes(tensors: list[np.ndarray], bits: int, granularity: str) -> dict[str, int]:
  """Bytes of the concatenated codes (one byte each) under each coder."""
  codes = np.concatenate([quantise.quantise(t, bits, granularity).codes.reshape(-1)
                          for t in tensors])
  raw = codes.tobytes()
  out = {"packed": len(fileformat.pack_codes(codes, bits)),
         "lzma_lc0": len(lzma.compress(raw, lzma.FORMAT_RAW, filters=fileformat._LZMA_FILTERS)),
         "lzma_lc3": len(lzma.compress(raw, lzma.FORMAT_RAW, filters=[
             {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]))}
  try:
    import imagecodecs
    out["zstd19"] = len(imagecodecs.zstd_encode(raw, level=19))
  except ImportError:
    pass
  return out


def main() -> None:
  p = common.parser(__doc__.split("\n")[0], "bench/out/inr_weights.json")
  p.add_argument("--volume", default="anatomical.nii", help="file in nibabel/tests/data")
  p.add_argument("--ratios", default="50,200")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--seeds", default="0", help="comma-separated training seeds")
  p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated rows of SETTINGS")
  args = common.parse(p)
  ratios = [float(r) for r in args.ratios.split(",")]
  steps = 200 if args.quick else args.steps
  source = volumes.load(volumes.example_path(args.volume))
  data = source.data if source.data.ndim == 3 else source.data[..., 0]
  volume = volumes.Volume(data, source.affine, source.meta)
  print(f"{args.volume}: {data.shape} {data.dtype}, {data.nbytes} bytes; {steps} steps",
        flush=True)
  records, coders = [], []
  for seed in [int(s) for s in args.seeds.split(",")]:
    for ratio in ratios:
      for name in args.settings.split(","):
        overrides = SETTINGS[name]
        config = load_config("configs/inr_compress.py:moec", overrides + [  # no rate control:
            "quant_max_bits=0",  # each row stores its setting's bits
            f"train.steps={steps}", "train.log_every=0", f"train.seed={seed}"])
        blob, report = codec.compress(volume, ratio, config)
        records.append({"setting": name, "seed": seed, **report})
        print(f"{name} {ratio:g}x seed {seed}: psnr {report['psnr']:.2f}, "
              f"{report['file_bytes']} B", flush=True)
        if config.quant_bits:
          tensors = codec.Decoder(blob).tensors(0)  # dequantised: re-quantise to the codes
          coders.append({"setting": name, "seed": seed, "ratio_target": ratio,
                         "num_params": report["num_params"],
                         **coder_bytes(tensors, config.quant_bits, config.quant_granularity)})
  common.print_table(records, [
      ("setting", "weights", ""), ("seed", "seed", "d"), ("ratio_target", "target", "g"),
      ("ratio_actual", "actual", ".1f"), ("file_bytes", "file B", "d"),
      ("header_bytes", "header B", "d"), ("table_bytes", "table B", "d"),
      ("param_bytes", "coded B", "d"), ("num_params", "params", "d"), ("width", "H", "d"),
      ("tail_width", "T", "d"), ("psnr", "PSNR dB", ".2f"), ("ssim", "SSIM", ".3f"),
      ("budget_trials", "trials", "d")], title=f"MoEC weight storage on {args.volume}")
  common.print_table(coders, [
      ("setting", "weights", ""), ("seed", "seed", "d"), ("ratio_target", "target", "g"),
      ("num_params", "codes", "d"), ("packed", "packed B", "d"), ("lzma_lc0", "lzma lc0 B", "d"),
      ("lzma_lc3", "lzma lc3 B", "d"), ("zstd19", "zstd-19 B", "d")],
      title="code stream bytes by entropy coder")
  common.write_json(args.out, "inr_weights", args, records + coders,
                    {"volume": args.volume, "shape": list(data.shape), "steps": steps})


if __name__ == "__main__":
  main()
