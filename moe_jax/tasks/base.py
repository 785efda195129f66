"""`Task`: what the trainer, AOT compilation, evaluation and the comparison need of one problem.

A task owns its data (train batches, eval batches), its loss, its evaluation (per-batch sums on
device, turned into `eval/...` scalars on the host) and the shapes of its batches, so that the
trainer (`moe_jax.train.loop`), `moe_jax.aot` and `moe_jax.analysis.compare` run any task the
same way. Tasks are registered in `moe_jax.tasks.TASKS` by `config.task`.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import jax
import ml_collections
import numpy as np
from flax import nnx

Batch = dict[str, jax.Array]
HostBatch = dict[str, np.ndarray]


class Task:
  """Base class: subclasses set `name` and `data_module` and fill in the problem-specific methods.

  `config` is the whole training config (`config.data`, `config.model`, ...).
  """

  name: str = ""
  # The task's input pipeline: a module with `train_dataset(data_config, *, batch_size, seed,
  # process_index, process_count)` and `eval_dataset(data_config, source, *, batch_size,
  # process_index, process_count)` (e.g. `moe_jax.data`; `source`: a `moe_jax.data.EvalSource`).
  data_module: Any = None

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def check(self) -> None:
    """Start-up checks that need no device (config fields agree with each other and with the
    dataset); ValueError naming the field and the fix."""
    raise NotImplementedError

  def train_batches(self, *, batch_size: int, seed: int, process_index: int,
                    process_count: int) -> Iterator[HostBatch]:
    """Endless, resumable (`get_state` / `set_state`) iterator of this process's batches."""
    return self.data_module.train_dataset(self.config.data, batch_size=batch_size, seed=seed,
                                          process_index=process_index,
                                          process_count=process_count)

  def eval_batches(self, source, *, batch_size: int, process_index: int,
                   process_count: int) -> Iterable[HostBatch]:
    """Re-iterable single pass over one evaluation's data (`source`: a `moe_jax.data.EvalSource`,
    from a `config.evals` entry); batches carry `mask [B]` (1 = real)."""
    return self.data_module.eval_dataset(self.config.data, source, batch_size=batch_size,
                                         process_index=process_index, process_count=process_count)

  def check_eval(self, source) -> None:
    """Start-up checks of one evaluation's data (`source`: a `moe_jax.data.EvalSource`): dataset,
    split and pp string; ValueError naming `source.field` and the fix."""
    raise NotImplementedError

  def batch_shapes(self, batch_size: int, eval_: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a global batch of `batch_size` (eval batches include `mask`)."""
    raise NotImplementedError

  def loss(self, model: nnx.Module, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss incl. MoE aux losses, `train/...` metrics) of a train-mode model."""
    raise NotImplementedError

  def eval_sums(self, model: nnx.Module, batch: Batch) -> Any:
    """A tree of sums over the batch's real examples (added up over batches by the trainer)."""
    raise NotImplementedError

  def eval_results(self, sums: Any) -> tuple[dict[str, float], dict]:
    """(`eval/...` scalars, extras such as per-layer routing statistics) of the summed tree."""
    raise NotImplementedError

  def report(self, extras: dict, plot_dir: str | None) -> dict:
    """What `eval_<name>.json` holds beside the scalars (e.g. the routing report, its plots
    drawn into `plot_dir` unless None); {} by default."""
    del extras, plot_dir
    return {}

  def abstract_batch(self, batch_size: int, sharding: jax.sharding.Sharding,
                     eval_: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """`batch_shapes` with `sharding` attached (for lowering before data arrives)."""
    return with_sharding(self.batch_shapes(batch_size, eval_), sharding)


def with_sharding(shapes: dict[str, jax.ShapeDtypeStruct],
                  sharding: jax.sharding.Sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """`shapes` with `sharding` attached."""
  return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for k, s in shapes.items()}
