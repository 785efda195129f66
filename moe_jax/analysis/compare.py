"""Routing-strategy comparison: train one model under several strategies, one summary row per
finished run, a table, JSON and a plot (the command: `python -m moe_jax.commands.compare`).

For each name in `config.only` the model node `config.strategies.<name>` replaces `config.model`
(same data, seed, batch and steps); the run trains into DIR/<name> (resuming if interrupted) and
is evaluated with routing analysis. Then every finished run in DIR is summarised: the table is
printed and written with the rows to DIR/compare.json, and DIR/compare.png plots accuracy and
step time. `config.train=False` only rebuilds the table (e.g. after one job per strategy).

A run folder (one strategy) holds `strategy.json` (written before training: name, forward FLOPs
per token), `metrics.jsonl` and `eval.json` (written by the trainer and `evaluate_checkpoint`).
Rows can therefore be rebuilt at any time from whatever runs have finished, e.g. when each
strategy ran as its own job on a pod.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
from flax import nnx

from moe_jax import models
from moe_jax.train import loop

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STRATEGY_FILE = "strategy.json"
# (row key, column title, format) in table order.
COLUMNS = (("strategy", "strategy", "{}"), ("accuracy", "test acc", "{:.4f}"),
           ("loss", "test loss", "{:.4f}"), ("step_ms", "step ms", "{:.1f}"),
           ("mflops_per_token", "fwd MFLOP/token", "{:.3f}"),
           ("dropped_fraction", "drop rate", "{:.4f}"), ("load_cv", "load CV", "{:.3f}"),
           ("router_entropy", "router entropy", "{:.3f}"),
           ("specialisation", "specialisation", "{:.3f}"))


def forward_flops_per_token(model_config: ml_collections.ConfigDict, image_shape: tuple[int, ...],
                            batch: int = 8) -> float:
  """XLA's FLOP count of one eval forward pass of `batch` images, per patch token (what the
  compiled program executes: capacity buffers included, routers included)."""
  model = models.build_model(model_config, rngs=nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
  cost = forward.lower(state, images).compile().cost_analysis() or {}
  tokens = batch * (model_config.image_size // model_config.patch_size) ** 2
  return float(cost.get("flops", 0.0)) / tokens


def write_strategy(workdir: str, name: str, flops_per_token: float) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, STRATEGY_FILE), "w") as f:
    json.dump({"strategy": name, "flops_per_token": flops_per_token}, f)


def _mean_over_layers(layers: dict, key: str) -> float | None:
  values = [r[key] for r in layers.values() if key in r]
  return float(np.mean(values)) if values else None


def summarise_run(workdir: str) -> dict | None:
  """The comparison row of one finished run, or None if it has not finished (no eval.json).

  Routing columns average the MoE layers; None where they do not apply (dense; no drops under
  Soft MoE / expert choice, whose layers report no `dropped_fraction`)."""
  paths = {k: os.path.join(workdir, f) for k, f in
           (("strategy", STRATEGY_FILE), ("eval", "eval.json"), ("metrics", "metrics.jsonl"))}
  if not all(os.path.exists(p) for p in paths.values()):
    return None
  with open(paths["strategy"]) as f:
    strategy = json.load(f)
  with open(paths["eval"]) as f:
    result = json.load(f)
  with open(paths["metrics"]) as f:
    rates = [r["train/steps_per_sec"] for r in map(json.loads, f) if "train/steps_per_sec" in r]
  layers = result["routing"]["layers"]
  return {"strategy": strategy["strategy"], "accuracy": result["eval/accuracy"],
          "loss": result["eval/loss"], "step": result["step"],
          "step_ms": 1e3 / float(np.median(rates)) if rates else None,
          "mflops_per_token": strategy["flops_per_token"] / 1e6,
          "dropped_fraction": _mean_over_layers(layers, "dropped_fraction"),
          "load_cv": _mean_over_layers(layers, "load_cv"),
          "router_entropy": _mean_over_layers(layers, "router_entropy"),
          "specialisation": _mean_over_layers(layers, "normalized_mi"),
          "recommend_dense": result["routing"]["recommend_dense"]}


def table(rows: list[dict]) -> str:
  """A Markdown table of the rows (`-` where a column does not apply)."""
  lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
           "|" + "---|" * len(COLUMNS)]
  for row in rows:
    cells = ["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_comparison(rows: list[dict], path: str) -> str:
  """Test accuracy and step time per strategy, side by side, as one PNG."""
  names = [r["strategy"] for r in rows]
  positions = range(len(rows))
  fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
  accuracies = [r["accuracy"] for r in rows]
  left.bar(positions, accuracies, color="tab:blue")
  left.set(ylabel="test accuracy", ylim=(max(0.0, min(accuracies) - 0.02), 1.0),
           title="accuracy")
  right.bar(positions, [r["step_ms"] or 0.0 for r in rows], color="tab:orange")
  right.set(ylabel="ms / train step", title="step time")
  for ax in (left, right):
    ax.set_xticks(positions, names, rotation=35, ha="right")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def strategy_names(config: ml_collections.ConfigDict) -> list[str]:
  """The strategies of `config.only`, in its order; ValueError naming the choices."""
  names = [n.strip() for n in config.only.split(",") if n.strip()]
  unknown = [n for n in names if n not in config.strategies]
  if unknown or not names:
    raise ValueError(f"config.only={config.only!r}: name strategies from "
                     f"{sorted(config.strategies)}")
  return names


def run_strategy(config: ml_collections.ConfigDict, name: str, workdir: str) -> None:
  """Trains (or resumes) and evaluates one strategy into `workdir`."""
  run = config.copy_and_resolve_references()
  with run.unlocked():
    run.model = run.strategies[name]
    for key in ("strategies", "only", "train"):
      del run[key]
  image_shape = (run.data.image_size, run.data.image_size, run.model.channels)
  write_strategy(workdir, name, forward_flops_per_token(run.model, image_shape))
  print(f"== {name}", flush=True)
  loop.train_and_evaluate(run, workdir)
  loop.evaluate_checkpoint(run, workdir)


def compare_all(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains the strategies of `config.only` (if `config.train`), then summarises every finished
  run in `workdir`: the rows, also printed as a table, written to compare.json and plotted."""
  names = strategy_names(config)
  if config.train:
    for name in names:
      run_strategy(config, name, os.path.join(workdir, name))
  rows = [r for r in (summarise_run(os.path.join(workdir, n)) for n in
                      sorted(os.listdir(workdir)) if os.path.isdir(os.path.join(workdir, n)))
          if r is not None]
  order = {n: i for i, n in enumerate(names)}
  rows.sort(key=lambda r: (order.get(r["strategy"], len(order)), r["strategy"]))
  if not rows:
    raise ValueError(f"no finished runs in {workdir}; run with --config.train=True first")
  text = table(rows)
  print(text)
  with open(os.path.join(workdir, "compare.json"), "w") as f:
    json.dump({"rows": rows, "table": text}, f, indent=1)
  plot_comparison(rows, os.path.join(workdir, "compare.png"))
  return rows
