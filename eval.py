"""Evaluate the latest checkpoint: `python eval.py --config configs/X.py --workdir DIR
[--only NAME]`.

Runs every entry of `config.evals` (or only `--only`) and writes DIR/eval_<name>.json for each
(accuracy, loss and routing statistics; or few-shot probe accuracies). The command is
`moe_jax.commands.eval`.
"""
from __future__ import annotations

from moe_jax.commands.eval import main

if __name__ == "__main__":
  main()
