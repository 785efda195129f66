"""Routing analysis on its own: `python -m moe_jax.commands.analysis DIR/eval_<name>.json
[--out DIR/analysis/<name>]`.

Reads the routing report that eval wrote, prints one line per MoE layer and the layers
recommended to be made dense, and (re)draws the PNG plots.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from moe_jax.analysis import plots, routing


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m moe_jax.commands.analysis",
                                   description=__doc__)
  parser.add_argument("eval_json", help="eval_<name>.json written by eval.py")
  parser.add_argument("--out", default=None,
                      help="plot folder (default: analysis/<name> next to eval_<name>.json)")
  args = parser.parse_args(argv)
  if not os.path.exists(args.eval_json):
    sys.exit(f"error: {args.eval_json} does not exist; run eval.py --workdir DIR first")
  with open(args.eval_json) as f:
    report = json.load(f).get("routing")
  if not report or not report.get("layers"):
    sys.exit(f"error: {args.eval_json} has no routing report (a dense model has no MoE layers)")
  print(routing.summary(report))
  name = os.path.basename(args.eval_json).removeprefix("eval_").removesuffix(".json")
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.eval_json)), "analysis",
                                 name)
  for path in plots.plot_report(report, out):
    print(path)


if __name__ == "__main__":
  main()
