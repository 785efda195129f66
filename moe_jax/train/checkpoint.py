"""orbax checkpoints of train state + data-iterator position + config + per-array checksums,
resharding on restore. A corrupt step (unreadable, or an array whose checksum differs) is moved
aside and the previous step used; a checkpoint of another config is an error naming the array."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from moe_jax import paths
from moe_jax.train.state import TrainState

EVAL_FIELDS = ("step", "params", "rest")  # what evaluation restores (no optimizer state)


class CheckpointError(RuntimeError):
  """A checkpoint directory is missing, unreadable or of another config; the message names the
  fix."""


class _Corrupt(Exception):
  """This step's data cannot be trusted (an earlier step may be)."""


def manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      paths.workdir_path(workdir) / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def _name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _words(x: jax.Array) -> jax.Array:
  """`x`'s bytes as uint32 words (one per element of up to 4 bytes; [..., 2] for 8 bytes)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size < 4:
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
  """sum(word_i * (odd multiplier of i)) mod 2**32: any changed word changes it, and (integer,
  order-free) it is the same on every mesh and sharding."""
  w = _words(x)
  index, stride = jnp.zeros(w.shape, jnp.uint32), 1
  for d in reversed(range(w.ndim)):
    index += jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
    stride *= w.shape[d]
  return jnp.sum(w * (index * jnp.uint32(2654435761) | jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _checksums_on_device(tree) -> list[jax.Array]:
  return [_checksum(x) for x in jax.tree.leaves(tree)]


def checksums(tree) -> dict[str, int]:
  """{array path: checksum} of every array in `tree`, computed on device."""
  names = [_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  return dict(zip(names, (int(v) for v in jax.device_get(_checksums_on_device(tree)))))


def save(mgr: ocp.CheckpointManager, state: TrainState, data_state: dict,
         config: ml_collections.ConfigDict) -> None:
  step = int(state.step)
  mgr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_fields(state)),
      checksums=ocp.args.JsonSave(checksums(state)),
      data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))))


def _first_line(e: Exception) -> str:
  return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _shape(x) -> tuple[int, ...]:
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.eval_shape(jax.random.key_data, x).shape
  return tuple(x.shape)


def _mismatch(directory: epath.Path, abstract) -> str | None:
  """What differs between the arrays of checkpoint `directory`/state and `abstract`, else None
  (_Corrupt when the checkpoint's metadata cannot be read)."""
  try:
    tree = ocp.PyTreeCheckpointer().metadata(directory / "state").item_metadata.tree
  except Exception as e:  # orbax raises many types for truncated / foreign files
    raise _Corrupt(f"its metadata cannot be read ({_first_line(e)})") from None
  saved = {_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}
  wanted = {_name(p): _shape(x) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  if abstract is not None and not isinstance(abstract, TrainState):  # a partial restore
    saved = {k: v for k, v in saved.items() if k.split("/")[0] in abstract}
  only_here = sorted(set(wanted) - set(saved))
  only_there = sorted(set(saved) - set(wanted))
  if only_here or only_there:
    parts = [f"{len(only_here)} arrays only in this config's state (e.g. {only_here[0]})"
             if only_here else "",
             f"{len(only_there)} only in the checkpoint (e.g. {only_there[0]})"
             if only_there else ""]
    return "; ".join(p for p in parts if p)
  for name, shape in wanted.items():
    if saved[name] != shape:
      return f"{name} has shape {saved[name]} in the checkpoint, {shape} in this config"
  return None


def _restore_step(mgr: ocp.CheckpointManager, abstract, step: int):
  directory = mgr.directory / str(step)
  mismatch = _mismatch(directory, abstract)
  if mismatch is not None:
    raise CheckpointError(
        f"checkpoint step {step} in {mgr.directory} was saved with a different config: "
        f"{mismatch}; pass the model and optimizer flags it was trained with, or start fresh "
        "with another --workdir (to start a next stage from it: another --workdir and "
        f"--config.init_from.kind=run --config.init_from.path={mgr.directory.parent})")
  if isinstance(abstract, TrainState):
    state_args = ocp.args.StandardRestore(_fields(abstract))
  else:
    state_args = ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True)
  has_sums = (directory / "checksums").is_dir()  # older checkpoints have none
  items = dict(state=state_args, data=ocp.args.JsonRestore())
  if has_sums:
    items["checksums"] = ocp.args.JsonRestore()
  try:
    restored = mgr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax raises many types for truncated / foreign files
    raise _Corrupt(f"it cannot be read ({_first_line(e)})") from None
  if has_sums:
    got = checksums(restored["state"])
    bad = [k for k, v in got.items() if restored["checksums"].get(k) != v]
    if bad:
      raise _Corrupt(f"{len(bad)} arrays differ from their checksums (e.g. {bad[0]})")
  state = restored["state"]
  return (TrainState(**state) if isinstance(abstract, TrainState) else state), restored["data"]


def _fields(state: TrainState) -> dict:
  """`state`'s fields that are not None, by name: what is saved and restored, so a state
  without EMA has the tree of checkpoints written before `TrainState.ema` existed."""
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
          if getattr(state, f.name) is not None}


def restore(mgr: ocp.CheckpointManager, abstract: TrainState | dict
            ) -> tuple[TrainState | dict, dict] | None:
  """(state with `abstract`'s shardings, data-iterator state) of the latest good step, or None
  when there is no checkpoint. `abstract` is a TrainState, or a dict of some of its fields
  (e.g. `EVAL_FIELDS`) to restore only those. A corrupt step is moved aside (renamed
  `<step>.corrupt`) with a one-line warning and the step before it used."""
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      return _restore_step(mgr, abstract, step)
    except _Corrupt as e:
      aside = mgr.directory / f"{step}.corrupt"
      if jax.process_index() == 0:
        (mgr.directory / str(step)).replace(aside)
      mgr.reload()
      if not mgr.all_steps():
        raise CheckpointError(
            f"checkpoint step {step} in {mgr.directory} is corrupt: {e}; no earlier step is "
            f"left (it was moved to {aside}): point --workdir elsewhere to start fresh") from None
      logging.warning("checkpoint step %d is corrupt (%s); moved it to %s and fell back to "
                      "step %d", step, e, aside, max(mgr.all_steps()))
  return None


def eval_abstract(abstract: TrainState) -> dict:
  """The fields of `abstract` that evaluation restores (with the EMA parameters if it has one)."""
  fields = EVAL_FIELDS + (("ema",) if abstract.ema is not None else ())
  return {k: getattr(abstract, k) for k in fields}

