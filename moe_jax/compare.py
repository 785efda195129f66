r"""Train one model under several routing strategies and compare them in one table.

    python -m moe_jax.compare --config configs/compare_routers.py --workdir DIR

For each name in `config.only` the model node `config.strategies.<name>` replaces `config.model`
(same data, seed, batch and steps); the run trains into DIR/<name> (resuming if interrupted) and
is evaluated with routing analysis. Then every finished run in DIR is summarised: the table is
printed and written with the rows to DIR/compare.json, and DIR/compare.png plots accuracy and
step time. `--config.train=False` only rebuilds the table (e.g. after one job per strategy).
"""
from __future__ import annotations

import json
import os

from moe_jax.train import cli


def strategy_names(config) -> list[str]:
  names = [n.strip() for n in config.only.split(",") if n.strip()]
  unknown = [n for n in names if n not in config.strategies]
  if unknown or not names:
    raise ValueError(f"config.only={config.only!r}: name strategies from "
                     f"{sorted(config.strategies)}")
  return names


def run_strategy(config, name: str, workdir: str) -> None:
  """Trains (or resumes) and evaluates one strategy into `workdir`."""
  from moe_jax.analysis import compare
  from moe_jax.train import loop
  run = config.copy_and_resolve_references()
  with run.unlocked():
    run.model = config.strategies[name]
    for key in ("strategies", "only", "train"):
      del run[key]
  image_shape = (run.data.image_size, run.data.image_size, run.model.channels)
  compare.write_strategy(workdir, name, compare.forward_flops_per_token(run.model, image_shape))
  print(f"== {name}", flush=True)
  loop.train_and_evaluate(run, workdir)
  loop.evaluate_checkpoint(run, workdir)


def compare_all(config, workdir: str) -> list[dict]:
  from moe_jax.analysis import compare
  names = strategy_names(config)
  if config.train:
    for name in names:
      run_strategy(config, name, os.path.join(workdir, name))
  rows = [r for r in (compare.summarise_run(os.path.join(workdir, n)) for n in
                      sorted(os.listdir(workdir)) if os.path.isdir(os.path.join(workdir, n)))
          if r is not None]
  order = {n: i for i, n in enumerate(names)}
  rows.sort(key=lambda r: (order.get(r["strategy"], len(order)), r["strategy"]))
  if not rows:
    raise ValueError(f"no finished runs in {workdir}; run with --config.train=True first")
  text = compare.table(rows)
  print(text)
  with open(os.path.join(workdir, "compare.json"), "w") as f:
    json.dump({"rows": rows, "table": text}, f, indent=1)
  compare.plot_comparison(rows, os.path.join(workdir, "compare.png"))
  return rows


def main() -> None:
  """The command line (flags are defined here, so importing this module defines none)."""
  from absl import app, flags
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file("config", None, "Comparison config file "
                                           "(configs/compare_routers.py[:quick]).",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Output folder (one sub-folder per strategy).")
  flags.mark_flags_as_required(["config", "workdir"])

  def run(argv):
    del argv
    os.makedirs(workdir.value, exist_ok=True)
    cli.run(compare_all, config.value, workdir.value)

  app.run(run, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  main()
