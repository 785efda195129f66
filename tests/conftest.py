"""Test setup: 8 simulated CPU devices and a compilation cache for this run, set before jax is
imported anywhere.

The cache (a fresh temporary folder per `pytest` run, shared by the xdist workers and by the
`train.py`/`eval.py` subprocesses the tests start, which inherit the `JAX_*` variables; removed at
the end) lets a test reuse the executable of an identical program another test compiled: many
trainer tests compile the same tiny train and eval steps. A hit returns the executable XLA built
for the same HLO, options and devices, so what runs is unchanged. A `JAX_COMPILATION_CACHE_DIR`
set by the caller is used as it is and kept; `JAX_COMPILATION_CACHE_DIR=` (empty) turns caching
off.
"""
import importlib.util
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU without its LLVM optimisation passes (jax's own switch: xla_backend_optimization_level=0,
# xla_llvm_disable_expensive_passes): the tests' programs are tiny, so compiling them, not running
# them, is most of the suite's time, and the thousands of eager ops compile ~4x faster. The HLO
# (partitioning, collectives, buffer assignment) is unchanged. Inherited by the train.py/eval.py/aot
# subprocesses (`JAX_*`); `JAX_DISABLE_MOST_OPTIMIZATIONS=0` turns it off. Left off where libtpu
# is installed: TPU AOT compiles there keep their default pipeline (their memory reports).
if importlib.util.find_spec("libtpu") is None:
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # True in the controller only
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="moe_jax_test_xla_cache_")
# Only programs that took >= 1 s to compile are written (train / eval steps, models' forwards):
# with a size limit set, jax scans every entry of the folder on each write (an O(entries) LRU
# check), and the thousands of eager ops and tiny jits the unit tests compile (tens of ms each)
# made that scan cost more than the compiles it saved: measured on 2 cores, 146 s vs 47 s for
# test_routers.py::test_gradients[expert_choice-kw0] with a folder of 2348 entries.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# A size limit turns on jax's file lock around each read and write: the two xdist workers share
# the folder.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 * 2**30))

import jax  # noqa: E402  (must follow the XLA_FLAGS line)

assert jax.device_count() == 8, "tests expect 8 simulated CPU devices"


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):  # the xdist controller or a plain run
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
