"""AOT compiles of the MoCHA paper step (`configs/mocha_paper.py:stage2`) on a TPU pod, per depth.

    python -m bench.mocha_aot [--decoder_depths 1 2 4] [--full] [--unscanned 1 2] [--reuse] \
        [--out_dir bench/out/mocha_aot]

Each compile is `python -m moe_jax.commands.aot --config configs/mocha_paper.py:stage2
--topology v5p:4x4x4 --config.mesh.data=1 --config.mesh.fsdp=16 --config.mesh.expert=4`
(64 chips; 2 sequences of 2,048 positions per chip) in its own subprocess, its report in
`<out_dir>/<name>.json` (`--reuse`: a JSON already there is read, not compiled again). Rows:

- `dec<d>`: d Phi-2 blocks (of 32) and the shallowest encoders that keep the reference's feature
  layers (SigLIP 2 blocks, for its hidden_states[-3]; CLIP and DINOv2 1; ConvNeXt-XXL one block
  per stage); widths, vocabulary, sequence, batch and mesh as the paper config.
- `full`: the paper config as it is (`--full`; scan over layers on in the decoder and every
  encoder backbone).
- `dec<d>_unscanned`: `dec<d>` with every `scan_layers` off (`--unscanned d ...`): the blocks
  unrolled, as before scan; the same memory expected up to the scan's own buffers.

Then a least-squares line through the `dec<d>` rows per quantity (memory, FLOPs, collective
bytes, seconds): the cost of one more decoder block, and the line's value at 32 blocks with the
encoders still shallow. That is a FIT, not a compile; only the `full` row is the whole model.
Needs libtpu (`pip install -e '.[tpu]'`, or libtpu on PYTHONPATH). The host's load changes the
seconds, not the compiled numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from moe_jax.aot import TPU_HBM_GIB

TOPOLOGY = "v5p:4x4x4"
MESH = ["--config.mesh.data=1", "--config.mesh.fsdp=16", "--config.mesh.expert=4"]
SHALLOW_ENCODERS = [
    "--config.model.encoders.siglip_vit_l16_384.backbone.depth=2",
    "--config.model.encoders.clip_vit_l14_336.backbone.depth=1",
    "--config.model.encoders.dinov2_vit_l14.backbone.depth=1",
    "--config.model.encoders.convnext_xxl.backbone.depths=(1,1,1,1)"]
UNSCANNED = ["--config.model.decoder.scan_layers=False", *(
    f"--config.model.encoders.{name}.backbone.scan_layers=False" for name in (
        "siglip_vit_l16_384", "clip_vit_l14_336", "dinov2_vit_l14", "convnext_xxl"))]
PAPER_DECODER_DEPTH = 32
GIB, MIB = 2.0 ** 30, 2.0 ** 20
# (column, unit, value of a report)
COLUMNS = [
    ("memory/chip GiB", lambda r: r["memory_per_chip"] / GIB),
    ("temp GiB", lambda r: r["memory_per_device"]["temp"] / GIB),
    ("TFLOPs/chip (XLA, loop bodies once)", lambda r: r["flops_per_device"] / 1e12),
    ("step TFLOPs/chip", lambda r: r["step_flops_per_device"] / 1e12),
    ("all-reduce MiB", lambda r: r["collective_sent_bytes_per_device"]["all-reduce"] / MIB),
    ("all-gather MiB", lambda r: r["collective_sent_bytes_per_device"]["all-gather"] / MIB),
    ("reduce-scatter MiB",
     lambda r: r["collective_sent_bytes_per_device"]["reduce-scatter"] / MIB),
    ("all-to-all MiB", lambda r: r["collective_sent_bytes_per_device"]["all-to-all"] / MIB),
    ("bound ms", lambda r: r["roofline"]["bound_s"] * 1e3),
    ("trace+lower s (CPU)", lambda r: r["seconds"]["trace_and_lower"]["cpu"]),
    ("compile s (CPU)", lambda r: r["seconds"]["compile"]["cpu"]),
]


def compile_row(name: str, overrides: list[str], out_dir: str, reuse: bool) -> dict:
  path = os.path.join(out_dir, f"{name}.json")
  if not (reuse and os.path.exists(path)):
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    cmd = [sys.executable, "-m", "moe_jax.commands.aot",
           "--config=configs/mocha_paper.py:stage2", f"--topology={TOPOLOGY}", *MESH,
           *overrides, f"--json={path}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)
  with open(path) as f:
    return json.load(f)


def fit(depths: list[int], values: list[float]) -> tuple[float, float]:
  """(per block, intercept) of the least-squares line value = intercept + per_block * depth."""
  per_block, intercept = np.polyfit(np.asarray(depths, float), np.asarray(values, float), 1)
  return float(per_block), float(intercept)


def table(rows: dict[str, dict], depths: list[int]) -> str:
  head = "| row | " + " | ".join(c for c, _ in COLUMNS) + " |"
  lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
  for name, r in rows.items():
    lines.append(f"| {name} | " + " | ".join(f"{f(r):.4g}" for _, f in COLUMNS) + " |")
  dec = [rows[f"dec{d}"] for d in depths]
  if len(dec) >= 2:
    fits = [fit(depths, [f(r) for r in dec]) for _, f in COLUMNS]
    lines.append("| FIT: per decoder block | " + " | ".join(f"{b:.4g}" for b, _ in fits) + " |")
    lines.append(f"| FIT: {PAPER_DECODER_DEPTH} blocks, shallow encoders | " + " | ".join(
        f"{a + b * PAPER_DECODER_DEPTH:.4g}" for b, a in fits) + " |")
  lines.append(f"(v5p HBM per chip: {TPU_HBM_GIB['v5p']} GiB)")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--decoder_depths", type=int, nargs="*", default=[1, 2, 4])
  parser.add_argument("--full", action="store_true", help="also compile the whole paper config")
  parser.add_argument("--unscanned", type=int, nargs="*", default=[],
                      help="decoder depths to compile also with scan_layers off")
  parser.add_argument("--reuse", action="store_true", help="read existing JSONs, compile the rest")
  parser.add_argument("--out_dir", default="bench/out/mocha_aot")
  args = parser.parse_args()
  os.makedirs(args.out_dir, exist_ok=True)
  rows = {f"dec{d}": compile_row(f"dec{d}", [f"--config.model.decoder.depth={d}",
                                             *SHALLOW_ENCODERS], args.out_dir, args.reuse)
          for d in args.decoder_depths}
  for d in args.unscanned:
    rows[f"dec{d}_unscanned"] = compile_row(
        f"dec{d}_unscanned", [f"--config.model.decoder.depth={d}", *SHALLOW_ENCODERS, *UNSCANNED],
        args.out_dir, args.reuse)
  if args.full:
    rows["full"] = compile_row("full", [], args.out_dir, args.reuse)
  print(table(rows, args.decoder_depths))
  with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
    json.dump({name: {c: fn(r) for c, fn in COLUMNS} for name, r in rows.items()}, f, indent=1)


if __name__ == "__main__":
  main()
