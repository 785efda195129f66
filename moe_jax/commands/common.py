"""What the commands share: config loading, flag parsing, one-line errors that name the fix."""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable, Sequence

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs")
DEFAULT_CONFIG = os.path.join(CONFIGS, "vimoe_tiny_mnist.py")

# Multi-process jobs: these flags, else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
# JAX_PROCESS_ID, else a cluster that jax.distributed detects (TPU pods, SLURM, Open MPI).
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 in a multi-process job.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, in [0, num_processes).")


def _register_configs() -> None:
  """Makes this checkout's configs/ the package `configs`, whatever the working directory (the
  config files import each other as `from configs import <file>`)."""
  if "configs" in sys.modules:
    return
  spec = importlib.util.spec_from_file_location(
      "configs", os.path.join(CONFIGS, "__init__.py"), submodule_search_locations=[CONFIGS])
  module = importlib.util.module_from_spec(spec)
  sys.modules["configs"] = module
  spec.loader.exec_module(module)


_register_configs()


def resolve_config(spec: str) -> str:
  """`path[:variant]`, a relative path that is not there from the working directory taken from
  the repository root instead (so `configs/X.py` works from anywhere); ValueError if neither
  exists."""
  path, sep, variant = spec.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(ROOT, path)
  if not os.path.isfile(path):
    raise ValueError(f"--config {spec!r}: no such file; pass a config file such as "
                     f"configs/{os.path.basename(DEFAULT_CONFIG)}")
  return path + sep + variant


# What config_flags raises for a bad config file, variant or --config.* override.
_FLAG_ERRORS = (flags.Error, KeyError, AttributeError, TypeError, ValueError)


def _message(e: BaseException) -> str:
  """str(e) without the quoting a KeyError adds (also one wrapped in an AttributeError)."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  if isinstance(e, (KeyError, AttributeError)) and e.args and isinstance(e.args[0], str):
    return e.args[0].strip("\"'")
  return str(e)


def _flag_error(e: Exception, hint: str) -> str:
  """One line saying what is wrong with a config (file, variant or override) and the fix."""
  text = _message(e).strip()
  from moe_jax.train.evaluators import REPLACED  # (imports jax: only once a config is bad)
  key = text.splitlines()[0].strip("'\"") if text else ""
  for old, field in REPLACED.items():
    if isinstance(e, (KeyError, AttributeError)) and key == old.rpartition(".")[2]:
      return (f"config.{old} is gone: each evaluation is an entry of config.evals (set "
              f"--config.evals.<name>.{field})")
  if "Traceback" in text:  # config_flags appends get_config's traceback: its last line says it
    return text.splitlines()[-1].split(": ", 1)[-1]
  if isinstance(e, (KeyError, AttributeError)) and text.isidentifier():  # an unknown key
    return f"the config has no field {text!r} ({hint})"
  return f"{text.splitlines()[0] if text else type(e).__name__} ({hint})"


_OVERRIDE_HINT = "check the --config.* key against the config file"


def define_config_flag(default: str | None = DEFAULT_CONFIG,
                       flag_values: flags.FlagValues = flags.FLAGS,
                       sys_argv: list[str] | None = None) -> flags.FlagHolder:
  """The `--config path[:variant]` flag (locked; fields overridden by `--config.key=value`)."""
  try:
    return config_flags.DEFINE_config_file(
        "config", default, "Config file configs/X.py[:variant]; override fields with "
        "--config.key=value.", flag_values=flag_values, lock_config=True, sys_argv=sys_argv)
  except _FLAG_ERRORS as e:  # no --config given: the default is loaded here, with the overrides
    sys.exit(f"error: {_flag_error(e, _OVERRIDE_HINT)}")


def _resolve_argv(argv: Sequence[str]) -> list[str]:
  """argv with the value of `--config` passed through `resolve_config`."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = resolve_config(out[i + 1])
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with a bad config file, variant or `--config.*` override as a one-line
  error."""
  try:
    resolved = _resolve_argv(argv)
  except ValueError as e:  # no such config file: the message says it all
    sys.exit(f"error: {e}")
  try:
    return flags.FLAGS(resolved)
  except _FLAG_ERRORS as e:
    sys.exit(f"error: {_flag_error(e, _OVERRIDE_HINT)}")


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config `path[:variant]` as the commands' `--config` loads it, with `key=value`
  overrides parsed as `--config.key=value`; a one-line ValueError when either is bad."""
  argv = ["load_config", f"--config={resolve_config(spec)}",
          *(f"--config.{o}" for o in overrides)]
  values = flags.FlagValues()
  config = define_config_flag(None, values, argv)
  try:
    values(argv)
  except _FLAG_ERRORS as e:
    raise ValueError(_flag_error(e, f"check the overrides {', '.join(overrides)} against "
                                    "the config file")) from e
  return config.value


def workdir_for(workdir: str | None) -> str:
  """The --workdir, or workdirs/<config file name> under the repository root."""
  if workdir:
    return workdir
  path = config_flags.get_config_filename(flags.FLAGS["config"])
  return os.path.join(ROOT, "workdirs", os.path.splitext(os.path.basename(path))[0])


def run(fn: Callable[[ml_collections.ConfigDict, str], object],
        config: ml_collections.ConfigDict, workdir: str) -> None:
  """`fn(config, workdir)` in a (multi-)process job; errors a user can fix from the command
  line are printed as one line, no traceback."""
  import tensorflow_datasets as tfds

  from moe_jax.data import DatasetNotPreparedError
  from moe_jax.parallel import distributed
  from moe_jax.train.checkpoint import CheckpointError

  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  tfds.display_progress_bar(False)
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    fn(config, workdir)
  except (ValueError, DatasetNotPreparedError, CheckpointError, FloatingPointError) as e:
    sys.exit(f"error: {e}")
