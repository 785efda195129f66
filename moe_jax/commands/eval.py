"""Evaluate the latest checkpoint: `python -m moe_jax.commands.eval --config configs/X.py
--workdir DIR [--only NAME]` (`python eval.py ...` at the repository root is the same command).

Runs every entry of `config.evals` (or only `--only`) and writes DIR/eval_<name>.json for each:
e.g. top-1/top-5 accuracy, loss and every MoE layer's routing statistics (a classification
eval), or the n-shot accuracies of the linear probes (a few-shot eval).
"""
from __future__ import annotations

import json

import ml_collections
from absl import app, flags

from moe_jax.commands import common
from moe_jax.train import loop


def main() -> None:
  config = common.define_config_flag()
  workdir = flags.DEFINE_string("workdir", None, "The training run's folder.")
  only = flags.DEFINE_string("only", None, "Run only this entry of config.evals.")

  def _evaluate(config: ml_collections.ConfigDict, workdir: str) -> None:
    results = loop.evaluate_checkpoint(config, workdir, only.value)
    print(json.dumps({name: {k: v for k, v in result.items() if k != "routing"}
                      for name, result in results.items()}, indent=1))

  def evaluate(argv: list[str]) -> None:
    del argv
    common.run(_evaluate, config.value, common.workdir_for(workdir.value))

  app.run(evaluate, flags_parser=common.parse_flags)


if __name__ == "__main__":
  main()
