"""Small benchmark runner: compile stats, interleaved timing, JSON records, plain tables.

    c = bench.common.compile_fn(f, *args)          # jit + lower + compile, args bound
    c.temp_bytes, c.flops                          # memory_analysis() / cost_analysis()
    timings = bench.common.time_interleaved({"a": c.call, "b": other.call}, reps=5)
    timings["a"].summary()                         # median, q1, q3, min, max, n

Timing is interleaved: every round runs each case once (in a rotating order), so slow drifts of a
shared machine hit all cases alike and ratios measured in one run stay comparable. A case's
first call is a warm-up and is not timed.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import sys
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np


THP_TUNABLE = "glibc.malloc.hugetlb=1"


def use_thp_malloc(enabled: bool = True) -> None:
  """Re-runs this process with glibc malloc backing large blocks with transparent huge pages.

  XLA:CPU allocates every output and temp buffer afresh per call; glibc serves blocks over 32 MiB
  with mmap, so each call page-faults its big buffers in 4 KiB at a time. Measured here: writing
  a fresh 144 MiB output took 94 ms with the default and 19 ms with this tunable. That cost
  scales with buffer size, not FLOPs, so it taxes MoE layers (E x the weight gradients of a dense
  layer with equal FLOPs) more than dense ones. glibc reads tunables at startup only, hence the
  re-exec (before anything is computed). `enabled=False` keeps the default allocator.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if not enabled or THP_TUNABLE in tunables or platform.system() != "Linux":
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, THP_TUNABLE) if t))
  os.execve(sys.executable, sys.orig_argv, env)


def environment() -> dict[str, Any]:
  """What the numbers were measured on."""
  import flax
  dev = jax.devices()[0]
  return {
      "date": datetime.date.today().isoformat(),
      "platform": jax.default_backend(),
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "machine": platform.machine(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "flax": flax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
  }


@dataclasses.dataclass
class Compiled:
  """A compiled function with its arguments bound, and XLA's static estimates for it."""
  call: Callable[[], Any]
  temp_bytes: int | None
  arg_bytes: int | None
  out_bytes: int | None
  flops: float | None
  compile_s: float
  hlo: Callable[[], str]

  def stats(self) -> dict[str, Any]:
    return {"temp_bytes": self.temp_bytes, "arg_bytes": self.arg_bytes,
            "out_bytes": self.out_bytes, "flops": self.flops, "compile_s": self.compile_s}


def flops(compiled) -> float | None:
  """XLA's FLOP estimate of a compiled computation (None where the backend has none)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001  (not every backend implements it)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return None if not cost or "flops" not in cost else float(cost["flops"])


def compile_fn(fn: Callable[..., Any], *args: Any) -> Compiled:
  """`jax.jit(fn)` compiled for `args`; `.call()` runs it on them."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  try:
    mem = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    mem = None
  get = lambda name: None if mem is None else int(getattr(mem, name))
  return Compiled(call=lambda: compiled(*args), temp_bytes=get("temp_size_in_bytes"),
                  arg_bytes=get("argument_size_in_bytes"),
                  out_bytes=get("output_size_in_bytes"), flops=flops(compiled),
                  compile_s=compile_s, hlo=compiled.as_text)


@dataclasses.dataclass
class Timing:
  times: list[float]

  @property
  def median(self) -> float:
    return statistics.median(self.times)

  def summary(self) -> dict[str, Any]:
    t = np.asarray(self.times)
    q1, q3 = np.percentile(t, [25, 75])
    return {"median_s": float(np.median(t)), "q1_s": float(q1), "q3_s": float(q3),
            "min_s": float(t.min()), "max_s": float(t.max()), "n": int(t.size)}


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int = 5, warmup: int = 1,
                     budget_s: float | None = None, min_reps: int = 2) -> dict[str, Timing]:
  """Times each zero-argument `fn` up to `reps` times, one of each per round, order rotating.

  Stops after `min_reps` rounds once the timed rounds have taken `budget_s` seconds.
  """
  names = list(fns)
  for name in names:
    for _ in range(warmup):
      jax.block_until_ready(fns[name]())
  times: dict[str, list[float]] = {n: [] for n in names}
  start = time.perf_counter()
  for r in range(reps):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[name]())
      times[name].append(time.perf_counter() - t0)
    if budget_s is not None and r + 1 >= min_reps and time.perf_counter() - start > budget_s:
      break
  return {n: Timing(t) for n, t in times.items()}


def time_it(fn: Callable, *args, warmup: int = 1, repeats: int = 5) -> dict[str, float]:
  """Median / spread of `fn(*args)` alone (see `time_interleaved` to compare several)."""
  return time_interleaved({"fn": lambda: fn(*args)}, reps=repeats, warmup=warmup)["fn"].summary()


def compile_stats(jitted, *args) -> tuple[Callable, dict[str, Any]]:
  """(compiled function, {flops, temp_bytes, ...}) of a `jax.jit`-ed function at `args`."""
  compiled = jitted.lower(*args).compile()
  mem = compiled.memory_analysis()
  return compiled, {"flops": flops(compiled),
                    "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
                    "argument_bytes": getattr(mem, "argument_size_in_bytes", None)}


# `%name = <shape or (tuple of shapes)> opcode(`
_HLO_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.-]+ = (?:\([^=]*?\)|\S+) ([\w-]+)\(", re.M)


def hlo_op_counts(hlo_text: str, ops: Sequence[str] = (
    "scatter", "gather", "transpose", "copy", "sort", "while", "dot", "reduce-window")) -> dict:
  """Counts of HLO instructions by opcode in (compiled) HLO text, e.g. to spot scatters."""
  counts = {op: 0 for op in ops}
  for m in _HLO_OP.finditer(hlo_text):
    if m.group(1) in counts:
      counts[m.group(1)] += 1
  return counts


def fmt_bytes(n: float | None) -> str:
  if n is None:
    return "-"
  for unit in ("B", "KiB", "MiB"):
    if abs(n) < 1024:
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.2f} GiB"


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]],
                title: str | None = None) -> str:
  """Prints (and returns) a markdown table. columns: (key, header, format spec | 'bytes')."""
  def cell(row, key, spec):
    v = row.get(key)
    if v is None:
      return "-"
    if spec == "bytes":
      return fmt_bytes(v)
    return format(v, spec) if spec else str(v)

  lines = [] if title is None else [f"### {title}", ""]
  lines.append("| " + " | ".join(h for _, h, _ in columns) + " |")
  lines.append("|" + "|".join("---" for _ in columns) + "|")
  lines += ["| " + " | ".join(cell(row, k, s) for k, _, s in columns) + " |" for row in rows]
  text = "\n".join(lines) + "\n"
  print(text, flush=True)
  return text


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--quick", action="store_true", help="a small subset (about 1-2 minutes)")
  p.add_argument("--reps", type=int, default=None, help="timed rounds per case")
  p.add_argument("--out", default=default_out, help="JSON output path ('' = none)")
  p.add_argument("--malloc", choices=["thp", "default"], default="thp",
                 help="thp: re-run with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (see use_thp_malloc)")
  return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
  """Parses the command line, re-running under the requested allocator first."""
  args = p.parse_args()
  use_thp_malloc(args.malloc == "thp")
  return args


def write_json(path: str, bench: str, args: argparse.Namespace | None, records: list[dict],
               extra: dict | None = None) -> None:
  """One JSON document per run: environment, arguments, one record per case."""
  if not path:
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  doc = {"bench": bench, "env": environment(), "args": vars(args) if args else {},
         "records": records, **(extra or {})}
  with open(path, "w") as f:
    json.dump(doc, f, indent=1, default=float)
  print(f"wrote {path}", flush=True)
