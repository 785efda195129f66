"""Multi-process (multi-host) start-up and per-process batches, on `jax.distributed` only.

    from moe_jax.parallel import distributed
    distributed.initialize()            # first thing, before any JAX computation
    ...
    batch = distributed.global_batch(local_batch, sharding.batch_sharding(mesh))

`initialize` calls `jax.distributed.initialize` when the job runs as several processes and does
nothing for a single process. Where the settings come from, first match wins:

1. explicit arguments (e.g. from absl flags);
2. the environment variables JAX_COORDINATOR_ADDRESS ("host:port" of process 0),
   JAX_NUM_PROCESSES and JAX_PROCESS_ID;
3. a cluster that `jax.distributed.initialize()` detects by itself — SLURM (srun with more than
   one task), Open MPI (mpirun), multi-host Cloud TPU (GKE: TPU_WORKER_HOSTNAMES / TPU_PROCESS_
   ADDRESSES with several hosts, Megascale: MEGASCALE_COORDINATOR_ADDRESS): then it is called
   with no arguments. On a GCE TPU pod slice, where JAX reads the hosts from the metadata server
   and no environment variable says so, pass `auto=True` (or set MOE_JAX_DISTRIBUTED=auto).

CPU processes exchange collectives through gloo (`jax_cpu_collectives_implementation`, the
default in jax 0.10.2; set explicitly here so an older default of "none" cannot bite).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

_AUTO_ENV = "MOE_JAX_DISTRIBUTED"


def _int_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"distributed: environment variable {name}={value!r} must be an integer")


def _cluster_detected() -> str | None:
  """Name of a multi-process launcher that `jax.distributed.initialize()` auto-detects, if any."""
  env = os.environ
  if "SLURM_JOB_ID" in env and (_int_env("SLURM_NTASKS") or 1) > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and (_int_env("OMPI_COMM_WORLD_SIZE") or 2) > 1:
    return "openmpi"
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "cloud_tpu"
  if env.get(_AUTO_ENV, "").lower() in ("1", "auto", "true"):
    return _AUTO_ENV
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               initialization_timeout: int = 300) -> bool:
  """Joins the multi-process JAX job, or does nothing for a single process.

  Args:
    coordinator_address: "host:port" of process 0 (default: JAX_COORDINATOR_ADDRESS).
    num_processes: processes in the job (default: JAX_NUM_PROCESSES).
    process_id: this process, in [0, num_processes) (default: JAX_PROCESS_ID).
    auto: call `jax.distributed.initialize()` without arguments and let JAX detect the cluster
      (TPU pods, SLURM, Open MPI), even where no environment variable announces one.
    initialization_timeout: seconds to wait for every process to join.

  Returns:
    True when `jax.distributed` is (now) initialised, False for a single-process run.
  Must run before any JAX computation (before the backends start).
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _int_env("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _int_env("JAX_PROCESS_ID")
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if num_processes == 1 and (process_id or 0) == 0:
      return False  # one process: nothing to join
    if None in explicit and (auto or _cluster_detected()):  # JAX detects the missing ones
      _use_gloo_on_cpu()
      jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                 initialization_timeout=initialization_timeout)
      return True
    if None in explicit:
      missing = [n for n, v in zip(("coordinator_address (JAX_COORDINATOR_ADDRESS)",
                                    "num_processes (JAX_NUM_PROCESSES)",
                                    "process_id (JAX_PROCESS_ID)"), explicit) if v is None]
      raise ValueError(f"distributed: set all of coordinator address, process count and process "
                       f"id, or none of them; missing {', '.join(missing)}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"distributed: process_id={process_id} must be in [0, num_processes="
                       f"{num_processes})")
    _use_gloo_on_cpu()
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=initialization_timeout)
    return True
  if auto or _cluster_detected():
    _use_gloo_on_cpu()
    jax.distributed.initialize(initialization_timeout=initialization_timeout)
    return True
  return False


def _use_gloo_on_cpu() -> None:
  """Cross-process collectives on CPU devices need an implementation; gloo ships with jaxlib."""
  if jax.config.jax_cpu_collectives_implementation in (None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def process_rows(sharding: jax.sharding.Sharding, global_batch_size: int) -> np.ndarray:
  """Indices along the batch dimension (axis 0) of the rows this process's devices hold, in the
  order `global_batch` expects them in its local data. Load these rows on this process."""
  index_map = sharding.addressable_devices_indices_map((global_batch_size,))
  starts = sorted({(idx[0].start or 0, idx[0].stop if idx[0].stop is not None
                    else global_batch_size) for idx in index_map.values()})
  return np.concatenate([np.arange(a, b) for a, b in starts])


def global_batch(local: Any, sharding: jax.sharding.Sharding) -> Any:
  """A tree of process-local batches (numpy, leading axis = this process's rows) -> global
  `jax.Array`s sharded by `sharding` over every process's devices (batch axis 0 split across
  processes; the global shape is inferred). Single-process: the same as `jax.device_put`."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local)
