"""Multi-slice (DCN) mesh axes: `mesh.dcn_*` -> a hybrid device mesh, and the bytes that cross
slices in compiled programs."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from moe_jax.parallel import hlo, mesh as mesh_lib
from tests.test_aot import run_aot

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _config(**fields):
  c = mesh_lib.default_config()
  c.update(fields)
  return c


def _ids(mesh) -> np.ndarray:
  return np.vectorize(lambda d: d.id)(mesh.devices)


def test_dcn_data_puts_each_slice_on_one_half_of_the_data_axis():
  # 8 CPU devices = 2 simulated slices of 4 (ids 0-3, 4-7); data = 2 slices x 2, expert = 2.
  mesh = mesh_lib.build_mesh(_config(dcn_data=2, expert=2), num_experts=4, global_batch=16)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "expert": 2, "model": 1}
  ids = _ids(mesh).reshape(4, 2)
  np.testing.assert_array_equal(ids, [[0, 1], [2, 3], [4, 5], [6, 7]])
  # The expert axis (all-to-all) stays inside a slice; only `data` crosses slices.
  slices = np.array(mesh_lib.device_slices(list(mesh.devices.flat), 2)).reshape(4, 2)
  assert (slices[:, 0] == slices[:, 1]).all() and slices[:2].max() == 0 and slices[2:].min() == 1


def test_dcn_expert_splits_the_expert_axis_over_slices():
  mesh = mesh_lib.build_mesh(_config(data=1, expert=-1, dcn_expert=2), num_experts=8)
  assert dict(mesh.shape)["expert"] == 8
  np.testing.assert_array_equal(_ids(mesh).ravel(), range(8))


@pytest.mark.parametrize("fields, message", [
    (dict(dcn_data=3), r"^mesh: 8 devices cannot form 3 slices .*make the product of the mesh"),
    (dict(dcn_data=0), r"^mesh.dcn_data=0: the number of slices along `data` must be"),
    (dict(dcn_data=2, data=1, expert=8), r"cover 8 devices but there are 4 \(per slice\)"),
])
def test_bad_dcn_combinations_are_one_line_errors(fields, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.build_mesh(_config(**fields), num_experts=8)


def test_dcn_bytes_from_replica_groups_and_from_megascale_sends():
  # One program over 8 devices in 2 slices (0-3, 4-7).
  text = """
  %a = f32[1024]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%s
  %b = f32[1024]{0} all-reduce(%y), channel_id=2, replica_groups=[2,4]<=[8], to_apply=%s
  %c = f32[256]{0} all-to-all(%z), channel_id=3, replica_groups=[4,2]<=[2,4]T(1,0)
  """
  dcn = hlo.collective_dcn_bytes(text, [0, 0, 0, 0, 1, 1, 1, 1])
  # %a: s = 2 slices of m = 4: 2 (s-1)/s / m = 1/4 of 4096 B; %b stays in its slice; %c pairs
  # {i, i+4} cross: (s-1)/s of 1024 B.
  assert dcn["all-reduce"] == 4096 / 4 and dcn["all-to-all"] == 1024 / 2
  # A multi-slice TPU program (one slice's): its DCN steps are megascale host transfers.
  tpu = ('%send.4 = (f32[8,8,128]{2,1,0:T(8,128)}, u32[], token[]) send(%f, %t), channel_id=9, '
         'is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name='
         '"xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}\n'
         '%r = f32[4]{0} all-reduce(%q), replica_groups={{0,1,2,3}}, to_apply=%s\n')
  assert hlo.collective_dcn_bytes(tpu, [0] * 4 + [1] * 4)["all-reduce"] == 8 * 8 * 128 * 4


@pytest.mark.slow  # an AOT subprocess: ~40 s on 2 idle cores
def test_cpu_aot_with_two_simulated_slices_reports_dcn_bytes(tmp_path):
  stdout, r = run_aot(tmp_path, "cpu:8", "--config.batch_size=16", "--config.mesh.dcn_data=2")
  assert r["slices"] == 2 and r["mesh"]["data"] == 8
  # The gradient all-reduce over data = 2 slices x 4: a quarter of 2 (s-1)/s of its bytes.
  sent = r["collective_sent_bytes_per_device"]["all-reduce"]  # 2 (n-1)/n x bytes, n = 8
  assert r["collective_dcn_bytes_per_device"]["all-reduce"] == pytest.approx(sent / 7)
  assert "bytes sent across the 2 slices (DCN) per device: all-reduce" in stdout


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
def test_v5p_two_slices_compile_with_dcn_all_reduce(tmp_path):
  stdout, r = run_aot(tmp_path, "v5p:2x2x1", "--config.batch_size=16",
                      "--config.mesh.dcn_data=2")
  assert r["devices"] == 8 and r["chips"] == 8 and r["slices"] == 2
  assert r["collective_dcn_bytes_per_device"]["all-reduce"] > 0
  assert r["roofline"]["dcn_s"]["all-reduce"] == pytest.approx(
      r["collective_dcn_bytes_per_device"]["all-reduce"] / 6.25e9)
