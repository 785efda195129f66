"""Fine-tuning study: a trained run -> another dataset and resolution, against the same run from
scratch, over seeds (`configs/vimoe_finetune.py`).

    python train.py --workdir workdirs/vimoe_tiny_mnist     # the source (the default job)
    python -m bench.finetune_study --source workdirs/vimoe_tiny_mnist --seeds 0 1 2

Each seed trains `vimoe_finetune.py:digits` (initialised from `--source`: MNIST 28x28 ->
sklearn digits at 21x21, head re-initialised) and `vimoe_finetune.py:scratch` (the same run
from a fresh initialisation), alternating, in one process, and records every evaluation's test
accuracy. Prints a table (mean, std and each seed) and writes `bench/out/finetune_study.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from bench import common
from moe_jax.commands import common as commands
from moe_jax.train import loop

VARIANTS = ("digits", "scratch")  # fine-tuned, from scratch


def eval_accuracies(workdir: str) -> dict[int, float]:
  """{step: test/accuracy} (the config's `test` eval) of a finished run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["test/accuracy"] for r in records if "test/accuracy" in r}


def run(variant: str, seed: int, source: str, steps: int, root: str) -> dict:
  overrides = [f"seed={seed}", f"total_steps={steps}"]
  if variant != "scratch":
    overrides.append(f"init_from.path={source}")
  config = commands.load_config(f"configs/vimoe_finetune.py:{variant}", overrides)
  workdir = os.path.join(root, f"{variant}_seed{seed}")
  start = time.perf_counter()
  loop.train_and_evaluate(config, workdir)
  return {"variant": variant, "seed": seed, "seconds": time.perf_counter() - start,
          "accuracy": eval_accuracies(workdir)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--source", default="workdirs/vimoe_tiny_mnist", help="workdir of the source run")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--out", default="bench/out/finetune_study.json", help="JSON ('' = none)")
  args = p.parse_args()
  if not os.path.isdir(os.path.join(args.source, "checkpoints")):
    raise SystemExit(f"error: --source {args.source} has no checkpoints/: train it first "
                     f"(python train.py --workdir {args.source})")
  runs = []
  with tempfile.TemporaryDirectory() as root:
    for seed in args.seeds:
      for variant in VARIANTS:
        runs.append(run(variant, seed, args.source, args.steps, root))
        print(f"{variant} seed {seed}: {runs[-1]['accuracy']}", flush=True)
  rows = []
  for variant in VARIANTS:
    mine = [r for r in runs if r["variant"] == variant]
    for step in sorted(mine[0]["accuracy"]):
      accs = [100 * r["accuracy"][step] for r in mine]
      rows.append(dict(run=variant, step=step, mean=statistics.mean(accs),
                       std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                       seeds=" / ".join(f"{a:.1f}" for a in accs),
                       seconds=statistics.median(r["seconds"] for r in mine)))
  common.print_table(rows, [("run", "run", ""), ("step", "step", ""),
                            ("mean", "mean test acc %", ".1f"), ("std", "std", ".1f"),
                            ("seeds", "per seed", ""), ("seconds", "median s / run", ".0f")])
  common.write_json(args.out, "finetune_study", args, runs)


if __name__ == "__main__":
  main()
