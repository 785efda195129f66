"""Every config file with every variant it declares: loads through the commands' loader (from any
working directory), builds (abstract model, MoE, mesh, optimizer), and keeps one knob for image
size, channels and classes."""
from __future__ import annotations

import glob
import importlib
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from flax import nnx

from moe_jax import models
from moe_jax.commands import common
from moe_jax.inr import codec, model as inr_model, volumes
from moe_jax.train import loop, optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(common.CONFIGS, "*.py"))
               if not p.endswith("__init__.py"))
SPECS = [f"configs/{name}.py:{variant}" for name in FILES
         for variant in importlib.import_module(f"configs.{name}").VARIANTS]
LINKED = ("image_size", "channels", "num_classes")


def one_block_per_stage(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A MoCHA node with one block per encoder stage and decoder: the same shapes and wiring. One
  abstract trace of the paper's ~4.5B-parameter MoCHA takes minutes here (flax's RNG counter
  updates look up tracer provenance, quadratic in the trace length); each part alone, seconds."""
  model = model.copy_and_resolve_references()
  for e in model.encoders.values():
    if e.kind == "vit":
      e.vit.depth = 1
    elif e.kind == "convnet":
      e.convnet.depths = (1,) * len(e.convnet.depths)
    elif e.backbone.name == "convnext":  # a pretrained encoder's library model
      e.backbone.depths = (1,) * len(e.backbone.depths)
    elif "backbone" in e:
      e.backbone.depth = 2  # SigLIP's features are hidden_states[-3]
  model.decoder.depth = 1
  return model


@pytest.mark.parametrize("name", FILES)
def test_the_default_variant_is_the_first_declared(name):
  first = importlib.import_module(f"configs.{name}").VARIANTS[0]
  assert (common.load_config(f"configs/{name}.py").to_dict()
          == common.load_config(f"configs/{name}.py:{first}").to_dict())


@pytest.mark.parametrize("spec", SPECS)
def test_config_loads_and_builds(spec):
  c = common.load_config(spec)
  assert c.is_locked
  model_nodes = list(c.strategies.values()) if "strategies" in c else [c.get("model")]
  if "optimizer" in c:  # a training config: mesh over the 8 test devices, optimizer, model
    loop.validate_config(c)
    loop.build_mesh(c)
    optim.make_optimizer(c.optimizer, c.total_steps)
    for model in model_nodes:
      if model.name == "mocha":
        model = one_block_per_stage(model)
      abstract = nnx.eval_shape(lambda: models.build_model(model, rngs=nnx.Rngs(0)))
      assert nnx.state(abstract, nnx.Param)
      for field in LINKED:
        if field in model:
          assert model[field] == c.data[field], field
  elif "model" in c:  # an INR codec config: widths solved for a volume and a ratio
    volume = volumes.Volume(np.zeros((32, 32, 16), np.int16), np.eye(4))
    model, budget, _ = codec.solve_model(volume, 10, c)
    assert 0.9 * budget <= inr_model.num_params(model, 3) <= budget
  else:
    assert c.render_chunk > 0


@pytest.mark.parametrize("name", FILES)
def test_unknown_variant_is_a_one_line_error(name):
  with pytest.raises(ValueError) as e:
    common.load_config(f"configs/{name}.py:no_such_variant")
  message = str(e.value)
  assert "\n" not in message and "'no_such_variant' is unknown; use one of" in message, message
  for variant in importlib.import_module(f"configs.{name}").VARIANTS:
    assert variant in message


def test_data_and_model_share_image_size_channels_and_classes():
  c = common.load_config("configs/vimoe_tiny_mnist.py",
                         ["data.image_size=35", "model.channels=3", "data.num_classes=7"])
  assert (c.model.image_size, c.data.channels, c.model.num_classes) == (35, 3, 7)
  assert c.is_locked
  c.model.image_size = 14  # either side, also on the locked config
  assert c.data.image_size == 14
  resolved = c.copy_and_resolve_references()
  assert (resolved.model.image_size, resolved.model.channels, resolved.model.num_classes) == (
      14, 3, 7)
  assert json.loads(c.to_json_best_effort())["model"]["image_size"] == 14
  compare = common.load_config("configs/compare_routers.py", ["data.image_size=21"])
  assert {s.image_size for s in compare.strategies.values()} == {21}
  vqa = common.load_config("configs/mocha_tiny_digits_vqa.py", ["data.channels=3"])
  assert vqa.model.channels == 3


def test_commands_load_configs_from_another_working_directory(tmp_path):
  """`python train.py --config configs/moec_imagenet.py:small` from elsewhere: the config
  (which imports configs/vimoe_imagenet.py) loads, and training (of a smaller model, to be quick)
  stops at the missing dataset."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "train.py"), "--config", "configs/moec_imagenet.py:small",
       f"--workdir={tmp_path / 'w'}", f"--config.data.data_dir={tmp_path / 'tfds'}",
       *(f"--config.model.{k}" for k in ("depth=2", "width=32", "num_heads=2", "mlp_dim=64",
                                          "moe.hidden_dim=64")), "--config.batch_size=64"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode != 0 and last.startswith("error:") and "imagenet2012" in last, (
      proc.stderr[-2000:])
