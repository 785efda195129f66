"""Trainer: end to end, exact resume after a kill, restore onto another mesh, one-line errors."""
from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moe_jax.commands import common
from moe_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


QUICK = "configs/vimoe_tiny_mnist.py:quick"
# The tiny model and run of every trainer test, as overrides of QUICK's fields (`cli_args` passes
# them to `train.py` / `eval.py` as --config.* flags: a subprocess runs the same programs).
TINY = {"model.depth": 2, "model.width": 32, "model.mlp_dim": 64, "model.num_heads": 2,
        "model.moe.hidden_dim": 64, "model.moe_layers": "last:1", "model.moe.num_experts": 8,
        "batch_size": 64, "evals.test.batch_size": 64, "evals.test.split": "test[:200]",
        "optimizer.warmup_steps": 2}


def tiny_config(tfds_dir: str, **overrides):
  c = common.load_config(QUICK)
  c.data.data_dir = tfds_dir
  c.update_from_flattened_dict({**TINY, **overrides})
  return c


def without_evals(c):
  """`c` with no eval entries: no eval step compiled (for tests that only compare training)."""
  with c.unlocked():
    c.evals = ml_collections.ConfigDict()
  return c


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def four_step_config(tfds_dir, digits: bool = True):
  """4 steps, checkpoints at 2 and 4, every step logged; two evaluations (`test`: mnist
  test[:200] at the last step; `digits`: the sklearn digits' 359 test images, every 2 steps),
  or `test` only."""
  from moe_jax.train import evaluators
  c = tiny_config(tfds_dir, total_steps=4, checkpoint_every_steps=2, log_every_steps=1)
  if digits:
    with c.unlocked():
      c.evals.digits = evaluators.task_eval("classification", dataset="sklearn_digits",
                                            split="test", pp="resize|normalize", batch_size=64,
                                            every_steps=2)
  return c


@pytest.fixture(scope="module")
def four_step_result(tmp_path_factory, tfds_dir):
  """(workdir, last metrics) of one finished `four_step_config` run on the default mesh (all 8
  devices on `data`): the straight run the resume, mesh, nan and checkpoint tests start from or
  compare with; tests change only copies of the workdir."""
  workdir = tmp_path_factory.mktemp("four_steps")
  return workdir, loop.train_and_evaluate(four_step_config(tfds_dir), str(workdir))


@pytest.fixture(scope="module")
def four_step_run(four_step_result):
  return four_step_result[0]


def copy_of(run, tmp_path):
  return shutil.copytree(run, tmp_path / "run")


def test_end_to_end_writes_metrics_checkpoint_and_eval(tmp_path, four_step_result, tfds_dir):
  """Two evaluations on two datasets (`test` and `digits`), each under its own keys and in its
  own eval_<name>.json."""
  workdir, last = copy_of(four_step_result[0], tmp_path), four_step_result[1]
  c = four_step_config(tfds_dir)
  assert np.isfinite(last["train/loss"]) and 0 <= last["test/accuracy"] <= 1
  assert last["test/num_examples"] == 200 and last["digits/num_examples"] == 359
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  keys = set().union(*records)
  for k in ("train/loss", "train/learning_rate", "train/steps_per_sec", "test/accuracy",
            "digits/accuracy", "train/aux_loss", "train/examples_per_sec"):
    assert k in keys, k
  assert [r["step"] for r in records if "digits/loss" in r] == [2, 4]
  assert [r["step"] for r in records if "test/loss" in r] == [4]
  assert any(k.startswith("train/moe/") for k in keys)
  assert os.path.isdir(workdir / "checkpoints" / "4")
  assert os.listdir(workdir / "tensorboard")
  results = loop.evaluate_checkpoint(c, str(workdir))
  assert sorted(results) == ["digits", "test"] and not os.path.exists(workdir / "eval.json")
  for name in results:
    saved = json.load(open(workdir / f"eval_{name}.json"))
    assert {k.split("/")[0] for k in saved} == {"step", name, "routing"}
    assert saved[f"{name}/accuracy"] == pytest.approx(last[f"{name}/accuracy"], abs=1e-9)
  saved = json.load(open(workdir / "eval_test.json"))
  assert saved["step"] == 4 and saved["test/num_examples"] == 200
  assert abs(saved["test/accuracy"] - results["test"]["test/accuracy"]) < 1e-9
  layer = saved["routing"]["layers"]["blocks/1/mlp"]
  assert "dropped_fraction" in layer and "normalized_mi" in layer
  matrix = np.asarray(layer["class_expert"])
  assert matrix.shape == (10, 8) and np.isclose(matrix.sum(), 200)  # each real example once
  for name in results:  # each eval's plots in its own folder
    assert os.path.exists(workdir / "analysis" / name / "heatmaps.png")


CLI_ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def run_cli(args, timeout=300, script="train.py"):
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], env=CLI_ENV,
                        capture_output=True, text=True, timeout=timeout)


def cli_args(workdir, tfds_dir, steps, ckpt_every):
  """`train.py` / `eval.py` flags of `tiny_config(tfds_dir, total_steps=steps,
  checkpoint_every_steps=ckpt_every, log_every_steps=1)` (= `four_step_config(tfds_dir,
  digits=False)` for 4 steps every 2)."""
  fields = {**TINY, "data.data_dir": tfds_dir, "total_steps": steps,
            "checkpoint_every_steps": ckpt_every, "log_every_steps": 1}
  return [f"--config={ROOT}/{QUICK}", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in fields.items())]


def cli_config(workdir, tfds_dir, steps, ckpt_every):
  """The config `train.py` builds from `cli_args(...)`, for runs in this process."""
  args = cli_args(workdir, tfds_dir, steps, ckpt_every)
  overrides = [a.removeprefix("--config.") for a in args if a.startswith("--config.")]
  return common.load_config(args[0].removeprefix("--config="), overrides)


def test_resume_after_kill_gives_identical_losses(tmp_path, tfds_dir, four_step_run):
  """A `train.py` process of the 4-step run's config, checkpointing every step, killed after its
  step-1 checkpoint (three saves, each waiting for the one before, before step 4's is there),
  resumed in this process: steps 2-4 have the losses of the straight run (the fixture, in this
  process: the same compiled programs; checkpoints and evaluations do not change training)."""
  resumed = tmp_path / "resumed"
  want_config = four_step_config(tfds_dir, digits=False)
  want_config.checkpoint_every_steps = 1
  assert cli_config(resumed, tfds_dir, 4, 1).to_dict() == want_config.to_dict()
  # Kill it hard once its step-1 checkpoint is on disk, then resume it here.
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"),
                           *cli_args(resumed, tfds_dir, 4, 1)], env=CLI_ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not os.path.isdir(resumed / "checkpoints" / "1") and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.isdir(resumed / "checkpoints" / "1")
  assert not os.path.isdir(resumed / "checkpoints" / "4"), "killed too late to test a resume"
  loop.train_and_evaluate(cli_config(resumed, tfds_dir, 4, 1), str(resumed))
  want, got = losses(four_step_run), losses(resumed)
  assert sorted(want) == [1, 2, 3, 4]
  for step in (2, 3, 4):
    assert got[step] == want[step], (step, got[step], want[step])


def test_restore_onto_a_different_mesh_gives_identical_eval(tmp_path, tfds_dir, four_step_run):
  """The 4-step run, trained with all 8 devices on `data`, evaluated on 8x1 and on 2x4."""
  workdir = str(copy_of(four_step_run, tmp_path))
  c = four_step_config(tfds_dir)
  mesh = loop.build_mesh(c)
  assert (mesh.shape["data"], mesh.shape["expert"]) == (8, 1)
  on_8x1 = loop.evaluate_checkpoint(c, workdir, only="test")["test"]
  c.mesh.data, c.mesh.expert = 2, 4
  on_2x4 = loop.evaluate_checkpoint(c, workdir, only="test")["test"]
  for k in ("test/loss", "test/accuracy", "test/top5_accuracy"):
    np.testing.assert_allclose(on_2x4[k], on_8x1[k], rtol=1e-5, err_msg=k)
  # Routing statistics are reduced over all devices: the same report on either mesh.
  want, got = on_8x1["routing"]["layers"], on_2x4["routing"]["layers"]
  for key in ("class_expert", "load", "dropped_fraction", "router_entropy", "normalized_mi"):
    np.testing.assert_allclose(got["blocks/1/mlp"][key], want["blocks/1/mlp"][key], rtol=1e-4,
                               atol=1e-6, err_msg=key)


# An unknown --config.* key: test_config_errors_are_one_clean_line[--config.nope=1]; nan/inf:
# test_nan_after_the_update_is_never_saved_and_a_resume_may_change_clipping (train.py's line).
@pytest.mark.parametrize("args,message", [
    (["--config.data.name=cifar10"], "cifar10.*tfds build"),
    (["--config.batch_size=12"], "batch_size=12 must be divisible by the 8"),
])
def test_bad_input_is_a_one_line_error_naming_the_fix(tmp_path, tfds_dir, args, message):
  base = cli_args(tmp_path, tfds_dir, 20, 1)
  proc = run_cli(base + args)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error:"), proc.stderr[-2000:]
  assert re.search(message, last), last


def test_eval_without_checkpoint_and_with_a_corrupt_one(tmp_path, tfds_dir, four_step_run):
  evaluate = lambda workdir: run_cli(cli_args(workdir, tfds_dir, 4, 2), script="eval.py")
  proc = evaluate(tmp_path)
  assert proc.returncode != 0 and "no checkpoint" in proc.stderr.strip().splitlines()[-1]
  workdir = copy_of(four_step_run, tmp_path)
  for root, _, files in os.walk(workdir / "checkpoints" / "4" / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  proc = evaluate(workdir)  # step 4 is garbage: one warning, and step 2 is evaluated
  assert proc.returncode == 0 and json.loads(proc.stdout)["test"]["step"] == 2, proc.stderr[-2000:]
  assert re.search(r"step 4 is corrupt .*fell back to step 2", proc.stderr), proc.stderr[-2000:]


def test_same_losses_on_data_parallel_and_fsdp_expert_parallel_meshes(tmp_path, tfds_dir,
                                                                      four_step_run):
  """The 4-step run (all 8 devices on `data`) again on a data=2 x fsdp=2 x expert=2 mesh."""
  c = without_evals(four_step_config(tfds_dir))
  c.checkpoint_every_steps = 0  # the last step only
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 2, 2, 2
  loop.train_and_evaluate(c, str(tmp_path))
  want, got = losses(four_step_run), losses(tmp_path)
  assert sorted(got) == sorted(want) == [1, 2, 3, 4]
  for step, loss in want.items():
    np.testing.assert_allclose(got[step], loss, rtol=1e-5, err_msg=str(step))


def test_fsdp_shards_dense_weights_and_expert_axis_shards_experts(tfds_dir):
  from moe_jax.train import optim, state as state_lib
  c = tiny_config(tfds_dir)
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 2, 2, 2
  mesh = loop.build_mesh(c)
  tx = optim.make_optimizer(c.optimizer, c.total_steps)
  abstract, _, _ = state_lib.abstract_state(c, tx, mesh)
  flat = {"/".join(str(getattr(p, "key", p)) for p in path): x.sharding.spec
          for path, x in jax.tree_util.tree_leaves_with_path(abstract.params)}
  assert any("experts" in k and spec == jax.sharding.PartitionSpec("expert")
             for k, spec in flat.items())
  assert any("fsdp" in str(spec) for k, spec in flat.items() if "experts" not in k)
  mu = jax.tree_util.tree_leaves_with_path(abstract.opt_state)
  assert any("expert" in str(x.sharding.spec) for _, x in mu), "Adam moments not sharded"


def test_nan_after_the_update_is_never_saved_and_a_resume_may_change_clipping(tmp_path, tfds_dir,
                                                                             four_step_run):
  """`train.py` resumes the 4-step run (clipping at 1.0) with clipping off and a rate that is inf
  in float32: the loss of step 5 (from the weights before its update) is still finite, its
  update is not. One line names the step and the last good checkpoint; nothing is saved after
  it. Then the advice followed here (clipping on, another rate): the optimizer state is the same
  tree."""
  from moe_jax.train import checkpoint
  workdir = copy_of(four_step_run, tmp_path)
  nan_flags = ["--config.optimizer.learning_rate=1e39", "--config.optimizer.grad_clip_norm=0"]
  proc = run_cli(cli_args(workdir, tfds_dir, 5, 1) + nan_flags)
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode != 0 and re.search(
      r"^error: .*nan/inf at step 5;.*last good checkpoint: step 4", last), proc.stderr[-2000:]
  trainer = loop.Trainer(tiny_config(tfds_dir), str(workdir))
  assert trainer.ckpt.all_steps() == [2, 4]
  for step in trainer.ckpt.all_steps():
    state = checkpoint._restore_step(trainer.ckpt, trainer.abstract, step)[0]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params)), step
  advice = without_evals(tiny_config(tfds_dir, total_steps=5, **{
      "optimizer.learning_rate": 1e-3, "optimizer.grad_clip_norm": 1.0}))
  assert np.isfinite(loop.train_and_evaluate(advice, str(workdir))["train/loss"])
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "5"]


def test_clipping_at_inf_is_bitwise_no_clipping():
  import optax
  grads = {"w": jax.random.normal(jax.random.key(0), (7, 5)) * 1e3, "b": jnp.arange(5.0)}
  params = jax.tree.map(jnp.ones_like, grads)
  plain = optax.adamw(1e-2)
  clipped = optax.chain(optax.clip_by_global_norm(float("inf")), plain)
  want = plain.update(grads, plain.init(params), params)[0]
  got = clipped.update(grads, clipped.init(params), params)[0]
  for k in grads:
    assert np.array_equal(np.asarray(got[k]), np.asarray(want[k])), k


def _overwrite_array_bytes(step_dir, n=64):
  """Overwrites `n` bytes in the middle of each array data file of a checkpoint's state."""
  data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  for name in os.listdir(data):
    path = os.path.join(data, name)
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 2)
      f.write(b"\xff" * n)


def test_a_corrupt_array_falls_back_to_the_previous_step(tmp_path, tfds_dir, four_step_run):
  workdir = copy_of(four_step_run, tmp_path)
  _overwrite_array_bytes(workdir / "checkpoints" / "4")
  state, _ = loop.Trainer(four_step_config(tfds_dir), str(workdir)).restore_or_init()
  assert int(state.step) == 2 and os.path.isdir(workdir / "checkpoints" / "4.corrupt")


def test_a_changed_checksum_is_detected(tmp_path, tfds_dir, four_step_run):
  workdir = copy_of(four_step_run, tmp_path)
  sums_dir = workdir / "checkpoints" / "4" / "checksums"
  path = os.path.join(sums_dir, os.listdir(sums_dir)[0])
  sums = json.load(open(path))
  key = next(k for k in sums if k.startswith("params/"))
  sums[key] ^= 1
  json.dump(sums, open(path, "w"))
  state, _ = loop.Trainer(four_step_config(tfds_dir), str(workdir)).restore_or_init()
  assert int(state.step) == 2


def test_a_checkpoint_of_another_config_names_the_array_and_eval_ignores_the_optimizer(
    tmp_path, tfds_dir, four_step_run):
  from moe_jax.train import checkpoint
  workdir = copy_of(four_step_run, tmp_path)
  wide = tiny_config(tfds_dir, total_steps=8, **{"model.moe.hidden_dim": 128})
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"different config: params/\S+ has shape .*another --workdir"):
    loop.train_and_evaluate(wide, str(workdir))
  sgd = tiny_config(tfds_dir, total_steps=8, **{"optimizer.name": "sgd"})
  with pytest.raises(checkpoint.CheckpointError, match=r"different config: .*opt_state/"):
    loop.train_and_evaluate(sgd, str(workdir))
  sgd.optimizer.grad_clip_norm, sgd.optimizer.learning_rate = 0.0, 5.0
  assert loop.evaluate_checkpoint(sgd, str(workdir))["test"]["step"] == 4  # params only
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # nothing deleted or moved


def test_bad_eval_split_and_unwritable_workdir_fail_before_step_1(tmp_path, tfds_dir):
  c = tiny_config(tfds_dir, total_steps=4, **{"evals.test.split": "nope"})
  with pytest.raises(Exception, match="nope"):
    loop.train_and_evaluate(c, str(tmp_path / "a"))
  assert not os.path.exists(tmp_path / "a" / "metrics.jsonl")
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="not writable"):
    loop.train_and_evaluate(tiny_config(tfds_dir), str(tmp_path / "file" / "wd"))


def test_metrics_rows_after_the_restored_step_are_dropped(tmp_path, tfds_dir, four_step_run):
  workdir = copy_of(four_step_run, tmp_path)
  shutil.rmtree(workdir / "checkpoints" / "4")  # as if killed after logging steps 3 and 4
  loop.train_and_evaluate(four_step_config(tfds_dir), str(workdir))
  steps = [r["step"] for r in map(json.loads, open(workdir / "metrics.jsonl"))
           if "train/loss" in r]
  assert steps == [1, 2, 3, 4]
  # TensorBoard: the resumed run's events start with a SessionLog.START at the restored step.
  starts = [e.step for e in tensorboard_events(workdir / "tensorboard")
            if e.HasField("session_log") and e.session_log.status == e.session_log.START]
  assert starts == [2]


def test_a_save_cut_off_by_a_kill_is_ignored_on_resume(tmp_path, tfds_dir, four_step_run):
  """What a kill during a save leaves (orbax's unfinished `<step>.orbax-checkpoint-tmp-*`
  folder) is never restored: the rerun resumes from the last finished step, same losses."""
  cut = copy_of(four_step_run, tmp_path)
  # Step 4's save as a kill during it leaves it: orbax's temporary name, never committed.
  os.rename(cut / "checkpoints" / "4", cut / "checkpoints" / "4.orbax-checkpoint-tmp-1")
  loop.train_and_evaluate(four_step_config(tfds_dir), str(cut))
  assert os.path.isdir(cut / "checkpoints" / "4")
  want, got = losses(four_step_run), losses(cut)
  assert sorted(got) == list(range(1, 5)) and got == want


def tensorboard_events(folder):
  """Every event in the TFRecord event files of `folder` (length, crc, payload, crc records)."""
  import struct
  from tensorboardX.proto import event_pb2
  for path in sorted(folder.iterdir()):
    data = path.read_bytes()
    while data:
      (n,) = struct.unpack("<Q", data[:8])
      yield event_pb2.Event.FromString(data[12:12 + n])
      data = data[16 + n:]


@pytest.mark.parametrize("args,message", [
    (["--config", "configs/nope.py"], r"^error: --config 'configs/nope.py': no such file; pass"),
    (["--config", "configs/vimoe_tiny_mnist.py:nope"], r"variant 'nope' is unknown; use one of"),
    (["--config.nope=1"], r"^error: the config has no field 'nope' \(check the --config"),
])
def test_config_errors_are_one_clean_line(args, message):
  proc = run_cli(args, timeout=120)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
  assert re.search(message, lines[0]) and "\\'" not in lines[0] and "\\n" not in lines[0], lines


# --- Loop features: schedules, lr multipliers, gradient accumulation, EMA, profiler ------------

def _schedule_config(kind, **kw):
  from moe_jax.train import optim
  c = optim.default_config()
  c.update(dict(schedule=kind, learning_rate=1.0, warmup_steps=10, end_learning_rate=0.1,
                rsqrt_timescale=25, cooldown_steps=20), **kw)
  return c


@pytest.mark.parametrize("kind,want", [
    # steps 0, 5 (warmup), 10 (peak), 60 (half-way through the decay), 100 (cooldown half done)
    ("cosine", [0.0, 0.5, 1.0, 0.55, 0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(0.9 * math.pi)))]),
    ("linear", [0.0, 0.5, 1.0, 0.55, 0.5 * (0.1 + 0.9 * 0.1)]),
    ("rsqrt", [0.0, 0.5, 1.0, 1 / math.sqrt(3.0), 0.5 / math.sqrt(1 + 90 / 25)]),
    ("constant", [0.0, 0.5, 1.0, 1.0, 0.5]),
])
def test_schedules_match_the_big_vision_formulas(kind, want):
  from moe_jax.train import optim
  lr = optim.schedule(_schedule_config(kind), total_steps=110)
  got = [float(lr(s)) for s in (0, 5, 10, 60, 100)]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert float(lr(110)) == 0.0  # the cooldown ends at 0


@pytest.mark.parametrize("field,value,message", [
    ("schedule", "step", r"optimizer.schedule='step' must be one of"),
    ("cooldown_steps", 200, r"optimizer.cooldown_steps=200 must be <= total_steps=110"),
    ("warmup_steps", -1, r"optimizer.warmup_steps=-1 must be >= 0"),
    ("rsqrt_timescale", 0, r"optimizer.rsqrt_timescale=0 must be > 0"),
    ("lr_multipliers", (("a", -1.0),), r"lr_multipliers entry \('a', -1.0\) must be a pair"),
    ("lr_multipliers", (("(", 0.1),), r"lr_multipliers regex '\(' is not a regex"),
    ("ema_decay", 1.0, r"optimizer.ema_decay=1.0 must be in \[0, 1\)"),
    ("grad_accum_steps", 0, r"optimizer.grad_accum_steps=0 must be an integer >= 1"),
])
def test_bad_optimizer_fields_are_one_line_errors(field, value, message):
  from moe_jax.train import optim
  c = _schedule_config("cosine")
  c[field] = value
  with pytest.raises(ValueError, match=message) as e:
    optim.make_optimizer(c, 110)
  assert "\n" not in str(e.value)


def test_lr_multipliers_scale_each_group_and_zero_freezes_it():
  import optax
  from moe_jax.train import optim
  params = {"trunk": {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}, "head": {"w": jnp.ones((4, 2))},
            "frozen": {"w": jnp.ones((2, 2))}}

  def deltas(multipliers):
    c = optim.default_config()
    c.update(name="sgd", momentum=0.9, weight_decay=0.0, warmup_steps=0, schedule="constant",
             learning_rate=0.5, lr_multipliers=multipliers)
    tx, p = optim.make_optimizer(c, 10), params
    state = tx.init(p)
    for i in range(3):  # momentum is linear: the scaling carries through every step
      grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(i), x.shape), p)
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    return jax.tree.map(lambda a, b: np.asarray(a - b), p, params)

  base = deltas(())
  # First match wins: trunk/w gets 0.1 (not the later 0.5 of "trunk"), trunk/b gets 0.5.
  got = deltas((("^trunk/w", 0.1), ("trunk", 0.5), ("^frozen/", 0.0)))
  np.testing.assert_allclose(got["trunk"]["w"], 0.1 * base["trunk"]["w"], rtol=1e-5)
  np.testing.assert_allclose(got["trunk"]["b"], 0.5 * base["trunk"]["b"], rtol=1e-5)
  np.testing.assert_array_equal(got["head"]["w"], base["head"]["w"])
  assert np.abs(base["frozen"]["w"]).min() > 0 and not np.any(got["frozen"]["w"])


def _random_batch(abstract_batch, num_classes, seed=0):
  rng = np.random.default_rng(seed)
  return {k: jax.device_put(rng.integers(0, num_classes, s.shape).astype(s.dtype) if k == "label"
                            else rng.standard_normal(s.shape).astype(s.dtype), s.sharding)
          for k, s in abstract_batch.items()}


def _one_step(c, batch=None):
  """(state before as numpy, state after as numpy, metrics) of one train step of `c`."""
  from moe_jax import tasks
  from moe_jax.parallel import sharding
  from moe_jax.train import optim, state as state_lib, step as step_lib
  task, mesh = tasks.build_task(c), loop.build_mesh(c)
  tx = optim.make_optimizer(c.optimizer, c.total_steps)
  init = state_lib.StateInit(c, tx, mesh)
  state = init.create()
  before = jax.device_get(state)
  if batch is None:
    batch = _random_batch(task.abstract_batch(c.batch_size, sharding.batch_sharding(mesh), False),
                          c.model.num_classes)
  with jax.set_mesh(mesh):
    step = step_lib.make_train_step(init.defs, tx, optim.schedule(c.optimizer, c.total_steps),
                                    mesh, init.shardings, task.loss,
                                    **step_lib.options(c.optimizer))
    state, metrics = step(state, batch)
  return before, jax.device_get(state), jax.device_get(metrics), batch


@functools.cache
def big_and_accumulated_steps(tfds_dir, model):
  """`_one_step` of `model` ("dense": the ViT twin; "moe_nothing_dropped": no router noise, each
  example its own routing group, capacity for every token) with plain SGD and an EMA (decay
  0.75): on the 64-example batch, then on the same batch as 4 accumulated micro-batches of 16
  (2 per device). Computed once per process: the accumulation and EMA tests share it."""
  c = tiny_config(tfds_dir, total_steps=10, **{"optimizer.warmup_steps": 0,
                                                "optimizer.name": "sgd",
                                                "optimizer.momentum": 0.0,
                                                "optimizer.ema_decay": 0.75})
  if model == "dense":
    c.model.name = "vit"
  else:
    c.model.moe.router.noise_std = 0.0
    c.model.moe.capacity_factor = float(c.model.moe.num_experts)
  big = _one_step(c)
  c.optimizer.grad_accum_steps = 4
  return big, _one_step(c, big[3])


@pytest.mark.parametrize("model", ["dense", "moe_nothing_dropped"])
def test_gradient_accumulation_equals_the_big_batch(tfds_dir, model):
  (_, big, big_metrics, _), (before, acc, acc_metrics, _) = big_and_accumulated_steps(tfds_dir,
                                                                                       model)
  assert acc_metrics["train/loss"] == pytest.approx(big_metrics["train/loss"], rel=1e-5)
  assert acc_metrics["train/grad_norm"] == pytest.approx(big_metrics["train/grad_norm"], rel=1e-4)
  assert acc_metrics["train/accuracy"] == pytest.approx(big_metrics["train/accuracy"], abs=1e-6)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), big.params, before.params)
  assert max(jax.tree.leaves(moved)) > 1e-4
  for name, a, b in zip(*zip(*jax.tree_util.tree_leaves_with_path(acc.params)),
                        jax.tree.leaves(big.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(name))
  if model != "dense":
    dropped = [v for k, v in acc_metrics.items() if k.endswith("dropped_fraction")]
    assert dropped and max(dropped) == 0.0
    assert acc_metrics["train/aux_loss"] == pytest.approx(big_metrics["train/aux_loss"], rel=1e-5)


@pytest.mark.parametrize("accumulated", [False, True])
def test_ema_follows_its_formula(tfds_dir, accumulated):
  before, after, _, _ = big_and_accumulated_steps(tfds_dir, "moe_nothing_dropped")[accumulated]
  leaves = lambda s: jax.tree.leaves(s)
  for e0, e1, p1 in zip(leaves(before.ema), leaves(after.ema), leaves(after.params)):
    np.testing.assert_allclose(e1, 0.75 * e0 + 0.25 * p1, rtol=1e-6, atol=1e-7)
  for e0, p0 in zip(leaves(before.ema), leaves(before.params)):
    np.testing.assert_array_equal(e0, p0)  # the average starts at the initial parameters


def test_ema_accumulation_and_profile_end_to_end(tmp_path, tfds_dir):
  """EMA evaluated and checkpointed, accumulated steps and a profiler trace, in one short run."""
  c = tiny_config(tfds_dir, total_steps=4, checkpoint_every_steps=0,  # saved at step 4 only
                  log_every_steps=1, profile_steps="2,3",
                  **{"evals.test.every_steps": 0, "optimizer.ema_decay": 0.5,
                     "optimizer.grad_accum_steps": 2,
                     "optimizer.schedule": "rsqrt", "optimizer.cooldown_steps": 2,
                     "optimizer.lr_multipliers": (("^blocks/0/", 0.1),)})
  last = loop.train_and_evaluate(c, str(tmp_path))
  assert 0 <= last["test_ema/accuracy"] <= 1 and last["test_ema/num_examples"] == 200
  traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces), traces
  saved = loop.evaluate_checkpoint(c, str(tmp_path))["test"]  # restores the EMA
  assert saved["test_ema/loss"] == pytest.approx(last["test_ema/loss"], rel=1e-6)
  assert saved["test/loss"] == pytest.approx(last["test/loss"], rel=1e-6)
  assert saved["test_ema/loss"] != saved["test/loss"]


@pytest.mark.parametrize("overrides,message", [
    ({"profile_steps": "3,5"}, r"profile_steps='3,5' must be consecutive steps in \[1, total"),
    ({"profile_steps": "0"}, r"profile_steps='0' must be consecutive"),
    ({"optimizer.grad_accum_steps": 3}, r"batch_size=64 must be a multiple of "
                                        r"optimizer.grad_accum_steps=3"),
    ({"optimizer.grad_accum_steps": 16},
     r"batch_size/optimizer.grad_accum_steps \(64/16\)=4 must be a positive multiple of the 8"),
])
def test_bad_loop_fields_fail_before_compiling(tmp_path, tfds_dir, overrides, message):
  c = tiny_config(tfds_dir, total_steps=4, profile_steps="")
  c.update_from_flattened_dict(overrides)
  with pytest.raises(ValueError, match=message):
    loop.Trainer(c, str(tmp_path))


def test_checkpoints_from_before_the_ema_field_restore_and_an_ema_one_needs_ema(tmp_path):
  import ml_collections
  import orbax.checkpoint as ocp
  from flax import struct
  from moe_jax.train import checkpoint
  from moe_jax.train.state import TrainState

  @struct.dataclass
  class Before:  # TrainState as saved before it had `ema`
    step: jax.Array
    params: dict
    rest: dict
    opt_state: tuple

  old = Before(step=jnp.ones((), jnp.int32), params={"w": jnp.ones(3)}, rest={"k": jnp.zeros(2)},
               opt_state=(jnp.full(3, 2.0),))
  mgr = checkpoint.manager(str(tmp_path))
  mgr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(old),
                                      checksums=ocp.args.JsonSave(checkpoint.checksums(old)),
                                      data=ocp.args.JsonSave({})))
  mgr.wait_until_finished()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract_of = lambda s: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), s)
  state = TrainState(step=old.step, params=old.params, rest=old.rest, opt_state=old.opt_state)
  restored, _ = checkpoint.restore(checkpoint.manager(str(tmp_path)), abstract_of(state))
  assert restored.ema is None and int(restored.step) == 1
  np.testing.assert_array_equal(restored.opt_state[0], old.opt_state[0])
  with_ema = restored.replace(step=restored.step + 1, ema={"w": jnp.full(3, 7.0)})
  mgr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mgr, with_ema, {}, ml_collections.ConfigDict())
  mgr.wait_until_finished()
  back, _ = checkpoint.restore(checkpoint.manager(str(tmp_path)), abstract_of(with_ema))
  np.testing.assert_array_equal(back.ema["w"], 7.0)
  with pytest.raises(checkpoint.CheckpointError, match=r"only in the checkpoint \(e.g. ema/w\)"):
    checkpoint.restore(checkpoint.manager(str(tmp_path)), abstract_of(state))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]  # nothing moved aside
