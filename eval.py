"""Evaluate the latest checkpoint: `python eval.py --config configs/X.py --workdir DIR`.

Writes DIR/eval.json: top-1/top-5 accuracy, loss, and every MoE layer's routing statistics. The
command is `moe_jax.commands.eval`.
"""
from __future__ import annotations

from moe_jax.commands.eval import main

if __name__ == "__main__":
  main()
