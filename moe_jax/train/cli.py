"""Shared plumbing of train.py / eval.py: flag parsing and one-line errors that name the fix."""
from __future__ import annotations

import os
import sys
from typing import Callable

import ml_collections
import tensorflow_datasets as tfds
from absl import flags, logging
from ml_collections import config_flags

from moe_jax.data import DatasetNotPreparedError
from moe_jax.parallel import distributed
from moe_jax.train.checkpoint import CheckpointError

# Errors a user can fix from the command line: printed as one line, no traceback.
USER_ERRORS = (ValueError, DatasetNotPreparedError, CheckpointError, FloatingPointError)

# Multi-process jobs: these flags, else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
# JAX_PROCESS_ID, else a cluster that jax.distributed detects (TPU pods, SLURM, Open MPI).
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 in a multi-process job.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, in [0, num_processes).")
def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with unknown or malformed `--config.*` overrides as one-line errors."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    sys.exit(f"error: {message} (check the --config.* key against the config file)")


def workdir_for(workdir: str | None, config_flag: str, root: str) -> str:
  """The --workdir, or workdirs/<config file name>[_<variant>] under the repo root."""
  if workdir:
    return workdir
  path = config_flags.get_config_filename(flags.FLAGS[config_flag])
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join(root, "workdirs", name)


def run(fn: Callable[[ml_collections.ConfigDict, str], object],
        config: ml_collections.ConfigDict, workdir: str) -> None:
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  tfds.display_progress_bar(False)
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    fn(config, workdir)
  except USER_ERRORS as e:
    sys.exit(f"error: {e}")
