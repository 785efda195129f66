"""Per-step counts of compiled HLO with loops: collectives and dot / convolution FLOPs inside a
`while` body count once per iteration (`moe_jax.parallel.hlo.loop_weights`)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import aot
from moe_jax.parallel import hlo


def compiled_text(fn, *shapes_specs) -> str:
  """Compiled HLO text of `fn` in a shard_map over 8 devices ("d"), args (shape, spec)."""
  mesh = jax.make_mesh((8,), ("d",))
  args = [jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))
          for shape, spec in shapes_specs]
  specs = tuple(spec for _, spec in shapes_specs)
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)
  return jax.jit(mapped).lower(*args).compile().as_text()


def psum_and_gather(w, x):
  """Per device: x [8, 16] @ w [16, 16] summed over "d" (an all-reduce of f32[8,16]) plus the
  gathered x rows (an all-gather of f32[2,16] -> f32[16,16]; of x, not w, which XLA would
  hoist out of a loop)."""
  rows = jax.lax.all_gather(x[:2], "d", tiled=True)
  return jax.lax.psum(x @ w, "d") + rows[:8]


def scanned(unroll: bool, length: int = 4):
  def fn(w, xs):  # xs [length, 8, 16] (the same on every device)
    def body(c, x):
      return c + psum_and_gather(w, x), None
    return jax.lax.scan(body, jnp.zeros((8, 16)), xs, unroll=unroll)[0]
  return compiled_text(fn, ((16, 16), P()), ((length, 8, 16), P()))


# Per execution, per device (8 devices): all-reduce 2 (n-1)/n x 8*16*4 bytes, all-gather
# (n-1)/n x 16*16*4 bytes of result.
AR_SENT, AG_SENT = 2 * 7 / 8 * 8 * 16 * 4, 7 / 8 * 16 * 16 * 4


def test_scan_counts_its_collectives_once_per_iteration():
  text = scanned(unroll=False)
  loops = hlo.loop_weights(text)
  assert list(loops.trip_counts.values()) == [4] and loops.loops_without_trip_count == ()
  assert hlo.collective_counts(text)["all-reduce"] == 1  # one instruction in the body
  runs = hlo.collective_executions(text)
  assert runs["all-reduce"] == 4 and runs["all-gather"] == 4
  sent = hlo.collective_wire_bytes(text, 8)
  assert sent["all-reduce"] == pytest.approx(4 * AR_SENT)
  assert sent["all-gather"] == pytest.approx(4 * AG_SENT)
  # The same program unrolled (no loop) sends the same bytes.
  unrolled = hlo.collective_wire_bytes(scanned(unroll=True), 8)
  assert unrolled["all-reduce"] == pytest.approx(sent["all-reduce"])
  assert unrolled["all-gather"] == pytest.approx(sent["all-gather"])


def test_nested_scans_multiply():
  def fn(w, xs):  # xs [3, 5, 8, 16]
    def inner(c, x):
      return c + jax.lax.psum(x @ w, "d"), None

    def outer(c, x):
      return jax.lax.scan(inner, c, x)[0], None
    return jax.lax.scan(outer, jnp.zeros((8, 16)), xs)[0]
  text = compiled_text(fn, ((16, 16), P()), ((3, 5, 8, 16), P()))
  assert sorted(hlo.loop_weights(text).trip_counts.values()) == [3, 5]
  assert hlo.collective_executions(text)["all-reduce"] == 15
  assert hlo.collective_wire_bytes(text, 8)["all-reduce"] == pytest.approx(15 * AR_SENT)
  assert hlo.dot_conv_flops(text) == 15 * 2 * 8 * 16 * 16
  assert hlo.dot_conv_flops(text, per_step=False) == 2 * 8 * 16 * 16


def test_loop_without_trip_count_is_flagged_and_counted_once():
  def fn(w, x):  # runs until the data says stop: XLA knows no trip count
    def body(c):
      return c + jax.lax.psum(x @ w, "d")
    return jax.lax.while_loop(lambda c: c.sum() < 1e3, body, jnp.zeros((8, 16)))
  text = compiled_text(fn, ((16, 16), P()), ((8, 16), P()))
  loops = hlo.loop_weights(text)
  assert len(loops.loops_without_trip_count) == 1 and loops.trip_counts == {}
  assert hlo.collective_executions(text)["all-reduce"] == 1
  counts = aot.hlo_counts(text, 8)
  assert counts["loops_without_trip_count"] == list(loops.loops_without_trip_count)


def test_scanned_matmul_flops_equal_the_unrolled_ones():
  per_iteration = 2 * 8 * 16 * 16
  scan_text, unrolled_text = scanned(unroll=False), scanned(unroll=True)
  assert hlo.dot_conv_flops(scan_text) == 4 * per_iteration
  assert hlo.dot_conv_flops(unrolled_text) == 4 * per_iteration
  assert hlo.dot_conv_flops(scan_text, per_step=False) == per_iteration


def test_dot_and_conv_flops_match_xla_cost_analysis_without_loops():
  """A loop-free conv + dense step: the dots and convolutions (padding taps not counted, as in
  XLA) by hand, and XLA's FLOPs (elementwise included) within 1% of them."""
  def fn(x, k, g, w):  # x [B, H, W, C], k [3, 3, C, F], g depthwise [3, 3, 1, F], w [F, 32]
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jax.lax.conv_general_dilated(y, g, (2, 2), "SAME", feature_group_count=64,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.einsum("bhwf,fo->bhwo", jax.nn.relu(y), w)
  shapes = [(2, 16, 16, 8), (3, 3, 8, 64), (3, 3, 1, 64), (64, 32)]
  compiled = jax.jit(fn).lower(*[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]).compile()
  cost = compiled.cost_analysis()
  xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
  # (output, tap) pairs inside the input per spatial dim: SAME 3-tap over 16 positions pads one
  # each side: 16 x 3 - 2 = 46; stride 2 over 16 -> 8 outputs pads (0, 1): 8 x 3 - 1 = 23.
  expected = (2 * 2 * 64 * 8 * 46 * 46      # dense conv: batch x F x C x pairs
              + 2 * 2 * 64 * 1 * 23 * 23    # depthwise: 1 input feature per group
              + 2 * 2 * 8 * 8 * 32 * 64)    # einsum over f
  assert hlo.dot_conv_flops(compiled.as_text()) == expected
  assert hlo.dot_conv_flops(compiled.as_text()) == pytest.approx(xla, rel=0.01)


def test_calls_of_a_computation_from_two_loops_add_up():
  text = """
%inner (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %ar = f32[4]{0} all-reduce(%p), channel_id=1, replica_groups={{0,1}}, to_apply=%sum
}
%body (q: f32[4]) -> f32[4] {
  %q = f32[4]{0} parameter(0)
  ROOT %f = f32[4]{0} fusion(%q), kind=kLoop, calls=%inner
}
%cond (r: f32[4]) -> pred[] {
  %r = f32[4]{0} parameter(0)
  ROOT %c = pred[] constant(true)
}
ENTRY %main (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %w1 = f32[4]{0} while(%x), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"6"}}
  ROOT %w2 = f32[4]{0} while(%w1), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"2"}}
}
"""
  assert hlo.loop_weights(text).trip_counts == {"w1": 6, "w2": 2}
  assert hlo.collective_executions(text)["all-reduce"] == 8
  assert hlo.collective_bytes(text, "all-reduce") == 8 * 16


def test_trip_count_read_off_the_loop_counter_without_known_trip_count():
  """libtpu writes no `known_trip_count`: the count comes from the counter (start 0, + 1 in the
  body, `< 4` in the condition; on XLA:CPU the compare sits in a fusion)."""
  text = re.sub(r',"known_trip_count":\{"n":"\d+"\}', "", scanned(unroll=False))
  assert '"known_trip_count"' not in text
  loops = hlo.loop_weights(text)
  assert list(loops.trip_counts.values()) == [4] and loops.counted_from_counter == tuple(
      loops.trip_counts) and loops.loops_without_trip_count == ()
  assert hlo.collective_executions(text)["all-reduce"] == 4
  # libtpu's form (from a v5p compile of the same scan, trimmed): the compare at the ROOT.
  tpu = """
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[]{:T(128)}, f32[8]{0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %copy.7 = s32[]{:T(128)S(6)} copy(%i)
  %one = s32[]{:T(128)} constant(2)
  %add.25 = s32[]{:T(128)} add(%copy.7, %one)
  %ar = f32[8]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%sum
  ROOT %t = (s32[]{:T(128)}, f32[8]{0}) tuple(%add.25, %ar)
}
%cond (q: (s32[], f32[8])) -> pred[] {
  %limit = s32[]{:T(128)} constant(7)
  %q = (s32[]{:T(128)}, f32[8]{0}) parameter(0)
  %j = s32[]{:T(128)} get-tuple-element(%q), index=0
  ROOT %lt.4 = pred[]{:T(512)} compare(%j, %limit), direction=LT
}
ENTRY %main (x: f32[8]) -> (s32[], f32[8]) {
  %x0 = f32[8]{0} parameter(0)
  %zero = s32[]{:T(128)} constant(1)
  %copy.5 = s32[]{:T(128)} copy(%zero)
  %init = (s32[]{:T(128)}, f32[8]{0}) tuple(%copy.5, %x0)
  ROOT %while.11 = (s32[]{:T(128)}, f32[8]{0}) while(%init), condition=%cond, body=%body
}
"""
  assert hlo.loop_weights(tpu).trip_counts == {"while.11": 3}  # i = 1, 3, 5
  assert hlo.collective_executions(tpu)["all-reduce"] == 3
  # A counter compared with a value the loop computes: no trip count, flagged.
  data_dependent = tpu.replace("%limit = s32[]{:T(128)} constant(7)",
                               "%limit = s32[]{:T(128)} get-tuple-element(%q), index=0")
  assert hlo.loop_weights(data_dependent).loops_without_trip_count == ("while.11",)


def test_recount_command_redoes_the_hlo_counts_from_a_dump(tmp_path, capsys):
  """`python -m moe_jax.commands.hlo_recount`: a report's HLO counts from its dumped text;
  step FLOPs = XLA's (the scan body once) + the dots of the 3 other iterations."""
  import json

  from moe_jax.commands import hlo_recount

  text = scanned(unroll=False)
  report = {"topology": "cpu:8", "devices": 8, "chips": 8, "device_kind": "cpu",
            "mesh": {"d": 8}, "batch_size": 8, "params": 256, "param_bytes": 1024,
            "memory_per_device": dict(argument=0, output=0, alias=0, temp=0, total=0),
            "flops_per_device": 5000.0, "flops_total": 40000.0, "bytes_accessed_per_device": 0.0,
            "slices": 1, "split_torus_axes": {}, "collectives": {}}
  (tmp_path / "r.json").write_text(json.dumps(report))
  (tmp_path / "step.hlo").write_text(text)
  hlo_recount.main(["--report", str(tmp_path / "r.json"), "--hlo", str(tmp_path / "step.hlo"),
                    "--json", str(tmp_path / "out.json")])
  out = json.loads((tmp_path / "out.json").read_text())
  assert out["step_flops_per_device"] == 5000.0 + 3 * 2 * 8 * 16 * 16
  assert out["collective_executions_per_step"]["all-reduce"] == 4
  assert out["collective_sent_bytes_per_device"]["all-reduce"] == pytest.approx(4 * AR_SENT)
  assert "collectives run per step: all-to-all 0, ragged-all-to-all 0, all-gather 4" in (
      capsys.readouterr().out)
