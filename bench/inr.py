"""MoEC neural compression vs INR baselines and classical codecs at the same bytes.

    python -m bench.inr [--quick] [--volumes example4d.nii.gz,anatomical.nii] \
        [--ratios 50,200,1000,2000] [--seeds 3] [--lrs 1e-3,3e-3] [--steps 300] \
        [--out bench/out/inr.json]

Methods: the INR variants of configs/inr_compress.py (moec: linear gate on coordinates;
moec_mlp: the paper's MLP gate on the encoder features; single SIREN; blocks: fixed 2x2x2 grid;
octree: TINC-style tree) and the classical codecs of moe_jax.inr.classical (spline: downsample +
cubic spline; jpeg2000; jpegxl), each at `original bytes / ratio`. INR widths are solved so the
whole file fits; a codec's quality knob is bisected to fit.

Tuning, equal for every INR: a trial is one learning rate of `--lrs` (same steps, batch and
schedule); each seed keeps its best trial by PSNR (the encoder has the original, so choosing
among trials is part of encoding: `encode_s` sums the trials). Inside a trial, `compress` trains
up to `budget_trials` times to meet the ratio with the measured coded bytes per parameter
(moe_jax/inr/budget.py), the same for every INR. A file still over the budget (the smallest model
does not fit) is kept in the JSON with a note. Seeds `0..seeds-1` give mean and
std. Classical codecs are deterministic (one run). PSNR / SSIM are measured on the decoded file;
`decode_s` is a fresh decompress of seed 0's file (compile included, as for a user of the CLI).

Volumes: names in nibabel/tests/data (the first frame of a 4-D series) or paths to a NIfTI/TIFF.
Writes the JSON (after every ratio, so a cut run keeps its rows), a table, and a PSNR vs ratio
plot per volume next to the JSON (bench/out/inr.png).
"""
from __future__ import annotations

import os
import statistics
import time

from bench import common
from moe_jax.commands.common import load_config
from moe_jax.inr import classical, codec, metrics, volumes

INR_METHODS = ("moec", "moec_mlp", "single", "blocks", "octree")
METHODS = INR_METHODS + classical.CODECS


def _load(name: str) -> tuple[str, volumes.Volume]:
  path = name if os.path.sep in name else volumes.example_path(name)
  source = volumes.load(path)
  data = source.data if source.data.ndim <= 3 else source.data[(...,) + (0,) * (
      source.data.ndim - 3)]  # first frame of a 4-D series
  return os.path.basename(path), volumes.Volume(data, source.affine)


def _inr_trial(volume: volumes.Volume, method: str, ratio: float, seed: int, lr: float,
               steps: int, batch: int, budget_trials: int) -> dict:
  config = load_config(f"configs/inr_compress.py:{method}", [
      f"train.steps={steps}", f"train.batch_size={batch}", "train.log_every=0",
      f"train.seed={seed}", f"train.learning_rate={lr}"]
      + ([f"budget_trials={budget_trials}"] if budget_trials else []))
  blob, report = codec.compress(volume, ratio, config)
  keep = ("psnr", "ssim", "ratio_actual", "file_bytes", "header_bytes", "num_params", "width",
          "tail_width", "compress_s")
  out = {**{k: report[k] for k in keep}, "lr": lr}
  if seed == 0:  # decode time does not depend on the seed: measured once per method and ratio
    start = time.perf_counter()
    codec.decompress(blob, config.render_chunk, config.chunk_batch)
    out["decode_s"] = time.perf_counter() - start
  return out


def _inr_record(volume, method, ratio, seeds, lrs, steps, batch, budget_trials) -> dict:
  per_seed = []
  for seed in range(seeds):
    trials = [_inr_trial(volume, method, ratio, seed, lr, steps, batch, budget_trials)
              for lr in lrs]
    best = max(trials, key=lambda t: t["psnr"])
    per_seed.append({**best, "encode_s": sum(t["compress_s"] for t in trials),
                     "trials": [{"lr": t["lr"], "psnr": t["psnr"]} for t in trials]})
    print(f"  {method} {ratio:g}x seed {seed}: psnr {best['psnr']:.2f} (lr {best['lr']:g})",
          flush=True)
  return {"runs": per_seed, **_summary(per_seed)}


def _classical_record(volume, name, ratio) -> dict:
  data = volume.data
  start = time.perf_counter()
  stream = classical.at_budget(name, data, int(data.nbytes / ratio))
  search_s = time.perf_counter() - start
  start = time.perf_counter()
  classical.encode(name, data, stream.knob)
  encode_s = time.perf_counter() - start
  start = time.perf_counter()
  decoded = classical.decode(stream.blob)
  decode_s = time.perf_counter() - start
  run = {"psnr": metrics.psnr(data, decoded), "ssim": metrics.ssim(data, decoded),
         "ratio_actual": data.nbytes / len(stream.blob), "file_bytes": len(stream.blob),
         "knob": stream.knob, "encode_s": encode_s, "search_s": search_s, "decode_s": decode_s}
  print(f"  {name} {ratio:g}x: psnr {run['psnr']:.2f}", flush=True)
  return {"runs": [run], **_summary([run])}


def _summary(runs: list[dict]) -> dict:
  out = {}
  for key in ("psnr", "ssim", "ratio_actual", "file_bytes", "encode_s", "decode_s"):
    values = [r[key] for r in runs if key in r]
    out[key] = statistics.fmean(values)
    out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
  return out


def _plot(records: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = sorted({r["volume"] for r in records})
  fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
  for ax, name in zip(axes[0], names):
    for method in METHODS:
      rows = sorted((r for r in records if r["volume"] == name and r["method"] == method
                     and "psnr" in r and "note" not in r),  # over-budget files are not plotted
                    key=lambda r: r["ratio_actual"])
      if rows:
        ax.errorbar([r["ratio_actual"] for r in rows], [r["psnr"] for r in rows],
                    yerr=[r["psnr_std"] for r in rows], marker="o" if method in INR_METHODS
                    else "s", linestyle="-" if method in INR_METHODS else "--", label=method,
                    capsize=2)
    ax.set_xscale("log")
    ax.set_title(name)
    ax.set_xlabel("compression ratio (original bytes / file bytes)")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  print(f"wrote {path}", flush=True)


def _table(records: list[dict]) -> None:
  rows = [{**r, "psnr_pm": f"{r['psnr']:.2f} ± {r['psnr_std']:.2f}",
           "ssim_pm": f"{r['ssim']:.3f} ± {r['ssim_std']:.3f}"} if "psnr" in r else r
          for r in records]
  common.print_table(rows, [
      ("volume", "volume", ""), ("method", "method", ""), ("ratio_target", "target", "g"),
      ("ratio_actual", "actual ratio", ".1f"), ("file_bytes", "file B", ".0f"),
      ("psnr_pm", "PSNR dB", ""), ("ssim_pm", "SSIM", ""), ("encode_s", "encode s", ".2f"),
      ("decode_s", "decode s", ".2f"), ("note", "note", "")],
      title="Compression at equal bytes (mean ± std over seeds; classical codecs: one run)")


def main() -> None:
  p = common.parser(__doc__.split("\n")[0], "bench/out/inr.json")
  p.add_argument("--volumes", default="", help="comma-separated (default example4d.nii.gz,"
                 "anatomical.nii; --quick: anatomical.nii)")
  p.add_argument("--ratios", default="", help="comma-separated (default 50,200,1000,2000)")
  p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {METHODS}")
  p.add_argument("--seeds", type=int, default=0, help="seeds per INR (default 3; --quick 1)")
  p.add_argument("--lrs", default="", help="trial learning rates (default 1e-3,3e-3)")
  p.add_argument("--steps", type=int, default=0, help="Adam steps (default 300; --quick 60)")
  p.add_argument("--batch", type=int, default=4096, help="points per step")
  p.add_argument("--budget-trials", type=int, default=0,
                 help="trainings per INR file to meet the ratio (default: the config's)")
  args = common.parse(p)
  quick = args.quick
  names = (args.volumes or ("anatomical.nii" if quick else "example4d.nii.gz,anatomical.nii")
           ).split(",")
  ratios = [float(r) for r in (args.ratios or ("50" if quick else "50,200,1000,2000")).split(",")]
  methods = args.methods.split(",")
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise SystemExit(f"--methods: {unknown} unknown; use a subset of {METHODS}")
  seeds = args.seeds or (1 if quick else 3)
  lrs = [float(x) for x in (args.lrs or ("1e-3" if quick else "1e-3,3e-3")).split(",")]
  steps = args.steps or (60 if quick else 300)
  records, setup = [], {"seeds": seeds, "lrs": lrs, "steps": steps, "batch_size": args.batch,
                        "budget_trials": args.budget_trials or "config",
                        "load_average_start": os.getloadavg()}
  for name in names:
    name, volume = _load(name)
    print(f"{name}: {volume.data.shape} {volume.data.dtype}, {volume.data.nbytes} bytes",
          flush=True)
    for ratio in ratios:
      for method in methods:
        record = {"volume": name, "shape": list(volume.data.shape), "method": method,
                  "ratio_target": ratio, "budget_bytes": int(volume.data.nbytes / ratio)}
        try:
          if method in INR_METHODS:
            record.update(_inr_record(volume, method, ratio, seeds, lrs, steps, args.batch,
                                      args.budget_trials))
          else:
            record.update(_classical_record(volume, method, ratio))
          if any(r["file_bytes"] > record["budget_bytes"] for r in record["runs"]):
            record["note"] = "over the byte budget: the smallest model does not fit"
        except ValueError as e:  # the budget leaves no room for this method
          record["note"] = str(e)[:70]
          print(f"  {method} {ratio:g}x: {e}", flush=True)
        records.append(record)
      common.write_json(args.out, "inr", args, records,
                        {**setup, "load_average_now": os.getloadavg()})
  _table(records)
  if args.out:
    _plot(records, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
  main()
