"""Evaluate the latest checkpoint: `python eval.py --config configs/X.py --workdir DIR`.

Writes DIR/eval.json: top-1/top-5 accuracy, loss, and every MoE layer's routing statistics.
"""
from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

from moe_jax.train import cli, loop

HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(HERE, "configs", "vimoe_tiny_mnist.py"), "Training config file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's folder.")


def main(argv):
  del argv

  def evaluate(config, workdir):
    result = loop.evaluate_checkpoint(config, workdir)
    print(json.dumps({k: v for k, v in result.items() if k != "routing"}, indent=1))

  cli.run(evaluate, _CONFIG.value, cli.workdir_for(_WORKDIR.value, "config", HERE))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
