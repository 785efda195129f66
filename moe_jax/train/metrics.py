"""Metric writers: DIR/metrics.jsonl and TensorBoard events (process 0 only), progress bar."""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
import tqdm
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2


class MetricWriter:
  """Appends one JSON object per call to `metrics.jsonl` and mirrors scalars to TensorBoard.
  Rows after `start_step` (written by a run that stopped after its last checkpoint, and about
  to be re-run) are dropped first, so each step has its rows once; in TensorBoard a resumed run
  starts with a `SessionLog.START` event at `start_step`, on which TensorBoard discards the
  earlier run's events of later steps (its "purge orphaned data")."""

  def __init__(self, workdir: str, start_step: int = 0):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      _truncate_after(path, start_step)
      self.jsonl = open(path, "a")
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      if start_step:
        self.tb._get_file_writer().add_event(event_pb2.Event(
            wall_time=time.time(), step=start_step,
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


def _truncate_after(path: str, step: int) -> None:
  """Drops the rows of `path` with "step" > `step` (and a torn last line), atomically."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          keep.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError, TypeError):
        continue
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


def progress_bar(start: int, total: int) -> tqdm.tqdm:
  """Terminal progress with ETA (silent on processes other than 0)."""
  return tqdm.tqdm(initial=start, total=total, unit="step", dynamic_ncols=True,
                   disable=jax.process_index() != 0)
