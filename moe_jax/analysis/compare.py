"""Routing-strategy comparison: one summary row per finished run, a table, JSON and a plot.

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
