"""`config.init_from`: start a run from a pretrained checkpoint or another run's checkpoint.

The source is an HF checkpoint directory (`kind="hf"`), a big_vision / vit_jax `.npz`
(`kind="big_vision"`; both through `moe_jax.checkpoints.importers`) or another
run's workdir (`kind="run"`, its latest orbax checkpoint; only the parameters are read, on the
same number of devices as it was saved from). Rules,
in the style of vmoe's initialisation rules, map it onto the model, parameter by parameter:

- keep: a parameter at the same path with the same shape is copied (the default);
- re-init: parameters whose path matches a regex of `reinit` keep their fresh initialisation
  (e.g. `head/.*` when num_classes differs); so do checkpoint parameters they match;
- resize posemb: `posemb [1, g*g, D]` of another grid is resized bilinearly to the model's (the
  CLS token is its own parameter and is kept);
- upcycle: a dense source's MLPs become every expert of the model's MoE layers
  (`vimoe.upcycled_params`; routers fresh).

Anything else that differs is a one-line `CheckpointMismatch` naming the first parameter. The
run starts at step 0 with a fresh optimizer state. A run with its own checkpoint resumes from it
and ignores `init_from`.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from moe_jax.checkpoints import importers, tree
from moe_jax.checkpoints.tree import CheckpointMismatch
from moe_jax.models import vimoe
from moe_jax.train.state import TrainState


def default_config() -> ml_collections.ConfigDict:
  """The `config.init_from` node; `kind=""` starts from scratch."""
  return ml_collections.ConfigDict(dict(
      kind="",  # "" (from scratch), "hf" (HF checkpoint directory), "big_vision" (.npz) or "run"
      path="",
      reinit="",  # comma-separated regexes of our parameter paths left at init, e.g. "head/.*"
      resize_posemb=True,
      upcycle=False,  # dense source -> the model's MoE layers' experts
      upcycle_noise_std=0.0))


def source_params(c: ml_collections.ConfigDict,
                  model: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Flat parameters of `c.path`; for a pretrained checkpoint, CheckpointMismatch if `model`
  computes another function than the checkpoint's architecture (`importers.check_architecture`)."""
  if c.kind in importers.KINDS:
    checkpoint_config, params, _ = importers.import_checkpoint(c.path, c.kind)
    importers.check_architecture(model, checkpoint_config, f"init_from {c.path}")
    return params
  if c.kind == "run":
    mgr = ocp.CheckpointManager(f"{c.path}/checkpoints")
    step = mgr.latest_step()
    if step is None:
      raise CheckpointMismatch(f"init_from.path={c.path!r} has no checkpoint")
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    # orbax stores each nnx.Param as {"value": array}.
    return {k.removesuffix("/value"): np.asarray(v)
            for k, v in tree.flatten(restored["state"]["params"]).items()}
  raise CheckpointMismatch(f"init_from.kind={c.kind!r} must be '', 'hf', 'big_vision' or 'run'")


def resize_posemb(posemb: np.ndarray, tokens: int) -> np.ndarray:
  """`[1, g*g, D] -> [1, tokens, D]`, bilinear over the square patch grid."""
  g, h = int(round(posemb.shape[1] ** 0.5)), int(round(tokens ** 0.5))
  grid = jnp.asarray(posemb).reshape(g, g, -1)
  return np.asarray(jax.image.resize(grid, (h, h, grid.shape[-1]), "bilinear")).reshape(1, h * h, -1)


def initialise(fresh: dict[str, np.ndarray], source: dict[str, np.ndarray],
               c: ml_collections.ConfigDict, moe_layer_indices: list[int]) -> dict[str, np.ndarray]:
  """The model's flat parameters from its `fresh` ones and `source` by `c`'s rules."""
  reinit = [re.compile(r) for r in c.reinit.split(",") if r]
  fresh_init = lambda k: any(r.fullmatch(k) for r in reinit)
  if c.upcycle:
    source = vimoe.upcycled_params(source, {k: v.shape for k, v in fresh.items()},
                                   moe_layer_indices, noise_std=c.upcycle_noise_std)
    routers = [f"blocks/{i}/mlp/router/" for i in moe_layer_indices]
    fresh_init = lambda k, f=fresh_init: f(k) or any(k.startswith(r) for r in routers)
  out = {}
  for k, value in sorted(fresh.items()):
    if fresh_init(k):
      out[k] = value
    elif k not in source:
      raise CheckpointMismatch(f"init_from {c.path}: our parameter {k} {value.shape} is not in "
                               "the checkpoint (add it to init_from.reinit?)")
    elif source[k].shape == value.shape:
      out[k] = np.asarray(source[k], value.dtype)
    elif k == "posemb" and c.resize_posemb and source[k].shape[2] == value.shape[2]:
      out[k] = resize_posemb(source[k], value.shape[1])
    else:
      raise CheckpointMismatch(f"init_from {c.path}: our parameter {k} has shape {value.shape}, "
                               f"the checkpoint's {source[k].shape} (add it to init_from.reinit?)")
  unused = sorted(k for k in source if k not in fresh and not fresh_init(k))
  if unused:
    raise CheckpointMismatch(f"init_from {c.path}: checkpoint parameter {unused[0]} is not a "
                             "parameter of the model")
  return out


def apply(state: TrainState, config: ml_collections.ConfigDict,
          tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
  """Fresh `state` (sharded by `shardings`) with its parameters from `config.init_from`, step 0
  and a fresh optimizer state."""
  c, model = config.init_from, config.model
  fresh = tree.flatten(jax.device_get(nnx.to_pure_dict(state.params)))
  ids = vimoe.moe_layer_indices(model.moe_layers, model.depth) if "moe_layers" in model else []
  params = jax.tree.map(lambda x: x, state.params)
  nnx.replace_by_pure_dict(params, tree.unflatten(initialise(fresh, source_params(c, model), c,
                                                             ids)))
  params = jax.device_put(params, shardings.params)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  return TrainState(step=jnp.zeros_like(state.step), params=params, rest=state.rest,
                    opt_state=opt_state)
