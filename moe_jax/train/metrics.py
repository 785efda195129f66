"""Metric writers: DIR/metrics.jsonl and TensorBoard events (process 0 only), progress bar."""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
import tqdm
from etils import epath
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2

from moe_jax import paths


class MetricWriter:
  """Appends one JSON object per call to `metrics.jsonl` and mirrors scalars to TensorBoard.
  Rows after `start_step` (written by a run that stopped after its last checkpoint, and about
  to be re-run) are dropped first, so each step has its rows once; in TensorBoard a resumed run
  starts with a `SessionLog.START` event at `start_step`, on which TensorBoard discards the
  earlier run's events of later steps (its "purge orphaned data")."""

  def __init__(self, workdir: str, start_step: int = 0):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      folder = paths.workdir_path(workdir)
      folder.mkdir(parents=True, exist_ok=True)
      self.jsonl = _JsonLines(folder / "metrics.jsonl", start_step)
      self.tb = SummaryWriter(os.fspath(folder / "tensorboard"))
      if start_step:
        self.tb._get_file_writer().add_event(event_pb2.Event(
            wall_time=time.time(), step=start_step,
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


class _JsonLines:
  """`path` (local or cloud) with its rows after `start_step` (and a torn last line) dropped,
  then appended to line by line: in place locally (atomic truncation); in cloud storage, which
  cannot append, the whole file is uploaded again after each line."""

  def __init__(self, path: epath.Path, start_step: int):
    self.path, self.cloud = path, paths.is_cloud(path)
    keep = []
    if path.exists():
      for line in path.read_text().splitlines():
        try:
          if json.loads(line)["step"] <= start_step:
            keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
          continue
    self.text = "".join(keep)
    if self.cloud:
      path.write_text(self.text)
    else:
      tmp = path.with_name(path.name + ".tmp")
      tmp.write_text(self.text)
      tmp.replace(path)
      self.file = path.open("a")

  def write(self, line: str) -> None:
    if self.cloud:
      self.text += line
      self.path.write_text(self.text)
    else:
      self.file.write(line)
      self.file.flush()

  def close(self) -> None:
    if not self.cloud:
      self.file.close()


def progress_bar(start: int, total: int, unit: str = "step") -> tqdm.tqdm:
  """Terminal progress with ETA (silent on processes other than 0 and when stderr is not a
  terminal: logs, tests)."""
  return tqdm.tqdm(initial=start, total=total, unit=unit, dynamic_ncols=True,
                   disable=jax.process_index() != 0 or not sys.stderr.isatty())
