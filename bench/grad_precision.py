r"""Gradient all-reduce precision (`mesh.grad_reduce_dtype`): the all-reduce elements by dtype
of the trainer's compiled step, per option, for the tiny bf16 ViMoE and the tiny bf16 MoCHA
with a Phi-2-style decoder.

    PYTHONPATH=$PWD:/tmp/scale_libtpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m bench.grad_precision \
        [--topologies v5p:2x2x1 cpu:8] [--models vimoe mocha_phi] [--root DIR] \
        [--out bench/out/grad_precision.json]

Each (model, topology, option) is one `python -m moe_jax.commands.aot` subprocess, batch 16,
mesh data = all devices. `--root` is the checkout whose `moe_jax` and `configs` the compiles
import (default: this one; e.g. an export of an older commit for before / after numbers).
"Sent" = the bytes each device sends per step for the all-reduces (2 (n-1)/n of the operands,
`moe_jax.parallel.hlo.collective_wire_bytes`). TPU topologies need libtpu on `PYTHONPATH`; XLA:CPU
computes bf16 in f32, so `cpu:8` shows f32 under both options.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {  # name -> (config relative to the root, overrides)
    "vimoe": ("configs/vimoe_tiny_mnist.py", ["--config.model.dtype=bfloat16"]),
    "mocha_phi": ("configs/mocha_tiny_phi.py:bfloat16", []),
}
OPTIONS = ("float32", "bfloat16")


def compile_report(root: str, model: str, topology: str, option: str, config_root: str) -> dict:
  """The AOT report (`moe_jax.aot.analyze`) of one compile, in a fresh process."""
  config, overrides = MODELS[model]
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "report.json")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != HERE]
    env["PYTHONPATH"] = os.pathsep.join([root, *extra])
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    cmd = [sys.executable, "-m", "moe_jax.commands.aot", f"--config={config_root}/{config}",
           f"--topology={topology}", f"--json={out}", "--config.batch_size=16",
           f"--config.mesh.grad_reduce_dtype={option}", *overrides]
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    with open(out) as f:
      return json.load(f)


def row(model: str, option: str, r: dict) -> dict:
  elements = r["all_reduce_elements_by_dtype"]
  return {"model": model, "topology": r["topology"], "mesh": r["mesh"], "option": option,
          "params": r["params"], "all_reduce_elements_by_dtype": elements,
          "all_reduce_sent_bytes_per_device": r["collective_sent_bytes_per_device"].get(
              "all-reduce", 0),
          "flops_per_device": r["flops_per_device"]}


HEADER = ("| model | topology, mesh | option | params | f32 elements | bf16 elements | other | "
          "all-reduce B sent/device |\n|---|---|---|---|---|---|---|---|")


def table_row(x: dict) -> str:
  e = dict(x["all_reduce_elements_by_dtype"])
  f32, bf16 = e.pop("f32", 0), e.pop("bf16", 0)
  other = ", ".join(f"{k} {v:,}" for k, v in e.items()) or "-"
  mesh = ", ".join(f"{k}={v}" for k, v in x["mesh"].items() if v > 1)
  return (f"| {x['model']} | {x['topology']}, {mesh} | {x['option']} | {x['params']:,} | "
          f"{f32:,} | {bf16:,} | {other} | {x['all_reduce_sent_bytes_per_device']:,.0f} |")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--topologies", nargs="+", default=["v5p:2x2x1", "cpu:8"])
  p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
  p.add_argument("--root", default=HERE, help="checkout whose moe_jax the compiles import")
  p.add_argument("--config_root", default=HERE, help="checkout whose configs/ files are used")
  p.add_argument("--out", default=os.path.join(HERE, "bench/out/grad_precision.json"))
  args = p.parse_args()
  rows = []
  print(HEADER, flush=True)
  for topology in args.topologies:
    for model in args.models:
      for option in OPTIONS:
        rows.append(row(model, option, compile_report(os.path.abspath(args.root), model,
                                                      topology, option,
                                                      os.path.abspath(args.config_root))))
        print(table_row(rows[-1]), flush=True)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"root": os.path.abspath(args.root), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
