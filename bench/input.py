"""Input pipeline throughput on a generated dataset in the real `imagenet2012` tfds format.

    python -m bench.input [--quick] [--data_dir DIR] [--out bench/out/input.json]

Writes ~500x375 JPEGs (`moe_jax.data.synthetic`, 1000 classes) into `--data_dir` once, then
times `moe_jax.data.make_dataset` (the real path: array_record read, tfds SkipDecoding, the pp
ops, grain) for the ImageNet train pipeline with RandAugment, without it, and the eval
pipeline, in-process on one core (no read-ahead threads, no workers: images/s = images/s per
core), interleaved round by round, as wall-clock images/s and as images per CPU-second of this
process (what a core does when it is not shared); then the train pipeline with
`data.num_workers` grain worker processes (wall-clock images/s / min(workers, cores)). Prints
`N img/s/core` per case; the title gives the load average (a shared machine deflates wall-clock
rates).
Reference need: a v5p host (4 chips, 208 vCPUs) training ViT-B/16 at 50% MFU takes ~4 x 4,400
img/s, i.e. ~85 img/s per vCPU.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds

from bench import common
from moe_jax import data
from moe_jax.data import synthetic

BATCH = 32
PIPELINES = {
    "train (inception_crop, flip, randaug(2,15), mixup)":
        ("train", "decode|inception_crop|flip_lr|randaug(2, 15)|normalize|mixup(0.2)"),
    "train (inception_crop, flip)": ("train", "decode|inception_crop|flip_lr|normalize"),
    "eval (resize_small(256), central_crop)":
        ("validation", "decode|resize_small(256)|central_crop|normalize"),
}


def stats(rates: list[float]) -> dict[str, float]:
  """Median and quartiles of per-round rates."""
  q1, median, q3 = np.percentile(rates, [25, 50, 75])
  return {"img_s_core": float(median), "img_s_core_q1": float(q1), "img_s_core_q3": float(q3),
          "n": len(rates)}


def imagenet_config(data_dir: str, pp: str, split: str, workers: int = 0):
  c = data.default_config()
  c.name, c.data_dir, c.image_size, c.channels, c.num_classes = (
      "imagenet2012", data_dir, 224, 3, 1000)
  c.normalization = "imagenet"
  c.pp_train = pp if split == "train" else "decode|inception_crop|normalize"
  c.prefetch_threads, c.num_workers = (0, workers)
  return c


def endless(config, split: str, pp: str):
  """An iterator of batches of `split`: train batches (`data.pp_train`), or eval passes (`pp`)
  one after another."""
  if split == "train":
    yield from data.make_dataset(config, split, batch_size=BATCH, seed=0, train=True)
  ds = data.make_dataset(config, split, batch_size=BATCH, train=False, eval_pp=pp)
  while True:
    yield from ds


def main() -> None:
  p = common.parser(__doc__.split("\n")[0], "bench/out/input.json")
  p.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "moe_jax_bench_input"))
  p.add_argument("--workers", type=int, default=2, help="grain worker processes (last case)")
  args = common.parse(p)
  reps = args.reps or (3 if args.quick else 7)
  batches_per_rep = 2 if args.quick else 4
  start = time.perf_counter()
  builder = synthetic.write_imagenet2012(args.data_dir, num_train=512, num_validation=256)
  print(f"dataset in {args.data_dir} ({time.perf_counter() - start:.0f} s)", flush=True)
  source = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
  sample = [source[i] for i in range(64)]
  jpeg_kb = float(np.mean([len(e["image"]) for e in sample]) / 1e3)

  iterators = {name: endless(imagenet_config(args.data_dir, pp, split), split, pp)
               for name, (split, pp) in PIPELINES.items()}
  for it in iterators.values():
    next(it)  # warm-up: readers open, first epoch's permutation
  images = BATCH * batches_per_rep
  wall = {name: [] for name in PIPELINES}
  cpu = {name: [] for name in PIPELINES}
  names = list(PIPELINES)
  for r in range(reps):  # interleaved, order rotating (see bench.common.time_interleaved)
    for name in names[r % len(names):] + names[:r % len(names)]:
      w0, c0 = time.perf_counter(), time.process_time()
      for _ in range(batches_per_rep):
        next(iterators[name])
      wall[name].append(images / (time.perf_counter() - w0))
      cpu[name].append(images / (time.process_time() - c0))
  records = []
  for name, (split, pp) in PIPELINES.items():
    records.append({"case": name, "pp": pp, "workers": 0, "cores": 1, **stats(wall[name]),
                    "img_per_cpu_s": float(np.median(cpu[name]))})

  name, (split, pp) = next(iter(PIPELINES.items()))
  it = endless(imagenet_config(args.data_dir, pp, split, workers=args.workers), split, pp)
  for _ in range(args.workers * 2):  # workers started and their first batches out
    next(it)
  rates = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(batches_per_rep):
      next(it)
    rates.append(images / (time.perf_counter() - t0))
  cores = min(args.workers, os.cpu_count() or 1)
  records.append({"case": f"{name}, {args.workers} workers", "pp": pp, "workers": args.workers,
                  "cores": cores, **stats([r / cores for r in rates]), "img_per_cpu_s": None})

  load = os.getloadavg()[0]
  common.print_table(records, [("case", "pipeline", ""), ("cores", "cores", ""),
                               ("img_s_core", "img/s/core (wall, median)", ".0f"),
                               ("img_s_core_q1", "q1", ".0f"), ("img_s_core_q3", "q3", ".0f"),
                               ("img_per_cpu_s", "img per CPU-second", ".0f"),
                               ("n", "rounds", "")],
                     title=f"Input pipeline, 224x224, batch {BATCH}, JPEG mean {jpeg_kb:.0f} KB, "
                           f"load average {load:.1f} on {os.cpu_count()} cores")
  for r in records:
    print(f"{r['case']}: {r['img_s_core']:.0f} img/s/core")
  common.write_json(args.out, "input", args, records, {"jpeg_mean_kb": jpeg_kb,
                                                      "load_average": load})


if __name__ == "__main__":
  main()
