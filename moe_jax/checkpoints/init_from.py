"""`config.init_from`: start a run from a pretrained checkpoint or another run's checkpoint.

The source is an HF checkpoint directory (`kind="hf"`), a big_vision / vit_jax `.npz`
(`kind="big_vision"`; both through `moe_jax.checkpoints.importers`), or another run's workdir
(`kind="run"`: the parameters of its latest orbax checkpoint, read onto this process's first
device whatever mesh it was saved from, then placed on the current mesh). Rules, in the style of
vmoe's initialisation rules, map it onto the model, parameter by parameter:

- keep: a parameter at the same path with the same shape is copied (the default);
- re-init: parameters whose path matches a regex of `reinit` keep their fresh initialisation
  (e.g. `head/.*` when num_classes differs); so do checkpoint parameters they match;
- resize posemb: `posemb [1, g*g, D]` of another grid is interpolated to the model's over the
  square patch grid (`resize_posemb`: 'bicubic' as HF ViT / DINOv2 `interpolate_pos_encoding`,
  'bilinear', or 'none' = an error). Both follow torch's `interpolate(align_corners=False,
  antialias=False)` exactly (cubic a = -0.75; `jax.image.resize`'s cubic uses a = -0.5 and
  antialiases when shrinking). The CLS token and register tokens are their own parameters and
  are kept;
- upcycle: a dense source's MLPs become the model's MoE layers (`vimoe.upcycled_params`,
  `upcycle_split` 'shared' = exact for every router, or 'copy'; routers fresh).

Anything else that differs is a one-line `CheckpointMismatch` naming the first parameter; a bad
`init_from` node is a one-line ValueError from `validate`, before the model is traced (a missing
source from `check_source`, when it is read). The
run starts at step 0 with a fresh optimizer state. A run with its own checkpoint resumes from it
and ignores `init_from`.
"""
from __future__ import annotations

import math
import os
import re
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from moe_jax.checkpoints import importers, layout, tree
from moe_jax.checkpoints.tree import CheckpointMismatch
from moe_jax.models import vimoe
from moe_jax.train.state import TrainState

KINDS = ("", *importers.KINDS, "run")
RESIZE_METHODS = ("bilinear", "bicubic", "none")


def default_config() -> ml_collections.ConfigDict:
  """The `config.init_from` node; `kind=""` starts from scratch."""
  return ml_collections.ConfigDict(dict(
      kind="",  # "" (scratch), "hf" (HF dir), "big_vision" (.npz), "timm" (timm/open_clip), "run"
      path="",
      reinit="",  # comma-separated regexes of our parameter paths left at init, e.g. "head/.*"
      resize_posemb="bilinear",  # posemb of another grid: "bilinear", "bicubic" or "none" (error)
      upcycle=False,  # dense source -> the model's MoE layers' experts
      upcycle_split="shared",  # 'shared' (exact, needs a shared expert) or 'copy' (vimoe.py)
      upcycle_noise_std=0.0))


def from_source(kind: str, path: str, *, reinit: str, resize_posemb: str,
                upcycle: bool) -> ml_collections.ConfigDict:
  """The `init_from` node of a config that starts from `path` (of `kind`); `upcycle` with the
  exact 'shared' split."""
  c = default_config()
  c.update(dict(kind=kind, path=path, reinit=reinit, resize_posemb=resize_posemb,
                upcycle=upcycle, upcycle_split="shared"))
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """One-line ValueError naming the `init_from` field and the fix; a warning where upcycling
  with `upcycle_split='copy'` cannot equal the dense model (`vimoe.upcycle_inexact_reason`).
  Called by the trainer before the model is traced."""
  c, model = config.init_from, config.model
  if c.kind not in KINDS:
    raise ValueError(f"init_from.kind={c.kind!r} must be one of {KINDS}")
  if not c.kind:
    return
  if not c.path:
    raise ValueError(f"init_from.path is empty: set it to the {c.kind!r} source "
                     "(or init_from.kind='' to start from scratch)")
  for pattern in filter(None, c.reinit.split(",")):
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"init_from.reinit: {pattern!r} is not a regex ({e})") from None
  if c.resize_posemb not in RESIZE_METHODS:
    raise ValueError(f"init_from.resize_posemb={c.resize_posemb!r} must be one of "
                     f"{RESIZE_METHODS}")
  if not c.upcycle:
    return
  if model.name != "vimoe":
    raise ValueError(f"init_from.upcycle=True needs a ViMoE model (model.name={model.name!r}; "
                     "model.name='vimoe') or init_from.upcycle=False")
  m = model.moe
  if c.upcycle_split not in vimoe.UPCYCLE_SPLITS:
    raise ValueError(f"init_from.upcycle_split={c.upcycle_split!r} must be one of "
                     f"{vimoe.UPCYCLE_SPLITS}")
  if c.upcycle_split == "shared" and not m.shared_expert.enabled:
    raise ValueError("init_from.upcycle_split='shared' needs model.moe.shared_expert.enabled="
                     "True (or set init_from.upcycle_split='copy')")
  if c.upcycle_noise_std < 0:
    raise ValueError(f"init_from.upcycle_noise_std={c.upcycle_noise_std} must be >= 0")
  gelu = "gelu" if model.gelu_approximate else "gelu_exact"
  if m.activation != gelu:
    raise ValueError(f"init_from.upcycle=True: model.moe.activation={m.activation!r} but the "
                     f"dense MLP uses {gelu!r} (model.gelu_approximate={model.gelu_approximate}): "
                     f"set model.moe.activation={gelu!r}")
  for field, width in (("hidden_dim", m.hidden_dim),
                       ("shared_expert.hidden_dim", m.shared_expert.enabled and
                        (m.shared_expert.hidden_dim or m.hidden_dim))):
    if width and width != model.mlp_dim:
      raise ValueError(f"init_from.upcycle=True: model.moe.{field}={width} must equal the dense "
                       f"MLP's model.mlp_dim={model.mlp_dim}")
  reason = vimoe.upcycle_inexact_reason(m, c.upcycle_split, c.upcycle_noise_std)
  if reason:
    warnings.warn(f"init_from.upcycle_split='copy': the upcycled model differs from the dense one "
                  f"at init: {reason} (init_from.upcycle_split='shared' is exact)", stacklevel=2)


def check_source(c: ml_collections.ConfigDict) -> None:
  """One-line ValueError when `c.path` is not there; checked only when the source is read (a
  run resuming from its own checkpoint does not need it any more)."""
  if not os.path.exists(c.path):
    raise ValueError(f"init_from.path={c.path!r} does not exist")
  if c.kind == "run" and not os.path.isdir(os.path.join(c.path, "checkpoints")):
    raise ValueError(f"init_from.path={c.path!r} has no checkpoints/ folder: point it at the "
                     "workdir of a run (with init_from.kind='run')")


def source_params(c: ml_collections.ConfigDict,
                  model: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Flat parameters of `c.path`; for a pretrained checkpoint, CheckpointMismatch if `model`
  computes another function than the checkpoint's architecture (`importers.check_architecture`)."""
  check_source(c)
  if c.kind in importers.KINDS:
    checkpoint_config, params, _ = importers.import_checkpoint(c.path, c.kind)
    importers.check_architecture(model, checkpoint_config, f"init_from {c.path}")
    return params
  if c.kind == "run":
    return run_params(c.path)
  raise CheckpointMismatch(f"init_from.kind={c.kind!r} must be one of {KINDS[1:]}")


def run_params(workdir: str) -> dict[str, np.ndarray]:
  """Flat parameters of the latest checkpoint of the run in `workdir`, on any device count: they
  are read onto this process's first device (not the saved mesh) and returned as numpy."""
  mgr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                              item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  step = mgr.latest_step()
  if step is None:
    raise CheckpointMismatch(f"init_from.path={workdir!r} has no checkpoint")
  saved = mgr.item_metadata(step)["state"]
  saved = getattr(saved, "tree", saved)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                                  sharding=device),
                                   saved["params"])}
  restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device),
                                             target),
      partial_restore=True)))
  # orbax stores each nnx.Param as {"value": array}.
  return {k.removesuffix("/value"): np.asarray(v)
          for k, v in tree.flatten(restored["state"]["params"]).items()}


def interpolation_matrix(size_in: int, size_out: int, method: str) -> np.ndarray:
  """`[size_out, size_in]` weights of torch's 1-D `interpolate(mode=method, align_corners=False,
  antialias=False)`: source coordinate (i + 0.5) * size_in / size_out - 0.5 (clamped at 0 for
  bilinear), taps clamped to the border; bicubic is Keys' kernel with a = -0.75."""
  x = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
  if method == "bilinear":
    x = np.maximum(x, 0.0)
    offsets = np.arange(2)
  else:
    offsets = np.arange(-1, 3)
  base = np.floor(x)
  t = np.abs(x[:, None] - (base[:, None] + offsets))  # distance of each tap
  if method == "bilinear":
    w = 1.0 - t
  else:
    a = -0.75
    w = np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                 ((a * t - 5 * a) * t + 8 * a) * t - 4 * a)
  taps = np.clip(base[:, None].astype(int) + offsets, 0, size_in - 1)
  out = np.zeros((size_out, size_in))
  np.add.at(out, (np.repeat(np.arange(size_out), len(offsets)), taps.ravel()), w.ravel())
  return out


def resize_posemb(posemb: np.ndarray, tokens: int, method: str = "bilinear") -> np.ndarray:
  """`[1, g*g, D] -> [1, tokens, D]`, interpolated over the square patch grid (`method`:
  'bicubic' or 'bilinear', as torch's `interpolate`)."""
  g, h = math.isqrt(posemb.shape[1]), math.isqrt(tokens)
  if g * g != posemb.shape[1] or h * h != tokens:
    raise CheckpointMismatch(f"posemb of {posemb.shape[1]} -> {tokens} tokens: only square "
                             "patch grids are resized")
  w = interpolation_matrix(g, h, method)
  grid = np.asarray(posemb, np.float64).reshape(g, g, -1)
  return np.einsum("ai,ijd,bj->abd", w, grid, w).reshape(1, h * h, -1).astype(posemb.dtype)


def initialise(fresh: dict[str, np.ndarray], source: dict[str, np.ndarray],
               c: ml_collections.ConfigDict, moe_layer_indices: list[int]) -> dict[str, np.ndarray]:
  """The model's flat parameters from its `fresh` ones and `source` (either layer layout:
  `layout.to_layout`) by `c`'s rules."""
  source = layout.to_layout(source, {k: v.shape for k, v in fresh.items()}, f"init_from {c.path}")
  reinit = [re.compile(r) for r in c.reinit.split(",") if r]
  fresh_init = lambda k: any(r.fullmatch(k) for r in reinit)
  if c.upcycle:
    source = vimoe.upcycled_params(source, {k: v.shape for k, v in fresh.items()},
                                   moe_layer_indices, split=c.upcycle_split,
                                   noise_std=c.upcycle_noise_std)
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
    elif (k == "posemb" and c.resize_posemb != "none"
          and source[k].shape[2] == value.shape[2]):
      out[k] = resize_posemb(np.asarray(source[k]), value.shape[1], c.resize_posemb)
    else:
      hint = ("init_from.resize_posemb='bicubic'" if k == "posemb"
              else "add it to init_from.reinit")
      raise CheckpointMismatch(f"init_from {c.path}: our parameter {k} has shape {value.shape}, "
                               f"the checkpoint's {source[k].shape} ({hint}?)")
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
