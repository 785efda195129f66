"""MoEC neural compression vs INR baselines and classical codecs at the same bytes.

    python -m bench.inr [--quick] [--volumes example4d.nii.gz,anatomical.nii,mni152_t1] \
        [--ratios 50,200,1000,2000] [--seeds 3] [--lrs 1e-3,3e-3] [--steps 300[,1000,...]] \
        [--methods moec,single,...] [--out bench/out/inr.json]

Methods: the INR variants of configs/inr_compress.py (moec: linear gate on coordinates;
moec_mlp: the paper's MLP gate on the encoder features; single SIREN; blocks: fixed 2x2x2 grid;
octree: TINC-style tree), variants for tuning studies (STUDY: MoEC's expert count, top-k, w0
rule, no balancing losses; no rate control) and the classical codecs of moe_jax.inr.classical (spline:
downsample + cubic spline; jpeg2000; jpegxl), each at `original bytes / ratio`. INR widths are
solved so the whole file fits, then the encoder's rate control fills the bytes left with finer
codes (configs/inr_compress.py `quant_max_bits`); a codec's quality knob is bisected to fit.
`--steps` with several values repeats every INR row per step count (a convergence study).

Tuning, equal for every INR: a trial is one learning rate of `--lrs` (same steps, batch and
schedule); each seed keeps its best trial by PSNR (the encoder has the original, so choosing
among trials is part of encoding: `encode_s` sums the trials). `--method-lrs` fixes one learning
rate per method instead (e.g. each method's best of the same lr trials in a tuning run at one
ratio, bench/RESULTS.md). Inside a trial, `compress` trains
up to `budget_trials` times to meet the ratio with the measured coded bytes per parameter
(moe_jax/inr/budget.py), the same for every INR. A file still over the budget (the smallest model
does not fit) is kept in the JSON with a note. Seeds `first..first+seeds-1` (`--first-seed`, so a
later run adds seeds to a table) give mean and
std. Classical codecs are deterministic (one run). PSNR / SSIM are measured on the decoded file;
`decode_s` is the decompress inside `compress` of the file just written (a fresh compile for the
model, as for a user of the CLI), every seed.

Volumes: names in nibabel/tests/data (the first frame of a 4-D series), `mni152_t1` (the MNI152
2009a T1 template in the nilearn wheel, 197x233x189 uint8, 8.7 MB) or paths to a NIfTI/TIFF.
Writes the JSON (after every row, so a cut run keeps its rows), a table, and a PSNR vs ratio
plot per volume next to the JSON (bench/out/inr.png).

    python -m bench.inr --merge a.json,b.json --out bench/out/merged.json

joins runs of several JSONs case by case (volume, method, target ratio, steps): an INR case's
seeds are pooled and re-summarised (seeds added with `--first-seed`); one seed in several files
at other learning rates is a tuning trial (the best PSNR kept, every trial listed; the same seed
and lr twice is an error); a classical codec's single run must agree between the files. Nothing
is trained.
"""
from __future__ import annotations

import json
import os
import statistics
import time

from bench import common, inr_memory
from moe_jax.commands.common import load_config
from moe_jax.inr import classical, codec, metrics, volumes

VARIANTS = ("moec", "moec_mlp", "single", "blocks", "octree")  # configs/inr_compress.py
STUDY = {  # MoEC knobs (the paper's): name -> (config variant, overrides)
    "moec_e8": ("moec", ["model.moe.num_experts=8"]),  # experts: 8 (w0 up to 337.5)
    "moec_k1": ("moec", ["model.moe.router.k=1"]),  # top-1 (the paper's hard assignment)
    "moec_w0flat": ("moec", ["model.w0_expert=(30.0,0.0)"]),  # every expert at w0 = 30
    "moec_nobal": ("moec", ["model.moe.router.loss_weights.importance=0.0",
                            "model.moe.router.loss_weights.load=0.0"]),  # no balancing losses
    # No rate control: 8-bit codes as solved (same seed = same training as moec / single, so
    # the difference is the fill alone).
    "moec_q8": ("moec", ["quant_max_bits=0"]),
    "single_q8": ("single", ["quant_max_bits=0"]),
}
INR_METHODS = VARIANTS + tuple(STUDY)
METHODS = INR_METHODS + classical.CODECS


def _load(name: str) -> tuple[str, volumes.Volume]:
  path = (inr_memory.mni_path() if name == "mni152_t1" else
          name if os.path.sep in name else volumes.example_path(name))
  source = volumes.load(path)
  data = source.data if source.data.ndim <= 3 else source.data[(...,) + (0,) * (
      source.data.ndim - 3)]  # first frame of a 4-D series
  return os.path.basename(path), volumes.Volume(data, source.affine)


def _inr_trial(volume: volumes.Volume, method: str, ratio: float, seed: int, lr: float,
               steps: int, batch: int, budget_trials: int) -> dict:
  variant, overrides = STUDY.get(method, (method, []))
  config = load_config(f"configs/inr_compress.py:{variant}", overrides + [
      f"train.steps={steps}", f"train.batch_size={batch}", "train.log_every=0",
      f"train.seed={seed}", f"train.learning_rate={lr}"]
      + ([f"budget_trials={budget_trials}"] if budget_trials else []))
  _, report = codec.compress(volume, ratio, config)
  keep = ("psnr", "ssim", "ratio_actual", "file_bytes", "header_bytes", "num_params", "width",
          "tail_width", "levels", "code_bits", "base_file_bytes", "compress_s")
  return {**{k: report[k] for k in keep}, "lr": lr, "decode_s": report["decompress_s"]}


def _inr_record(volume, method, ratio, seeds, lrs, steps, batch, budget_trials) -> dict:
  per_seed = []
  for seed in seeds:
    trials = [_inr_trial(volume, method, ratio, seed, lr, steps, batch, budget_trials)
              for lr in lrs]
    best = max(trials, key=lambda t: t["psnr"])
    per_seed.append({**best, "seed": seed, "encode_s": sum(t["compress_s"] for t in trials),
                     "trials": [{"lr": t["lr"], "psnr": t["psnr"]} for t in trials]})
    print(f"  {method} {ratio:g}x {steps} steps seed {seed}: psnr {best['psnr']:.2f} (lr "
          f"{best['lr']:g}, {best['file_bytes']} B, levels {best['levels']})", flush=True)
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
  print(f"  {name} {ratio:g}x: psnr {run['psnr']:.2f}, {len(stream.blob)} B", flush=True)
  return {"runs": [run], **_summary([run])}


def _summary(runs: list[dict]) -> dict:
  out = {}
  for key in ("psnr", "ssim", "ratio_actual", "file_bytes", "encode_s", "decode_s"):
    values = [r[key] for r in runs if key in r]
    out[key] = statistics.fmean(values)
    out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
  return out


def _label(r: dict, many_steps: bool) -> str:
  return f"{r['method']} {r['steps']} steps" if many_steps and "steps" in r else r["method"]


def _plot(records: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = sorted({r["volume"] for r in records})
  many = len({r.get("steps") for r in records if "steps" in r}) > 1
  fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
  for ax, name in zip(axes[0], names):
    ok = [r for r in records if r["volume"] == name and "psnr" in r
          and "note" not in r]  # over-budget files are not plotted
    for label in dict.fromkeys(_label(r, many) for r in ok):
      rows = sorted((r for r in ok if _label(r, many) == label), key=lambda r: r["ratio_actual"])
      inr = rows[0]["method"] in INR_METHODS
      ax.errorbar([r["ratio_actual"] for r in rows], [r["psnr"] for r in rows],
                  yerr=[r["psnr_std"] for r in rows], marker="o" if inr else "s",
                  linestyle="-" if inr else "--", label=label, capsize=2)
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
           "ssim_pm": f"{r['ssim']:.3f} ± {r['ssim_std']:.3f}",
           "fill": 100 * r["file_bytes"] / r["budget_bytes"]} if "psnr" in r else r
          for r in records]
  common.print_table(rows, [
      ("volume", "volume", ""), ("method", "method", ""), ("steps", "steps", "d"),
      ("ratio_target", "target", "g"), ("ratio_actual", "actual ratio", ".1f"),
      ("file_bytes", "file B", ".0f"), ("fill", "% of budget", ".1f"),
      ("psnr_pm", "PSNR dB", ""), ("ssim_pm", "SSIM", ""), ("encode_s", "encode s", ".2f"),
      ("decode_s", "decode s", ".2f"), ("note", "note", "")],
      title="Compression at equal bytes (mean ± std over seeds; classical codecs: one run)")


def _budget_note(record: dict) -> dict:
  """{'note': ...} when a run's file is over the record's byte budget, else {}."""
  if any(r["file_bytes"] > record["budget_bytes"] for r in record["runs"]):
    return {"note": "over the byte budget: the smallest model does not fit"}
  return {}


def read_documents(paths: list[str]) -> dict[str, dict]:
  """{path: bench.inr JSON document}; an unreadable or foreign file is a one-line error."""
  documents = {}
  for path in paths:
    try:
      with open(path) as f:
        documents[path] = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise SystemExit(f"--merge: cannot read {path}: {e}") from None
    if documents[path].get("bench") != "inr":
      raise SystemExit(f"--merge: {path} is not a bench.inr JSON (its 'bench' is "
                       f"{documents[path].get('bench')!r})")
  return documents


def _case(record: dict) -> tuple:
  return (record["volume"], record["method"], record["ratio_target"], record.get("steps"))


def _join_trials(case: tuple, have: dict, run: dict, path: str) -> dict:
  """The better of two runs of one seed at different learning rates, with both trials listed."""
  trials = have.get("trials", [{"lr": have["lr"], "psnr": have["psnr"]}]) + run.get(
      "trials", [{"lr": run["lr"], "psnr": run["psnr"]}])
  lrs = [t["lr"] for t in trials]
  if len(set(lrs)) < len(lrs):
    raise SystemExit(f"--merge: seed {run['seed']} of {case} at lr {run['lr']:g} is in {path} "
                     "and an earlier file; merge disjoint seeds or other learning rates")
  best = max((have, run), key=lambda r: r["psnr"])
  return {**best, "trials": trials, "encode_s": best["compress_s"]}


def _with_seeds(runs: list[dict], doc: dict, path: str) -> list[dict]:
  """Runs with their seed (files written before runs kept it: seeds 0..`seeds`-1, in order)."""
  if all("seed" in r for r in runs):
    return runs
  if not isinstance(doc.get("seeds"), int) or doc["seeds"] != len(runs):
    raise SystemExit(f"--merge: {path} names no seed for its runs; re-run it")
  return [{**r, "seed": seed} for seed, r in enumerate(runs)]


def merge(documents: dict[str, dict]) -> list[dict]:
  """Joins the records of several bench.inr JSONs {path: document} into one list, in order.

  An INR case pools its seeds; a seed found in several files is a learning-rate trial: the best
  PSNR is kept (as in one run with several --lrs), its `encode_s` is that training's alone."""
  merged: dict[tuple, dict] = {}
  for path, doc in documents.items():
    for record in doc["records"]:
      key = _case(record)
      if record["method"] in INR_METHODS and "runs" in record:
        record = {**record, "runs": _with_seeds(record["runs"], doc, path)}
      have = merged.get(key)
      if have is None or "runs" not in have:
        merged[key] = dict(record)
        continue
      if "runs" not in record:  # a case that did not fit in this file: keep the one that ran
        continue
      if record["method"] not in INR_METHODS:
        if record["runs"][0]["file_bytes"] != have["runs"][0]["file_bytes"]:
          raise SystemExit(f"--merge: {path} has another {key} codec run than an earlier file "
                           "(classical codecs are deterministic: merge files of one tree)")
        continue
      by_seed = {r["seed"]: r for r in have["runs"]}
      for run in record["runs"]:
        seed = run["seed"]
        by_seed[seed] = _join_trials(key, by_seed[seed], run, path) if seed in by_seed else run
      runs = [by_seed[s] for s in sorted(by_seed)]
      merged[key] = {k: v for k, v in have.items() if k != "note"}
      merged[key].update(runs=runs, **_summary(runs))
      merged[key].update(_budget_note(merged[key]))
  return list(merged.values())


def _trials_table(records: list[dict]) -> None:
  """Learning-rate trials per INR case (the seeds that ran several), best marked with *."""
  rows = []
  for r in records:
    for run in r.get("runs", []):
      if len(run.get("trials", [])) > 1:
        trials = sorted(run["trials"], key=lambda t: t["lr"])
        rows.append({**r, "seed": run["seed"], "trials": ", ".join(
            f"{t['lr']:g}: {t['psnr']:.2f}" + ("*" if t["lr"] == run["lr"] else "")
            for t in trials)})
  if rows:
    common.print_table(rows, [("volume", "volume", ""), ("method", "method", ""),
                              ("ratio_target", "target", "g"), ("seed", "seed", "d"),
                              ("trials", "lr: PSNR dB (* kept)", "")],
                       title="Learning-rate trials")


def main() -> None:
  p = common.parser(__doc__.split("\n")[0], "bench/out/inr.json")
  p.add_argument("--volumes", default="", help="comma-separated (default example4d.nii.gz,"
                 "anatomical.nii; --quick: anatomical.nii; mni152_t1: nilearn's template)")
  p.add_argument("--ratios", default="", help="comma-separated (default 50,200,1000,2000)")
  p.add_argument("--methods", default=",".join(VARIANTS + classical.CODECS),
                 help=f"subset of {METHODS}")
  p.add_argument("--seeds", type=int, default=0, help="seeds per INR (default 3; --quick 1)")
  p.add_argument("--first-seed", type=int, default=0, help="the first INR seed")
  p.add_argument("--lrs", default="", help="trial learning rates (default 1e-3,3e-3)")
  p.add_argument("--method-lrs", default="", help="per-method trial learning rates replacing "
                 "--lrs for those methods, e.g. 'single=3e-3,moec=1e-3' (one trial each)")
  p.add_argument("--steps", default="", help="Adam steps, comma-separated for a convergence "
                 "study (default 300; --quick 60)")
  p.add_argument("--batch", type=int, default=4096, help="points per step")
  p.add_argument("--budget-trials", type=int, default=0,
                 help="trainings per INR file to meet the ratio (default: the config's)")
  p.add_argument("--merge", default="", help="comma-separated JSONs of earlier runs to join "
                 "into --out (nothing is trained; the other options are ignored)")
  args = common.parse(p)
  if args.merge:
    if args.out and os.path.exists(args.out):
      raise SystemExit(f"--out {args.out} exists (maybe one of --merge's inputs); name a new "
                       "file")
    documents = read_documents(args.merge.split(","))
    records = merge(documents)
    common.write_json(args.out, "inr", args, records,
                      {"merged_from": {p: d.get("args", {}) for p, d in documents.items()}})
    _table(records)
    _trials_table(records)
    if args.out:
      _plot(records, os.path.splitext(args.out)[0] + ".png")
    return
  quick = args.quick
  names = (args.volumes or ("anatomical.nii" if quick else "example4d.nii.gz,anatomical.nii")
           ).split(",")
  ratios = [float(r) for r in (args.ratios or ("50" if quick else "50,200,1000,2000")).split(",")]
  methods = args.methods.split(",")
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise SystemExit(f"--methods: {unknown} unknown; use a subset of {METHODS}")
  seeds = range(args.first_seed, args.first_seed + (args.seeds or (1 if quick else 3)))
  lrs = [float(x) for x in (args.lrs or ("1e-3" if quick else "1e-3,3e-3")).split(",")]
  method_lrs = {m: [float(x)] for m, x in (kv.split("=") for kv in args.method_lrs.split(",")
                                           if kv)}
  step_counts = [int(x) for x in (args.steps or ("60" if quick else "300")).split(",")]
  records, setup = [], {"seeds": list(seeds), "lrs": lrs, "method_lrs": method_lrs,
                        "steps": step_counts,
                        "batch_size": args.batch, "budget_trials": args.budget_trials or "config",
                        "load_average_start": os.getloadavg()}
  for name in names:
    name, volume = _load(name)
    print(f"{name}: {volume.data.shape} {volume.data.dtype}, {volume.data.nbytes} bytes",
          flush=True)
    for ratio in ratios:
      for method in methods:
        for steps in (step_counts if method in INR_METHODS else [None]):
          record = {"volume": name, "shape": list(volume.data.shape), "method": method,
                    "ratio_target": ratio, "budget_bytes": int(volume.data.nbytes / ratio),
                    **({"steps": steps} if steps else {})}
          try:
            if method in INR_METHODS:
              record.update(_inr_record(volume, method, ratio, seeds,
                                        method_lrs.get(method, lrs), steps, args.batch,
                                        args.budget_trials))
            else:
              record.update(_classical_record(volume, method, ratio))
            record.update(_budget_note(record))
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
