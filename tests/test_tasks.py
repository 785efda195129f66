"""Tasks: the trainer builds the model once and the eval step once; start-up checks; AOT of any
task (the VQA step included)."""
from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import aot, tasks
from moe_jax.tasks import classification
from moe_jax.train import loop, state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import mocha_tiny_digits_vqa  # noqa: E402
import vimoe_tiny_mnist  # noqa: E402


def tiny_classification(tfds_dir: str, **overrides):
  c = vimoe_tiny_mnist.get_config("quick")
  c.update_from_flattened_dict({
      "data.data_dir": tfds_dir, "evals.test.split": "test[:64]", "model.depth": 2,
      "model.width": 32, "model.mlp_dim": 64, "model.num_heads": 2, "model.moe.hidden_dim": 64,
      "model.moe_layers": "last:1", "batch_size": 32, "evals.test.batch_size": 32,
      "optimizer.warmup_steps": 1, **overrides})
  return c


def test_model_built_once_and_eval_step_compiled_once(tmp_path, monkeypatch):
  builds, eval_traces, eval_sources = [], [], []
  build_model = state_lib.build_model
  monkeypatch.setattr(state_lib, "build_model",
                      lambda *a, **k: builds.append(1) or build_model(*a, **k))
  eval_sums = classification.ClassificationTask.eval_sums
  monkeypatch.setattr(classification.ClassificationTask, "eval_sums",
                      lambda self, *a: eval_traces.append(1) or eval_sums(self, *a))
  eval_batches = classification.ClassificationTask.eval_batches
  monkeypatch.setattr(classification.ClassificationTask, "eval_batches",
                      lambda self, *a, **k: eval_sources.append(1) or eval_batches(self, *a, **k))
  c = tiny_classification(str(tmp_path / "tfds"), total_steps=6, checkpoint_every_steps=0,
                          **{"evals.test.every_steps": 2})
  last = loop.train_and_evaluate(c, str(tmp_path / "run"))
  assert last["test/num_examples"] == 64
  # Three evaluations (steps 2, 4, 6) from one traced eval step over one eval source, and one
  # model build for the state's structure, its shardings and the fresh state.
  assert (len(builds), len(eval_traces), len(eval_sources)) == (1, 1, 1)


def test_eval_batch_size_checked_before_the_first_step(tmp_path):
  c = tiny_classification(str(tmp_path / "tfds"), **{"evals.test.batch_size": 204})
  with pytest.raises(ValueError,
                     match=r"evals.test.batch_size=204 must be a positive multiple of the 8"):
    loop.Trainer(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_model_built_for_other_images_than_the_data_is_an_error():
  c = vimoe_tiny_mnist.get_config("quick").copy_and_resolve_references()
  c.model.image_size = 32
  with pytest.raises(ValueError, match="model.image_size=32 but data.image_size=28"):
    tasks.build_task(c).check()


def test_unknown_task_names_the_field():
  c = vimoe_tiny_mnist.get_config("quick")
  with c.unlocked():
    c.task = "detection"
  with pytest.raises(ValueError, match="task='detection' is unknown"):
    tasks.build_task(c)


# Covered in the default suite by test_mocha.py::test_aot_of_the_vqa_step_with_expert_sharded_connectors
# (the same VQA train step through aot.compile_for_topology on cpu:8, the same assertions and the
# expert-sharded connectors' all-to-alls): ~27 s on 2 cores for a second compile of it.
@pytest.mark.slow
def test_aot_compiles_the_vqa_train_step():
  c = mocha_tiny_digits_vqa.get_config("quick")
  c.batch_size = 16
  report = aot.compile_for_topology(c, "cpu:8")
  assert report["task"] == "vqa" and report["flops_per_device"] > 0
  assert report["mesh"]["data"] == 8 and report["memory_per_device"]["total"] > 0


def test_sigmoid_and_softmax_cross_entropy_by_hand():
  logits = jnp.array([[0.0, 2.0], [1.0, -1.0]])
  # sigmoid_xent, label 1: -log(1 - s(0)) - log(s(2)) = log 2 + log(1 + e^-2);
  # label 0: -log(s(1)) - log(1 - s(-1)) = 2 log(1 + e^-1).
  want = [np.log(2) + np.log1p(np.exp(-2)), 2 * np.log1p(np.exp(-1))]
  got = classification.cross_entropy(logits, jnp.array([1, 0]), "sigmoid_xent")
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # soft targets [0.25, 0.75] on row 0: class 0 (logit 0) costs log 2; class 1 (logit 2)
  # -0.75 log s(2) - 0.25 log s(-2) = 0.75 log(1 + e^-2) + 0.25 (2 + log(1 + e^-2)).
  soft = jnp.array([[0.25, 0.75], [1.0, 0.0]])
  row0 = np.log(2) + 0.75 * np.log1p(np.exp(-2)) + 0.25 * (2 + np.log1p(np.exp(-2)))
  np.testing.assert_allclose(classification.cross_entropy(logits, soft, "sigmoid_xent"),
                             [row0, want[1]], rtol=1e-6)
  # softmax_xent, label 1 of [0, 2]: log(1 + e^-2).
  np.testing.assert_allclose(classification.cross_entropy(logits[:1], jnp.array([1]),
                                                          "softmax_xent"), [np.log1p(np.exp(-2))],
                             rtol=1e-6)
  with pytest.raises(ValueError, match=r"^config.loss='hinge' must be one of"):
    classification.cross_entropy(logits, jnp.array([1, 0]), "hinge")
