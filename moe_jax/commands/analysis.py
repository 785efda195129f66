"""Routing analysis on its own: `python -m moe_jax.commands.analysis DIR/eval_<name>.json
[--out DIR/analysis/<name>]`.

Reads the routing report that eval wrote, prints one line per MoE layer and the layers
recommended to be made dense, and (re)draws the PNG plots.
"""
from __future__ import annotations

import argparse
import json
import sys

from moe_jax import paths
from moe_jax.analysis import plots, routing


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m moe_jax.commands.analysis",
                                   description=__doc__)
  parser.add_argument("eval_json", help="eval_<name>.json written by eval.py")
  parser.add_argument("--out", default=None,
                      help="plot folder (default: analysis/<name> next to eval_<name>.json)")
  args = parser.parse_args(argv)
  eval_json = paths.workdir_path(args.eval_json)  # local or a cloud URI
  if not eval_json.exists():
    sys.exit(f"error: {args.eval_json} does not exist; run eval.py --workdir DIR first")
  report = json.loads(eval_json.read_text()).get("routing")
  if not report or not report.get("layers"):
    sys.exit(f"error: {args.eval_json} has no routing report (a dense model has no MoE layers)")
  print(routing.summary(report))
  name = eval_json.name.removeprefix("eval_").removesuffix(".json")
  out = args.out or eval_json.parent / "analysis" / name
  for path in plots.plot_report(report, out):
    print(path)


if __name__ == "__main__":
  main()
