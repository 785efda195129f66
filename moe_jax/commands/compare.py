r"""Train one model under several routing strategies and compare them in one table.

    python -m moe_jax.commands.compare --config configs/compare_routers.py --workdir DIR

Trains `config.strategies.<name>` for each name of `config.only` into DIR/<name> (resuming),
then prints the table and writes DIR/compare.json and DIR/compare.png
(`moe_jax.analysis.compare.compare_all`). `--config.train=False` only rebuilds the table.
"""
from __future__ import annotations

import os

from absl import app, flags

from moe_jax.analysis import compare
from moe_jax.commands import common


def main() -> None:
  config = common.define_config_flag(None)
  workdir = flags.DEFINE_string("workdir", None, "Output folder (one sub-folder per strategy).")
  flags.mark_flags_as_required(["config", "workdir"])

  def run(argv: list[str]) -> None:
    del argv
    os.makedirs(workdir.value, exist_ok=True)
    common.run(compare.compare_all, config.value, workdir.value)

  app.run(run, flags_parser=common.parse_flags)


if __name__ == "__main__":
  main()
