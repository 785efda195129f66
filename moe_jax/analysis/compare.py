"""Routing-strategy comparison: train one model under several strategies, one summary row per
finished run, a table, JSON and a plot (the command: `python -m moe_jax.commands.compare`).

For each name in `config.only` the model node `config.strategies.<name>` replaces `config.model`
(same data, batch and steps). `config.num_experts` (e.g. "8,32,64"; "" = as configured) expands
every MoE strategy into one row per expert count, `<name>_E<count>` (dense stays one row).
Each row trains once per seed of `config.seeds` (e.g. "0,1,2") into DIR/<row>/seed<k> (resuming
if interrupted) and is evaluated with routing analysis. Then every finished run in DIR is
summarised and the runs of a row are aggregated (mean, and std over seeds for accuracy, loss and
specialisation): the table is printed and written with the rows to DIR/compare.json, and
DIR/compare.png plots accuracy and step time. `config.per_layer=True` adds a table of each MoE
layer's specialisation. `config.train=False` only rebuilds the tables (e.g. after one job per
strategy).

A run folder (one strategy and seed) holds `strategy.json` (written before training: row name,
seed, forward FLOPs per token), `metrics.jsonl` and `eval_<name>.json` (written by the trainer
and `evaluate_checkpoint`; `<name>` the config's single `config.evals` entry, e.g. `test`). Rows can therefore be rebuilt at any time from whatever runs have
finished, e.g. when each strategy ran as its own job on a pod.
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
from moe_jax.analysis import plots
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
           ("specialisation", "specialisation", "{:.3f}"), ("seeds", "seeds", "{}"))
# Row keys aggregated over seeds as mean ± std (the others: mean).
SPREAD = ("accuracy", "loss", "specialisation")


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


def write_strategy(workdir: str, name: str, seed: int, flops_per_token: float) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, STRATEGY_FILE), "w") as f:
    json.dump({"strategy": name, "seed": seed, "flops_per_token": flops_per_token}, f)


def _mean_over_layers(layers: dict, key: str) -> float | None:
  values = [r[key] for r in layers.values() if key in r]
  return float(np.mean(values)) if values else None


def comparison_eval(config: ml_collections.ConfigDict) -> str:
  """The name of the one `config.evals` entry the rows are built from; ValueError unless there
  is exactly one."""
  if len(config.evals) != 1:
    raise ValueError(f"config.evals has {list(config.evals)}: the comparison needs exactly one "
                     f"evaluation (its accuracy and routing make the rows)")
  return next(iter(config.evals))


def summarise_run(workdir: str, eval_name: str) -> dict | None:
  """The comparison row of one finished run from its `eval_<eval_name>.json`, or None if it
  has not finished (no such file).
  `seed` is None for a run written before seeds were recorded.

  Routing columns average the MoE layers; None where they do not apply (dense; no drops under
  Soft MoE / expert choice, whose layers report no `dropped_fraction`)."""
  paths = {k: os.path.join(workdir, f) for k, f in
           (("strategy", STRATEGY_FILE), ("eval", f"eval_{eval_name}.json"),
            ("metrics", "metrics.jsonl"))}
  if not all(os.path.exists(p) for p in paths.values()):
    return None
  with open(paths["strategy"]) as f:
    strategy = json.load(f)
  with open(paths["eval"]) as f:
    result = json.load(f)
  with open(paths["metrics"]) as f:
    rates = [r["train/steps_per_sec"] for r in map(json.loads, f) if "train/steps_per_sec" in r]
  layers = result["routing"]["layers"]
  return {"strategy": strategy["strategy"], "seed": strategy.get("seed"),
          "accuracy": result[f"{eval_name}/accuracy"],
          "loss": result[f"{eval_name}/loss"], "step": result["step"],
          "step_ms": 1e3 / float(np.median(rates)) if rates else None,
          "mflops_per_token": strategy["flops_per_token"] / 1e6,
          "dropped_fraction": _mean_over_layers(layers, "dropped_fraction"),
          "load_cv": _mean_over_layers(layers, "load_cv"),
          "router_entropy": _mean_over_layers(layers, "router_entropy"),
          "specialisation": _mean_over_layers(layers, "normalized_mi"),
          "layer_specialisation": {n: r["normalized_mi"] for n, r in layers.items()
                                   if "normalized_mi" in r},
          "recommend_dense": result["routing"]["recommend_dense"]}


def _mean_std(values: list) -> tuple[float | None, float | None]:
  """Mean and sample std (None for one value); (None, None) if any value is None."""
  if not values or any(v is None for v in values):
    return None, None
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def aggregate(runs: list[dict]) -> list[dict]:
  """One row per strategy from its runs' rows (one per seed), in first-seen order: `seeds` (the
  count) and `seed_list`; mean and `<key>_std` for `SPREAD` and for each layer's specialisation
  (`layer_specialisation[_std]`); the mean of the other numbers; `step` the fewest steps of any
  seed; `recommend_dense` the layers every seed recommends."""
  groups: dict[str, list[dict]] = {}
  for run in runs:
    groups.setdefault(run["strategy"], []).append(run)
  rows = []
  for name, group in groups.items():
    row = {"strategy": name, "seeds": len(group), "seed_list": [r["seed"] for r in group],
           "step": min(r["step"] for r in group)}
    for key in ("step_ms", "mflops_per_token", "dropped_fraction", "load_cv", "router_entropy",
                *SPREAD):
      row[key], std = _mean_std([r[key] for r in group])
      if key in SPREAD:
        row[f"{key}_std"] = std
    layers = [n for n in group[0]["layer_specialisation"]
              if all(n in r["layer_specialisation"] for r in group)]
    spread = {n: _mean_std([r["layer_specialisation"][n] for r in group]) for n in layers}
    row["layer_specialisation"] = {n: m for n, (m, _) in spread.items()}
    row["layer_specialisation_std"] = {n: s for n, (_, s) in spread.items()}
    row["recommend_dense"] = sorted(set.intersection(*(set(r["recommend_dense"]) for r in group)))
    rows.append(row)
  return rows


def _cell(value: float | None, std: float | None, fmt: str) -> str:
  """`value` (± `std` when given) in `fmt`; `-` for None."""
  if value is None:
    return "-"
  return fmt.format(value) + ("" if std is None else " ± " + fmt.format(std))


def _markdown(titles: list[str], cells: list[list[str]]) -> str:
  lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def table(rows: list[dict]) -> str:
  """A Markdown table of the aggregated rows (`-` where a column does not apply; mean ± std over
  seeds for `SPREAD` when a row has several)."""
  return _markdown([title for _, title, _ in COLUMNS],
                   [[_cell(row.get(key), row.get(f"{key}_std"), fmt) for key, _, fmt in COLUMNS]
                    for row in rows])


def layer_table(rows: list[dict]) -> str:
  """A Markdown table of each MoE layer's specialisation (mean ± std over seeds) per row."""
  layers = sorted({n for r in rows for n in r["layer_specialisation"]},
                  key=lambda n: [int(p) if p.isdigit() else p for p in n.split("/")])
  return _markdown(["strategy", *(f"{plots.short_name(n)} spec." for n in layers)],
                   [[row["strategy"], *(_cell(row["layer_specialisation"].get(n),
                                              row["layer_specialisation_std"].get(n), "{:.3f}")
                                        for n in layers)] for row in rows])


def plot_comparison(rows: list[dict], path: str) -> str:
  """Test accuracy and step time per strategy, side by side, as one PNG."""
  names = [r["strategy"] for r in rows]
  positions = range(len(rows))
  fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
  accuracies = [r["accuracy"] for r in rows]
  left.bar(positions, accuracies, yerr=[r["accuracy_std"] or 0.0 for r in rows],
           color="tab:blue")
  left.set(ylabel="test accuracy", ylim=(max(0.0, min(accuracies) - 0.02), 1.0),
           title="accuracy")
  right.bar(positions, [r["step_ms"] or 0.0 for r in rows], color="tab:orange")
  right.set(ylabel="ms / train step", title="step time")
  for ax in (left, right):
    ax.set_xticks(positions, names, rotation=35, ha="right")
  fig.tight_layout()
  return plots.save_png(fig, path)


def strategy_names(config: ml_collections.ConfigDict) -> list[str]:
  """The strategies of `config.only`, in its order; ValueError naming the choices."""
  names = [n.strip() for n in config.only.split(",") if n.strip()]
  unknown = [n for n in names if n not in config.strategies]
  if unknown or not names:
    raise ValueError(f"config.only={config.only!r}: name strategies from "
                     f"{sorted(config.strategies)}")
  return names


def _int_list(config: ml_collections.ConfigDict, field: str, minimum: int) -> list[int]:
  """`config.<field>` ("0,1,2", an int or a sequence) as distinct ints >= `minimum`; ValueError
  naming the field."""
  value = config[field]
  text = value if isinstance(value, str) else ",".join(
      map(str, value if isinstance(value, (tuple, list)) else [value]))
  items = [i.strip() for i in text.split(",") if i.strip()]
  if (not all(i.isdigit() and int(i) >= minimum for i in items)
      or len({int(i) for i in items}) < len(items)):
    raise ValueError(f"config.{field}={value!r}: use distinct integers >= {minimum} like '1,2,3'")
  return [int(i) for i in items]


def seed_list(config: ml_collections.ConfigDict) -> list[int]:
  """The seeds of `config.seeds` (at least one); ValueError naming the field."""
  seeds = _int_list(config, "seeds", 0)
  if not seeds:
    raise ValueError(f"config.seeds={config.seeds!r}: name at least one seed, e.g. '0'")
  return seeds


def strategy_models(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """Row name -> model node, in table order: the strategies of `config.only`, each MoE one
  expanded into `<name>_E<count>` per count of `config.num_experts` (if any)."""
  counts = _int_list(config, "num_experts", 1)
  models_by_row = {}
  for name in strategy_names(config):
    model = config.strategies[name]
    if not counts or model.name == "vit":
      models_by_row[name] = model
      continue
    for count in counts:
      expanded = model.copy_and_resolve_references()
      expanded.moe.num_experts = count
      models_by_row[f"{name}_E{count}"] = expanded
  return models_by_row


def run_dir(workdir: str, name: str, seed: int) -> str:
  return os.path.join(workdir, name, f"seed{seed}")


def find_runs(workdir: str) -> list[str]:
  """Run folders (holding `strategy.json`) in `workdir`: DIR/<row>/seed<k>, or DIR/<row> as
  written before seeds, sorted."""
  found = []
  for top, dirs, files in os.walk(workdir):
    if STRATEGY_FILE in files:
      found.append(top)
    if os.path.relpath(top, workdir).count(os.sep) >= 1:
      dirs.clear()  # no deeper than DIR/<row>/<seed>
  return sorted(found)


def run_strategy(config: ml_collections.ConfigDict, name: str, model: ml_collections.ConfigDict,
                 seed: int, workdir: str) -> None:
  """Trains (or resumes) and evaluates the row `name` (its model node `model`) with `seed`
  into `workdir`."""
  run = config.copy_and_resolve_references()
  with run.unlocked():
    run.model = model
    run.seed = seed
    for key in ("strategies", "only", "train", "seeds", "num_experts", "per_layer"):
      del run[key]
  image_shape = (run.data.image_size, run.data.image_size, run.model.channels)
  write_strategy(workdir, name, seed, forward_flops_per_token(run.model, image_shape))
  print(f"== {name} seed {seed}", flush=True)
  loop.train_and_evaluate(run, workdir)
  loop.evaluate_checkpoint(run, workdir)


def compare_all(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains every row of `strategy_models` once per seed (if `config.train`), then summarises
  every finished run in `workdir`: the rows aggregated over seeds, also printed as a table (and
  the per-layer table if `config.per_layer`), written to compare.json and plotted."""
  models_by_row, seeds = strategy_models(config), seed_list(config)
  eval_name = comparison_eval(config)
  if config.train:
    for name, model in models_by_row.items():
      for seed in seeds:
        run_strategy(config, name, model, seed, run_dir(workdir, name, seed))
  rows = aggregate([r for r in (summarise_run(run, eval_name) for run in find_runs(workdir))
                    if r is not None])
  order = {n: i for i, n in enumerate(models_by_row)}
  rows.sort(key=lambda r: (order.get(r["strategy"], len(order)), r["strategy"]))
  if not rows:
    raise ValueError(f"no finished runs in {workdir}; run with --config.train=True first")
  text = table(rows)
  saved = {"rows": rows, "table": text}
  if config.per_layer:
    saved["layer_table"] = layer_table(rows)
    text += "\n\n" + saved["layer_table"]
  print(text)
  with open(os.path.join(workdir, "compare.json"), "w") as f:
    json.dump(saved, f, indent=1)
  plot_comparison(rows, os.path.join(workdir, "compare.png"))
  return rows
