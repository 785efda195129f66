"""`python -m moe_jax.commands.inr compress|decompress ...`: the MoEC codec (`moe_jax.inr`) on
files, with a one-line report.

    compress   --input VOL (--ratio R | --psnr DB) --out FILE [--config PATH[:variant]]
               [--set key=value ...] [--partition PNG] [--report JSON]
    decompress FILE --out VOL [--config PATH] [--set key=value ...] [--reference VOL]
               [--roi START:STOP,...] [--scale S]

`--roi 0:64,:,10:20` decodes only that region (slices of the output grid, one per axis, missing
axes whole) and only the chunks it touches; `--scale 2` renders at twice the resolution.

`--set key.path=value` overrides a config field as `--config.key.path=value` does for train.
`--ratio` meets a size (original bytes / file bytes), `--psnr` searches the smallest file reaching
a PSNR in dB (config `psnr_search`); either prints a one-line `warning:` on stderr when the
target cannot be met.
Bad inputs (missing file, ratio <= 1, unknown format, bad --set key) exit with one line that
names the fix.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

from moe_jax.commands import common


def _print_report(report: dict) -> None:
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  print("  ".join(f"{k}={fmt(v)}" for k, v in report.items()), flush=True)


def compress(args: argparse.Namespace) -> None:
  from moe_jax.inr import codec, plot, volumes
  config = common.load_config(args.config, args.set)
  volume = volumes.load(args.input)
  log = lambda m: print(m, flush=True)
  with warnings.catch_warnings(record=True) as caught:  # the codec's warnings: one line each
    warnings.simplefilter("always")
    if args.psnr is not None:
      blob, report = codec.compress_to_psnr(volume, args.psnr, config, log)
    else:
      blob, report = codec.compress(volume, args.ratio, config, log)
  for w in caught:
    print(f"warning: {w.message}", file=sys.stderr, flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "wb") as f:
    f.write(blob)
  if args.partition:
    plot.partition_png(blob, volume.data, args.partition, config.render_chunk, config.chunk_batch)
  _print_report(report)
  if args.report:
    with open(args.report, "w") as f:
      json.dump(report, f, indent=1)


def decompress(args: argparse.Namespace) -> None:
  from moe_jax.inr import codec, metrics, volumes
  config = common.load_config(args.config, args.set)
  if not os.path.isfile(args.file):
    raise ValueError(f"compressed file {args.file!r} does not exist: check the path (write one "
                     "with `python -m moe_jax.commands.inr compress`)")
  start = time.perf_counter()
  with open(args.file, "rb") as f:
    blob = f.read()
  roi = parse_roi(args.roi)
  volume = codec.decompress(blob, config.render_chunk, config.chunk_batch, source=args.file,
                            scale=args.scale, roi=roi)
  volumes.save(args.out, volume)
  report = {"shape": "x".join(map(str, volume.data.shape)), "dtype": str(volume.data.dtype),
            "ratio_actual": volume.data.nbytes / len(blob),
            "decompress_s": time.perf_counter() - start}
  if args.reference:
    if args.scale != 1:
      raise ValueError(f"--reference compares at the original resolution: drop it or use "
                       f"--scale 1 (not {args.scale})")
    original = volumes.physical(volumes.load(args.reference))[roi or ()]
    if original.shape != volume.data.shape:
      raise ValueError(f"--reference has shape {original.shape}, the file encodes "
                       f"{volume.data.shape}: pass the volume that was compressed")
    decoded = volumes.physical(volume)  # PSNR / SSIM on physical values
    report.update(psnr=metrics.psnr(original, decoded), ssim=metrics.ssim(original, decoded))
  _print_report(report)


def parse_roi(text: str) -> tuple[slice, ...] | None:
  """`"0:64,:,10:20"` -> slices (empty text: None, the whole volume)."""
  if not text:
    return None
  out = []
  for part in text.split(","):
    bounds = part.split(":")
    try:
      if len(bounds) != 2:
        raise ValueError
      out.append(slice(*(int(b) if b.strip() else None for b in bounds)))
    except ValueError:
      raise ValueError(f"--roi {text!r}: write one START:STOP per axis, comma-separated "
                       "(e.g. 0:64,:,10:20)") from None
  return tuple(out)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m moe_jax.commands.inr",
                              description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("compress", help="volume -> compressed file")
  c.add_argument("--input", required=True, help="NIfTI (.nii, .nii.gz) or TIFF (.tif) volume")
  target = c.add_mutually_exclusive_group(required=True)
  target.add_argument("--ratio", type=float, help="target original/compressed bytes")
  target.add_argument("--psnr", type=float, help="target PSNR (dB): the smallest file reaching it")
  c.add_argument("--out", required=True, help="compressed file to write")
  c.add_argument("--config", default=os.path.join(common.CONFIGS, "inr_compress.py:moec"))
  c.add_argument("--partition", default="", help="PNG of the learned partition (MoEC)")
  c.add_argument("--report", default="", help="JSON file for the report")
  d = sub.add_parser("decompress", help="compressed file -> volume")
  d.add_argument("file", help="file written by compress")
  d.add_argument("--out", required=True, help="volume to write (.nii, .nii.gz, .tif)")
  d.add_argument("--config", default=os.path.join(common.CONFIGS, "inr_decompress.py"))
  d.add_argument("--reference", default="", help="original volume: also report PSNR / SSIM")
  d.add_argument("--roi", default="", help="region to decode, START:STOP per axis (e.g. 0:64,:,8:24)")
  d.add_argument("--scale", type=float, default=1.0, help="resolution factor (2 = twice as fine)")
  for q in (c, d):
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. train.steps=500 (repeatable)")
  return p


def main(argv: list[str] | None = None) -> None:
  args = parser().parse_args(argv)
  try:
    (compress if args.command == "compress" else decompress)(args)
  except ValueError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
