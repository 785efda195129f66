"""Evaluate the latest checkpoint: `python -m moe_jax.commands.eval --config configs/X.py
--workdir DIR` (`python eval.py ...` at the repository root is the same command).

Writes DIR/eval.json: top-1/top-5 accuracy, loss, and every MoE layer's routing statistics.
"""
from __future__ import annotations

import json

import ml_collections
from absl import app, flags

from moe_jax.commands import common
from moe_jax.train import loop


def _evaluate(config: ml_collections.ConfigDict, workdir: str) -> None:
  result = loop.evaluate_checkpoint(config, workdir)
  print(json.dumps({k: v for k, v in result.items() if k != "routing"}, indent=1))


def main() -> None:
  config = common.define_config_flag()
  workdir = flags.DEFINE_string("workdir", None, "The training run's folder.")

  def evaluate(argv: list[str]) -> None:
    del argv
    common.run(_evaluate, config.value, common.workdir_for(workdir.value))

  app.run(evaluate, flags_parser=common.parse_flags)


if __name__ == "__main__":
  main()
