"""MoEC neural compression vs a single INR and a block-wise grid of INRs, PSNR vs ratio.

    python -m bench.inr [--quick] [--volume example4d.nii.gz] [--out bench/out/inr.json]

Every method compresses the same real MRI volume (shipped in the nibabel wheel; default
example4d.nii.gz frame 0, 128x96x24 int16) at each ratio, with widths solved so the whole file
(header + float16 parameters) fits `original bytes / ratio`, and the same training steps and
points per step. PSNR / SSIM are measured on the decompressed file. Writes the JSON, a PSNR vs
ratio plot (bench/out/inr.png) and MoEC's learned partition at the first ratio
(bench/out/inr_partition.png).
"""
from __future__ import annotations

import os

from bench import common
from moe_jax.commands.common import load_config
from moe_jax.inr import codec, plot, volumes

METHODS = ("moec", "single", "blocks")


def _plot(records: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 4))
  for method in METHODS:
    rows = [r for r in records if r["method"] == method and r.get("psnr") is not None]
    ax.plot([r["ratio_actual"] for r in rows], [r["psnr"] for r in rows], "o-", label=method)
  ax.set_xscale("log")
  ax.set_xlabel("compression ratio (original bytes / file bytes)")
  ax.set_ylabel("PSNR (dB)")
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  print(f"wrote {path}", flush=True)


def main() -> None:
  p = common.parser(__doc__.split("\n")[0], "bench/out/inr.json")
  p.add_argument("--volume", default="example4d.nii.gz", help="file in nibabel/tests/data")
  p.add_argument("--ratios", default="", help="comma-separated (default 50,200,1000)")
  args = common.parse(p)
  ratios = [float(r) for r in (args.ratios or ("50,200" if args.quick else "50,200,1000"))
            .split(",")]
  steps, batch = (200, 4096) if args.quick else (500, 8192)
  source = volumes.load(volumes.example_path(args.volume))
  data = source.data if source.data.ndim == 3 else source.data[(...,) + (0,) * (
      source.data.ndim - 3)]  # first frame of a 4-D series
  volume = volumes.Volume(data, source.affine)
  print(f"{args.volume}: {data.shape} {data.dtype}, {data.nbytes} bytes; {steps} steps x "
        f"{batch} points", flush=True)
  records = []
  for ratio in ratios:
    for method in METHODS:
      config = load_config(f"configs/inr_compress.py:{method}", [
          f"train.steps={steps}", f"train.batch_size={batch}", "train.log_every=0"])
      record = {"method": method, "ratio_target": ratio}
      try:
        blob, report = codec.compress(volume, ratio, config)
      except ValueError as e:  # the ratio leaves no room for this model
        records.append({**record, "note": str(e).split(":")[0]})
        print(f"{method} {ratio:g}x: {e}", flush=True)
        continue
      records.append({**record, **report})
      if method == "moec" and ratio == ratios[0] and args.out:
        plot.partition_png(blob, data, os.path.join(os.path.dirname(args.out),
                                                    "inr_partition.png"),
                           config.render_chunk, config.chunk_batch)
      print(f"{method} {ratio:g}x: psnr {report['psnr']:.2f}", flush=True)
  common.print_table(records, [
      ("method", "method", ""), ("ratio_target", "target ratio", "g"),
      ("ratio_actual", "actual ratio", ".1f"), ("file_bytes", "file B", "d"),
      ("num_params", "params", "d"), ("width", "H", "d"), ("tail_width", "T", "d"),
      ("psnr", "PSNR dB", ".2f"), ("ssim", "SSIM", ".3f"), ("train_s", "train s", ".1f"),
      ("compress_s", "compress s", ".1f")], title=f"INR compression of {args.volume}")
  common.write_json(args.out, "inr", args, records,
                    {"volume": args.volume, "shape": list(data.shape), "steps": steps,
                     "batch_size": batch})
  if args.out:
    _plot(records, os.path.join(os.path.dirname(args.out), "inr.png"))


if __name__ == "__main__":
  main()
