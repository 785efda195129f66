"""orbax checkpoints of train state + data-iterator position + config, resharding on restore."""
from __future__ import annotations

import json
import os

import ml_collections
import orbax.checkpoint as ocp

from moe_jax.train.state import TrainState


class CheckpointError(RuntimeError):
  """A checkpoint directory is missing or unreadable; the message names the fix."""


def manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mgr: ocp.CheckpointManager, state: TrainState, data_state: dict,
         config: ml_collections.ConfigDict) -> None:
  step = int(state.step)
  mgr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))))


def restore(mgr: ocp.CheckpointManager, abstract: TrainState,
            step: int | None = None) -> tuple[TrainState, dict] | None:
  """(state with `abstract`'s shardings, data-iterator state) of the latest step, or None."""
  step = mgr.latest_step() if step is None else step
  if step is None:
    return None
  try:
    restored = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types for truncated / foreign files
    raise CheckpointError(
        f"checkpoint step {step} in {mgr.directory} cannot be read ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:200]}); delete that step's folder to fall back to an earlier "
        f"one, or point --workdir elsewhere") from None
  return restored["state"], restored["data"]
