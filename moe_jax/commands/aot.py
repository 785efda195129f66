r"""Ahead-of-time compile a train step for a device topology, from this (CPU) host.

    python -m moe_jax.commands.aot --config configs/vimoe_imagenet.py:B/16 \
        --topology v5p:4x4x4 --config.mesh.expert=8
    python -m moe_jax.commands.aot --config configs/vimoe_tiny_mnist.py --topology cpu:8 \
        --config.mesh.expert=4

Prints per-device memory, FLOPs, the collectives of the compiled HLO and a predicted step time
(`moe_jax.aot`); `--json` also writes the report, `--dump_hlo` the compiled HLO text.
`cpu:N` compiles for N simulated CPU devices; TPU topologies (`v5p:4x4x4`, `v5e:2x2`, ...) need
libtpu (`pip install -e '.[tpu]'`).
"""
from __future__ import annotations

import json
import os
import sys

from moe_jax import aot


def _topology_arg(argv: list[str]) -> str:
  for i, a in enumerate(argv):
    if a.startswith("--topology="):
      return a.split("=", 1)[1]
    if a == "--topology" and i + 1 < len(argv):
      return argv[i + 1]
  return "cpu:8"


def main() -> None:
  # The CPU device count is read when JAX starts its backend: set it before anything does.
  try:
    early = aot.parse_topology(_topology_arg(sys.argv))
  except aot.TopologyError as e:
    sys.exit(f"error: {e}")
  if early.platform == "cpu":
    aot.set_cpu_device_count(early.num_devices)
  # TPU topologies compile through libtpu's compile-only client: the host backend stays CPU
  # (no attempt to open local TPU chips or query a metadata server).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  from absl import app, flags

  from moe_jax.commands import common

  config = common.define_config_flag()
  flags.DEFINE_string("topology", "cpu:8", "cpu:N (simulated CPU devices) or a TPU topology "
                      "such as v5p:4x4x4 (needs pip install -e '.[tpu]').")
  flags.DEFINE_string("json", None, "Also write the report as JSON to this path.")
  flags.DEFINE_string("dump_hlo", None, "Also write the compiled HLO text to this path.")

  def run(argv: list[str]) -> None:
    del argv
    try:
      report = aot.compile_for_topology(config.value, flags.FLAGS.topology,
                                        hlo_path=flags.FLAGS.dump_hlo)
    except ValueError as e:  # TopologyError included
      sys.exit(f"error: {e}")
    print(aot.format_report(report), flush=True)
    if flags.FLAGS.json:
      os.makedirs(os.path.dirname(flags.FLAGS.json) or ".", exist_ok=True)
      with open(flags.FLAGS.json, "w") as f:
        json.dump(report, f, indent=1)

  app.run(run, flags_parser=common.parse_flags)


if __name__ == "__main__":
  main()
