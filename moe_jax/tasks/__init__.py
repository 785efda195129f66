"""Tasks: one `Task` per problem (data, loss, eval, batch shapes), chosen by `config.task`.

Add one with `TASKS.register("name", "package.module:TaskClass")`.
"""
from __future__ import annotations

import ml_collections

from moe_jax.registry import Registry
from moe_jax.tasks.base import Task

TASKS = Registry("task", {
    "classification": "moe_jax.tasks.classification:ClassificationTask",
    "vqa": "moe_jax.tasks.vqa:VqaTask",
})


def build_task(config: ml_collections.ConfigDict) -> Task:
  """The task of `config.task` (default "classification") for the whole training config."""
  return TASKS.get(config.get("task", "classification"))(config)


__all__ = ["Task", "TASKS", "build_task"]
