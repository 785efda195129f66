"""Cloud workdirs (`--workdir gs://...`) through etils.epath, on a local fake of gs://."""
from __future__ import annotations

import importlib
import json
import os
import time

import pytest
from etils import epath
from fsspec.implementations.local import LocalFileSystem

from moe_jax import paths
from moe_jax.train import checkpoint, loop, metrics
from test_train import tensorboard_events


class FakeGCS(LocalFileSystem):
  """gs://BUCKET/KEY stored as ROOT/BUCKET/KEY on the local disk (fsspec's gcsfs stand-in)."""
  protocol = ("gs", "gcs")
  root = ""

  def __init__(self, *args, finalize_on_close=None, **kwargs):
    del finalize_on_close  # gcsfs's option, which epath passes
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    if path.startswith(("gs://", "gcs://")):
      path = os.path.join(cls.root, path.split("://", 1)[1])
    return super()._strip_protocol(path)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  registry = importlib.import_module("fsspec.registry")._registry

  from orbax.checkpoint._src.path import gcs_utils

  monkeypatch.setattr(FakeGCS, "root", str(tmp_path / "gcs"))
  monkeypatch.setitem(paths.REQUIRED_PACKAGES, "gs", ())  # the fake stands in for the clients
  # orbax asks the bucket (google-cloud-storage) whether it has a hierarchical namespace.
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  for name in FakeGCS.protocol:
    monkeypatch.setitem(registry, name, FakeGCS)
  epath.backend.fsspec_backend._get_filesystem.cache_clear()
  yield tmp_path / "gcs"
  epath.backend.fsspec_backend._get_filesystem.cache_clear()


def test_workdir_paths(fake_gcs):
  assert paths.workdir_path("gs://bucket/run") == epath.Path("gs://bucket/run")
  assert os.fspath(paths.workdir_path("runs/a")) == os.path.abspath("runs/a")
  with pytest.raises(ValueError, match=r"^--workdir ftp://x/run: scheme ftp:// is not "
                                       r"supported; use a local folder or one of gs://"):
    paths.workdir_path("ftp://x/run")


@pytest.mark.skipif(not paths._missing("gcsfs"), reason="gcsfs is installed")
def test_a_gs_workdir_without_its_clients_says_what_to_install():
  with pytest.raises(ValueError, match=r"^--workdir gs://b/run needs gcsfs.*: pip install gcsfs"):
    loop.check_writable("gs://b/run")


def test_metrics_and_tensorboard_round_trip_through_gs(fake_gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a local "./gs:" folder would show up here
  workdir = "gs://bucket/run"
  loop.check_writable(workdir)
  writer = metrics.MetricWriter(workdir)
  for step in (1, 2, 3):
    writer.write(step, {"train/loss": 1.0 / step})
  writer.close()
  time.sleep(1.1)  # event files are named by the second they were opened in
  # A resumed run from step 2: step 3's row is dropped, then the run goes on.
  writer = metrics.MetricWriter(workdir, start_step=2)
  writer.write(3, {"train/loss": 0.25})
  writer.close()
  rows = [json.loads(l) for l in (fake_gcs / "bucket/run/metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5},
                  {"step": 3, "train/loss": 0.25}]
  assert len(list((fake_gcs / "bucket/run/tensorboard").iterdir())) == 2  # one per run
  scalars = [(e.step, round(v.simple_value, 4))
             for e in tensorboard_events(fake_gcs / "bucket/run/tensorboard")
             for v in e.summary.value]
  assert sorted(scalars) == [(1, 1.0), (2, 0.5), (3, 0.25), (3, 0.3333)]
  assert not (tmp_path / "gs:").exists()


def test_checkpoint_manager_keeps_the_cloud_path(fake_gcs):
  mgr = checkpoint.manager("gs://bucket/run")
  assert os.fspath(mgr.directory) == "gs://bucket/run/checkpoints"
  assert (fake_gcs / "bucket/run/checkpoints").is_dir()


def test_routing_analysis_plots_and_command_write_to_gs(fake_gcs, capsys):
  from moe_jax.analysis import plots
  from moe_jax.commands import analysis as analysis_command

  report = {"threshold": 0.1, "layers": {"blocks/2/mlp": {
      "class_expert": [[3, 1], [0, 4]], "normalized_mi": 0.4, "load": [0.5, 0.5],
      "load_cv": 0.0}}, "recommend_dense": []}
  written = plots.plot_report(report, "gs://bucket/run/analysis")
  assert written == [f"gs://bucket/run/analysis/{n}.png"
                     for n in ("heatmaps", "load", "specialisation")]
  for name in ("heatmaps", "load", "specialisation"):
    assert (fake_gcs / f"bucket/run/analysis/{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The command reads eval_<name>.json from the bucket and draws in analysis/<name> next to it.
  epath.Path("gs://bucket/other/eval_test.json").parent.mkdir(parents=True, exist_ok=True)
  epath.Path("gs://bucket/other/eval_test.json").write_text(json.dumps({"routing": report}))
  analysis_command.main(["gs://bucket/other/eval_test.json"])
  assert "gs://bucket/other/analysis/test/load.png" in capsys.readouterr().out
  assert (fake_gcs / "bucket/other/analysis/test/load.png").is_file()
