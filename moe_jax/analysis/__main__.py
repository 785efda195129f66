"""Routing analysis on its own: `python -m moe_jax.analysis DIR/eval.json [--out DIR/analysis]`.

Reads the routing report that `eval.py` wrote, prints one line per MoE layer and the layers
recommended to be made dense, and (re)draws the PNG plots.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from moe_jax.analysis import plots


def summary(report: dict) -> str:
  lines = [f"{'layer':<16} {'spec. (nMI)':>11} {'load CV':>8} {'dropped':>8}"]
  for name, layer in report["layers"].items():
    dropped = layer.get("dropped_fraction")
    lines.append(f"{name:<16} {layer['normalized_mi']:>11.3f} {layer['load_cv']:>8.3f} "
                 f"{'-' if dropped is None else f'{dropped:.4f}':>8}")
  lines.append(f"could be dense (nMI < {report['threshold']}): "
               f"{', '.join(report['recommend_dense']) or 'none'}")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="python -m moe_jax.analysis", description=__doc__)
  parser.add_argument("eval_json", help="eval.json written by eval.py")
  parser.add_argument("--out", default=None, help="plot folder (default: next to eval.json)")
  args = parser.parse_args(argv)
  if not os.path.exists(args.eval_json):
    sys.exit(f"error: {args.eval_json} does not exist; run eval.py --workdir DIR first")
  with open(args.eval_json) as f:
    report = json.load(f).get("routing")
  if not report or not report.get("layers"):
    sys.exit(f"error: {args.eval_json} has no routing report (a dense model has no MoE layers)")
  print(summary(report))
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.eval_json)), "analysis")
  for path in plots.plot_report(report, out):
    print(path)


if __name__ == "__main__":
  main(sys.argv[1:])
