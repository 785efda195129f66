"""Every benchmark in turn: `python -m bench [--quick]` (one subprocess each, JSON in bench/out/).

    python -m bench --quick                 # a few minutes on a 2-core CPU
    python -m bench --only moe_layer inr    # a subset, full size
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHMARKS = ("moe_layer", "train_step", "gmm", "scaling", "inr", "generation", "input")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="each benchmark's --quick mode")
  p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
  args = p.parse_args()
  failed = []
  for name in args.only:
    start = time.perf_counter()
    print(f"== bench.{name}", flush=True)
    cmd = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if args.quick else [])]
    if subprocess.run(cmd).returncode:
      failed.append(name)
    print(f"== bench.{name}: {time.perf_counter() - start:.0f} s", flush=True)
  if failed:
    sys.exit(f"error: failed: {', '.join(failed)}")


if __name__ == "__main__":
  main()
