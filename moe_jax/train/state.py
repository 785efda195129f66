"""Train state: model parameters, the model's other state (RNG streams, counters), optimizer
state and step, created directly with its target shardings (never materialised unsharded)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct

from moe_jax.models import build_model
from moe_jax.parallel import mesh as mesh_lib, sharding


@struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State  # nnx.Param variables
  rest: nnx.State  # everything else: RNG keys/counters, router step counters, fixed buffers
  opt_state: optax.OptState
  ema: nnx.State | None = None  # moving average of `params` (optimizer.ema_decay > 0), else None


@struct.dataclass
class ModelDefs:
  """The model's structure in train and in eval mode (static; not checkpointed)."""
  train: nnx.GraphDef = struct.field(pytree_node=False)
  eval: nnx.GraphDef = struct.field(pytree_node=False)


def model_rngs(seed: int) -> nnx.Rngs:
  return nnx.Rngs(params=seed, dropout=seed + 1, router=seed + 2, default=seed + 3)


def _init(config: ml_collections.ConfigDict, tx: optax.GradientTransformation):
  model = build_model(config.model, rngs=model_rngs(config.seed))
  model.train()
  train_def, params, rest = nnx.split(model, nnx.Param, ...)
  model.eval()
  eval_def = nnx.split(model, nnx.Param, ...)[0]
  ema = jax.tree.map(jnp.copy, params) if config.optimizer.ema_decay else None
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                     opt_state=tx.init(params), ema=ema)
  return state, ModelDefs(train=train_def, eval=eval_def)


def state_shardings(abstract: TrainState, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, param_rules=mesh_lib.PARAM_RULES) -> TrainState:
  params = sharding.tree_shardings(abstract.params, mesh, param_rules)
  return TrainState(
      step=sharding.replicated(mesh), params=params,
      rest=jax.tree.map(lambda _: sharding.replicated(mesh), abstract.rest),
      opt_state=sharding.optimizer_shardings(tx, abstract.opt_state, params, mesh),
      ema=None if abstract.ema is None else params)


class StateInit:
  """The train state of `config` from one trace of the model's init (the model is built once):
  `abstract` (shapes + target shardings, for restoring and lowering), `shardings`, `defs`, and
  `create()` for a fresh state, computed directly in its shardings (never unsharded)."""

  def __init__(self, config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
               mesh: jax.sharding.Mesh):
    captured = {}

    def init() -> TrainState:
      state, defs = _init(config, tx)
      shardings = state_shardings(state, tx, mesh, config.mesh.param_rules)
      captured.update(defs=defs, shardings=shardings)
      return jax.lax.with_sharding_constraint(state, shardings)

    self.mesh = mesh
    with jax.set_mesh(mesh):
      self._traced = jax.jit(init).trace()
    self.defs: ModelDefs = captured["defs"]
    self.shardings: TrainState = captured["shardings"]
    self.abstract: TrainState = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), self._traced.out_info,
        self.shardings)

  def create(self) -> TrainState:
    """A freshly initialised state, sharded by `shardings`."""
    with jax.set_mesh(self.mesh):
      return jax.device_put(self._traced.lower().compile()(), self.shardings)


def abstract_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                   mesh: jax.sharding.Mesh) -> tuple[TrainState, TrainState, ModelDefs]:
  """(abstract state carrying target shardings, its shardings, model defs) without allocating."""
  init = StateInit(config, tx, mesh)
  return init.abstract, init.shardings, init.defs


def create_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                 mesh: jax.sharding.Mesh) -> tuple[TrainState, TrainState, ModelDefs]:
  """A freshly initialised, sharded train state (+ its shardings and the model defs)."""
  init = StateInit(config, tx, mesh)
  return init.create(), init.shardings, init.defs
