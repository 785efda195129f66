r"""Redo an AOT report's HLO counts (collectives and FLOPs per step) from its dumped HLO text.

    python -m moe_jax.commands.hlo_recount --report bench/out/mocha_aot/full_dump.json \
        --hlo /tmp/mocha_full.hlo --json bench/out/mocha_aot/full_recount.json

The report and HLO come from one `python -m moe_jax.commands.aot ... --json R --dump_hlo H`
run; nothing is compiled (`moe_jax.aot.recount`). Prints the report as the aot command does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from moe_jax import aot


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--report", required=True, help="the aot command's --json report")
  parser.add_argument("--hlo", required=True, help="the same run's --dump_hlo text")
  parser.add_argument("--json", help="also write the recounted report here")
  args = parser.parse_args(argv)
  with open(args.report) as f:
    report = json.load(f)
  with open(args.hlo) as f:
    hlo = f.read()
  try:
    out = aot.recount(report, hlo)
  except ValueError as e:
    sys.exit(f"error: {e}")
  print(aot.format_report(out), flush=True)
  if args.json:
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
