"""AOT compilation of a train step for a topology: cpu:N here, TPU when libtpu is installed."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from moe_jax import aot, moe
from moe_jax.parallel import hlo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def run_aot(tmp_path, topology: str, *overrides: str,
            config: str = "configs/vimoe_tiny_mnist.py") -> tuple[str, dict]:
  """The command from another working directory, the config named relative to the repo."""
  out = tmp_path / "report.json"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # other libtpu processes on this host
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  cmd = [sys.executable, "-m", "moe_jax.commands.aot", f"--config={config}",
         f"--topology={topology}", f"--json={out}", *overrides]
  proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout, json.loads(out.read_text())


def test_cpu_topology_prints_memory_flops_and_all_to_all(tmp_path):
  stdout, r = run_aot(tmp_path, "cpu:8", "--config.mesh.expert=4", "--config.mesh.data=-1",
                      "--config.batch_size=16", "--config.model.depth=2",  # both blocks MoE
                      "--config.model.width=32", "--config.model.num_heads=2",
                      "--config.model.mlp_dim=64", "--config.model.moe.hidden_dim=64")
  for text in ("memory per device", "FLOPs per step", "collectives: all-to-all",
               "predicted step time: none"):
    assert text in stdout, stdout
  assert r["devices"] == 8 and r["mesh"]["expert"] == 4 and r["mesh"]["data"] == 2
  assert r["flops_per_device"] > 0 and r["memory_per_device"]["total"] > 0
  # Expert-sharded mesh: MoE dispatch = all-to-all (2 per MoE layer forward, 2 backward);
  # expert weights are never all-gathered; gradients are all-reduced.
  assert r["collectives"]["all-to-all"] > 0 and r["collectives"]["all-to-all"] % 4 == 0
  assert r["collectives"]["all-gather"] == 0 and r["collectives"]["all-reduce"] > 0
  assert r["all_to_all_operand_bytes_per_device"] > 0
  # Sent bytes: an all-to-all over the 4 devices of an expert group keeps 1/4 of its operand.
  sent = r["collective_sent_bytes_per_device"]
  assert sent["all-to-all"] == pytest.approx(r["all_to_all_operand_bytes_per_device"] * 3 / 4)
  assert sent["all-reduce"] > 0 and sent["all-gather"] == 0
  assert "roofline" not in r and r["split_torus_axes"] == {}  # no bandwidths, no torus on CPU
  assert "collective bytes sent per device: all-to-all" in stdout


def test_collective_sent_bytes():
  text = """
  %a = f32[4,160,64]{2,1,0} all-to-all(%x), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}
  %b = bf16[1024]{0} all-reduce(%y), channel_id=2, replica_groups=[4,2]<=[8], to_apply=%sum
  %c = f32[64]{0} all-gather(%z), channel_id=3, replica_groups=[1,8]<=[8], dimensions={0}
  %d = f32[16]{0} reduce-scatter(%w), channel_id=4, dimensions={0}, to_apply=%sum
  """
  assert hlo.group_size(text.splitlines()[1], 8) == 4
  assert hlo.group_size(text.splitlines()[2], 8) == 2
  assert hlo.group_size(text.splitlines()[4], 8) == 8  # no replica_groups: every device
  sent = hlo.collective_wire_bytes(text, 8)
  assert sent["all-to-all"] == 4 * 160 * 64 * 4 * 3 / 4  # keeps 1 of 4 parts
  assert sent["all-reduce"] == 1024 * 2 * 2 * 1 / 2  # 2 (n-1)/n of the buffer, n = 2
  assert sent["all-gather"] == 64 * 4 * 7 / 8  # receives 7 of 8 parts; sends its own 7 times
  assert sent["reduce-scatter"] == 16 * 4 * 7  # its operand is 8 results; keeps one
  assert sent["collective-permute"] == 0


def test_libtpu_all_reduce_scatter_fusions_count_as_reduce_scatters():
  # libtpu runs FSDP's gradient reduction (all-reduce + the dynamic-slice of this device's shard)
  # as one fused reduce-scatter: counted as one, with the shard as its result.
  text = """
%all-reduce-scatter.3 (input.3: f32[64,128]) -> f32[64,32] {
  %input.3 = f32[64,128]{0,1:T(8,128)} parameter(0)
  %all-reduce.305 = f32[64,128]{0,1:T(8,128)} all-reduce(%input.3), channel_id=96, replica_groups={{0,1,2,3}}, to_apply=%add.9
  ROOT %dynamic-slice.176 = f32[64,32]{0,1:T(8,128)} dynamic-slice(%all-reduce.305, %c, %m), dynamic_slice_sizes={64,32}
}

ENTRY %main (p: bf16[1024]) -> bf16[1024] {
  %b = bf16[1024]{0} all-reduce(%p), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%sum
}
"""
  assert hlo.collective_counts(text)["reduce-scatter"] == 1
  assert hlo.collective_counts(text)["all-reduce"] == 1
  sent = hlo.collective_wire_bytes(text, 4)
  assert sent["reduce-scatter"] == 64 * 32 * 4 * 3  # the shard's bytes to each of 3 others
  assert sent["all-reduce"] == 1024 * 2 * 2 * 3 / 4
  # Precision of every gradient reduction: the fused all-reduce's full operand counts.
  assert hlo.reduction_elements_by_dtype(text, 4) == {"f32": 64 * 128, "bf16": 1024}
  native = "%d = f32[16]{0} reduce-scatter(%w), replica_groups={{0,1,2,3}}, dimensions={0}"
  assert hlo.reduction_elements_by_dtype(native, 4) == {"f32": 64}  # its operand: 4 x 16


def test_roofline_arithmetic():
  r = aot.roofline(4.59e12, 2.765e9, {"all-reduce": 6e8, "all-to-all": 0.0}, "v5p")
  assert r["compute_s"] == pytest.approx(0.01)  # 4.59e12 FLOPs at 459 TFLOP/s
  assert r["hbm_s"] == pytest.approx(0.001)  # 2.765 GB at 2765 GB/s
  assert r["collective_s"] == {"all-reduce": pytest.approx(0.001)}  # 0.6 GB at 1200/2 GB/s
  assert r["bound_s"] == pytest.approx(0.01) and r["bottleneck"] == "compute"
  assert r["serial_s"] == pytest.approx(0.012)
  assert aot.roofline(1.0, 1.0, {}, "v4") is None  # no documented bandwidths: no guess


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
def test_split_torus_axes_on_v5p_4x4x4(monkeypatch):
  """64 chips, 4x4x4: mesh (8, 8) must split a physical axis between the two mesh axes;
  (4, 16) maps onto whole physical axes."""
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other libtpu processes on this host
  import jax
  from jax.experimental import mesh_utils

  devices = aot.topology_devices(aot.parse_topology("v5p:4x4x4"))
  grid = mesh_utils.create_device_mesh((8, 8), devices, allow_split_physical_axes=True)
  split = aot.split_torus_axes(jax.sharding.Mesh(grid, ("data", "expert")))
  assert list(split.values()) == [["data", "expert"]]
  assert aot.split_torus_axes(jax.make_mesh((4, 16), ("data", "expert"), devices=devices)) == {}


def test_collective_parsing():
  text = """
  %a = f32[4,160,64]{1,2,0:T(8,128)} all-to-all(%copy.1), channel_id=1, dimensions={0}
  %all-to-all.1 = (bf16[1,80,64]{2,1,0}, bf16[1,80,64]{2,1,0}) all-to-all(%x, %y), channel_id=2
  %ars = (f32[8]{0}, f32[8]{0}) all-reduce-start(%g), channel_id=3, to_apply=%sum
  %ard = f32[8]{0} all-reduce-done(%ars)
  %ag = f32[16]{0} all-gather(%h), dimensions={0}
  %ar = f32[4,2]{1,0} all-reduce(%i), channel_id=4, replica_groups={{0,4},{1,5}}, to_apply=%sum
  %noop = f32[64]{0} all-reduce(%j), channel_id=5, replica_groups={{0},{1}}, to_apply=%sum
  """
  assert hlo.collective_counts(text) == {"all-to-all": 2, "ragged-all-to-all": 0,
                                         "all-gather": 1, "all-reduce": 2, "reduce-scatter": 0,
                                         "collective-permute": 0}
  assert hlo.all_to_all_bytes(text) == 4 * 160 * 64 * 4 + 2 * 80 * 64 * 2
  # The all-reduce over single-member groups (a size-1 mesh axis) moves nothing: not counted.
  assert hlo.collective_bytes(text, "all-reduce") == 2 * 8 * 4 + 4 * 2 * 4
  # A lowered program's all-to-alls: operand types only (not the replica_groups attribute).
  lowered = ('%3 = "stablehlo.all_to_all"(%2) <{replica_groups = dense<[[0, 1]]> : '
             'tensor<1x2xi64>, split_count = 2 : i64}> : (tensor<8x16xf32>) -> tensor<8x16xf32>\n'
             '%5 = "stablehlo.all_to_all"(%a, %b) <{split_count = 2 : i64}> : (tensor<2x3xbf16>, '
             'tensor<5xi32>) -> (tensor<2x3xbf16>, tensor<5xi32>)\n')
  assert hlo.stablehlo_all_to_all_bytes(lowered) == 8 * 16 * 4 + 2 * 3 * 2 + 5 * 4


def test_largest_collectives_name_their_jax_ops():
  text = """
  %a2a = f32[4,8]{1,0} all-to-all(%c), channel_id=3, replica_groups={{0,1}}, dimensions={0}
  %ag = bf16[2560,640]{1,0:T(8,128)(2,1)} all-gather(%b), channel_id=2, replica_groups=[4,16]<=[64], dimensions={1}, metadata={op_name="jit(step)/decoder/fc1/dot_general"}
  %ar = f32[2560,10240]{1,0} all-reduce(%a), channel_id=1, replica_groups=[4,16]<=[64], to_apply=%sum, metadata={op_name="jit(step)/transpose(jvp(decoder))/dot_general" source_line=3}
  """
  top = hlo.largest_collectives(text, 64, count=2)
  # 2 (n-1)/n of 2560 x 10240 f32 (n = 16), then (n-1)/n of 2560 x 640 bf16
  assert top == [
      dict(op="all-reduce", shape="f32[2560,10240]", sent_bytes=2560 * 10240 * 4 * 2 * 15 / 16,
           executions=1, group=16, op_name="jit(step)/transpose(jvp(decoder))/dot_general"),
      dict(op="all-gather", shape="bf16[2560,640]", sent_bytes=2560 * 640 * 2 * 15 / 16,
           executions=1, group=16, op_name="jit(step)/decoder/fc1/dot_general")]
  assert hlo.largest_collectives(text, 64)[2] == dict(
      op="all-to-all", shape="f32[4,8]", sent_bytes=4 * 8 * 4 / 2, executions=1, group=2,
      op_name="")


def test_topology_names():
  assert aot.parse_topology("v5p:4x4x4") == aot.Topology("v5p:4x4x4", "tpu", "v5p", None)
  assert aot.parse_topology("cpu:8").num_devices == 8
  for bad in ("v5p", "cpu:0", "v9:2x2", "v5p:4by4"):
    with pytest.raises(aot.TopologyError):
      aot.parse_topology(bad)


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed")
def test_tpu_topology_without_libtpu_says_how_to_install():
  with pytest.raises(aot.TopologyError, match=r"pip install -e '\.\[tpu\]'"):
    aot.topology_devices(aot.parse_topology("v5p:2x2x1"))


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
def test_v5p_topology_compiles(tmp_path):
  stdout, r = run_aot(tmp_path, "v5p:2x2x1", "--config.mesh.expert=4", "--config.mesh.data=-1",
                      "--config.batch_size=16")
  assert r["devices"] == r["chips"] == 4 and r["device_kind"].startswith("TPU v5")
  assert r["collectives"]["all-to-all"] > 0 and r["predicted_step_s"] > 0
  assert "predicted step time" in stdout and "HBM" in stdout
  # The roofline from this compile's own numbers and v5p's documented bandwidths.
  roof, sent = r["roofline"], r["collective_sent_bytes_per_device"]
  assert roof["compute_s"] == pytest.approx(r["step_flops_per_device"] / 459e12)
  assert roof["hbm_s"] == pytest.approx(r["bytes_accessed_per_device"] / 2765e9)
  assert roof["collective_s"] == {op: pytest.approx(b / 600e9) for op, b in sent.items() if b}
  assert set(roof["collective_s"]) == {"all-to-all", "all-reduce"}
  assert roof["bound_s"] == max(roof["compute_s"], roof["hbm_s"],
                                sum(roof["collective_s"].values()))
  assert r["split_torus_axes"] == {}  # expert=4 = the whole 2x2 torus
  assert "roofline per step (ms): compute" in stdout


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
def test_v5p_dropless_expert_parallel_compiles_to_ragged_all_to_all(tmp_path):
  """Dropless under expert=4, compiled for TPU from this CPU host: the TPU kernels (ragged
  all-to-all, ragged dot), not the CPU fallback (dense all-to-all of capacity buffers, the
  blocked grouped matmul's loops)."""
  _, r = run_aot(tmp_path, "v5p:2x2x1", "--config.mesh.expert=4", "--config.mesh.data=-1",
                 "--config.batch_size=16", "--config.model.moe.dispatch=dropless",
                 f"--dump_hlo={tmp_path / 'step.hlo'}")
  text = (tmp_path / "step.hlo").read_text()
  # 2 MoE layers x (out + back) x (forward + backward), each inside its layer's rounds loop.
  assert r["collectives"]["ragged-all-to-all"] == 8
  assert "ragged-dot" in text
  # The only loops: the rounds of the bounded receive window (forward, backward) and
  # searchsorted's (rows -> expert); none of the blocked kernel's tile loops.
  loops = re.findall(r" while\(.*?op_name=\"([^\"]*)\"", text)
  rounds = [name for name in loops if name.endswith(f"{moe.expert_parallel.ROUNDS_SCOPE}/while")]
  assert len(rounds) == 4, loops
  assert all("searchsorted" in name for name in loops if name not in rounds), loops
  # No dense all-to-all: the backward is the rounds' own exchanges (a custom VJP).
  assert r["all_to_all_operand_bytes_per_device"] == 0


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
def test_v5p_compiles_the_vmoe_s32_recipe_at_tiny_widths(tmp_path):
  """configs/vmoe_s32_imagenet.py as it is (8 blocks, MoE in blocks 5 and 7, E=8, K=2, pre-logits,
  sigmoid loss, expert dropout, data parallel) at width 16 on 64x64 images: 4 chips, no
  all-to-all (experts replicated), gradients all-reduced; the parameter count by hand."""
  _, r = run_aot(tmp_path, "v5p:2x2x1", "--config.model.width=16", "--config.model.num_heads=2",
                 "--config.model.mlp_dim=32", "--config.model.moe.hidden_dim=32",
                 "--config.model.representation_size=16", "--config.data.image_size=64",
                 "--config.model.moe.group_size=40", "--config.batch_size=32",
                 config="configs/vmoe_s32_imagenet.py:vmoe")
  assert r["devices"] == 4 and r["mesh"]["data"] == 4 and r["mesh"]["expert"] == 1
  assert r["collectives"]["all-to-all"] == 0 and r["collectives"]["all-reduce"] > 0
  D, F, E, C = 16, 32, 8, 1000
  embed = (32 * 32 * 3 * D + D) + D + 4 * D  # patch conv, CLS, posemb of the 2x2 patches
  block = 2 * 2 * D + 4 * (D * D + D)  # 2 LayerNorms; query, key, value, out
  mlp = D * F + F + F * D + D
  moe = D * E + E * mlp  # router (no bias) + 8 experts
  # + the final norm, pre-logits and head: 99,608
  assert r["params"] == embed + 8 * block + 6 * mlp + 2 * moe + 2 * D + (D * D + D) + (D * C + C)
