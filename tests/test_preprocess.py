"""Preprocessing ops (moe_jax.data.preprocess, randaug): fixed inputs with hand-computed outputs,
determinism under a seed, the numpy batch path equal to the PIL path, label mixing, one-line
errors; the generated imagenet2012-format dataset read and trained on end to end."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from moe_jax import data
from moe_jax.data import preprocess, randaug, synthetic


def data_config(**overrides):
  c = data.default_config()
  c.update(overrides)
  return c


def pipeline(spec, **overrides):
  return preprocess.Pipeline(spec, "data.pp_train", data_config(**overrides))


def rngs(n, seed=0):
  return [np.random.default_rng([seed, i]) for i in range(n)]


def run(spec, images, labels=None, seed=0, **overrides):
  labels = np.arange(len(images), dtype=np.int32) % 10 if labels is None else labels
  return pipeline(spec, **overrides).batch(images, labels, rngs(len(images), seed),
                                           np.random.default_rng(seed))


def raw(batch):
  """float32 [-1, 1] (minus_one_one) back to uint8 values."""
  return np.round((batch["image"] + 1) * 127.5).astype(np.int64)


def ramp(h, w, c=1):
  return (np.arange(h * w * c).reshape(1, h, w, c) % 251).astype(np.uint8)


def test_resize_is_antialiased_and_area_is_the_block_mean():
  checker = (np.indices((8, 8)).sum(0) % 2 * 255).astype(np.uint8)[None, ..., None]
  out = raw(run("resize(4)|normalize", checker, image_size=4))
  assert out.shape == (1, 4, 4, 1)
  assert np.all(np.abs(out - 127.5) <= 3)  # nearest would give 0s and 255s (edges: +-2.5)
  blocks = np.kron(np.array([[0, 40], [80, 200]]), np.ones((2, 2))).astype(np.uint8)
  out = raw(run("resize(2, 'area')|normalize", blocks[None, ..., None], image_size=2))
  np.testing.assert_array_equal(out[0, ..., 0], [[0, 40], [80, 200]])


def test_resize_small_keeps_the_aspect_and_central_crop_is_the_centre():
  image = np.zeros((20, 30, 3), np.uint8)
  out = pipeline("resize_small(10)|normalize", image_size=10, channels=3).example(image, None)
  assert out.shape == (10, 15, 3)
  image = ramp(7, 9)
  out = raw(run("central_crop(3)|normalize", image, image_size=3))
  np.testing.assert_array_equal(out[0], image[0, 2:5, 3:6])  # (7-3)//2=2, (9-3)//2=3
  with pytest.raises(ValueError, match=r"central_crop\(12\) of a 7x9 image"):
    run("central_crop(12)|normalize", image, image_size=12)


def test_inception_crop_boxes_respect_scale_and_ratio_and_fall_back_to_the_centre():
  op = preprocess.InceptionCrop(16, scale=(0.2, 0.6), ratio=(0.5, 2.0), image_size=16, mode="L")
  rng = np.random.default_rng(0)
  for _ in range(200):
    x0, y0, x1, y1 = op.box(400, 300, rng)
    w, h = x1 - x0, y1 - y0
    assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 300
    assert 0.2 * 0.98 <= w * h / 120000 <= 0.6 * 1.02 and 0.5 * 0.98 <= w / h <= 2.0 * 1.02
  # a square image cannot hold a full-area box of ratio 2: the central crop at ratio 2
  impossible = preprocess.InceptionCrop(8, scale=(1.0, 1.0), ratio=(2.0, 2.0), image_size=8,
                                        mode="L")
  assert impossible.box(100, 100, rng) == (0, 25, 100, 75)
  image = ramp(40, 40)
  a, b = run("inception_crop|normalize", image, seed=3, image_size=16), run(
      "inception_crop|normalize", image, seed=3, image_size=16)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["image"].shape == (1, 16, 16, 1) and a["image"].dtype == np.float32
  box = op.box(40, 40, np.random.default_rng([3, 0]))  # the rng `run` gives example 0
  want = Image.fromarray(image[0, ..., 0]).resize((16, 16), Image.Resampling.BILINEAR, box=box)
  np.testing.assert_array_equal(raw(run("inception_crop(16, (0.2, 0.6), (0.5, 2.0))|normalize",
                                        image, seed=3, image_size=16))[0, ..., 0],
                                np.asarray(want))


def test_pad_crop_and_flip_numpy_batch_path_equals_the_pil_path():
  images = np.random.default_rng(0).integers(1, 256, (16, 10, 10, 1), dtype=np.uint8)
  for spec in ("pad_crop(3)|flip_lr|normalize", "pad_crop(3)|flip_lr|randaug(2, 10)|normalize"):
    batched = run(spec, images, seed=4, image_size=10)  # a stacked array: on_array first
    listed = run(spec, list(images), seed=4, image_size=10)  # a list: PIL per example
    np.testing.assert_array_equal(batched["image"], listed["image"])
  out = raw(run("pad_crop(3)|normalize", images, seed=4, image_size=10))
  padded = np.pad(images, ((0, 0), (3, 3), (3, 3), (0, 0)))
  for i in range(16):  # each output is one window of the zero-padded input
    assert any(np.array_equal(out[i], padded[i, dy:dy + 10, dx:dx + 10])
               for dy in range(7) for dx in range(7))
  flipped = raw(run("flip_lr(1.0)|normalize", images, image_size=10))
  np.testing.assert_array_equal(flipped, images[:, :, ::-1])
  np.testing.assert_array_equal(raw(run("flip_lr(0.0)|normalize", images, image_size=10)), images)


def test_randaugment_ops_on_fixed_pixels():
  pixels = np.array([[0, 50, 127, 128, 200, 255]], np.uint8)
  image = Image.fromarray(pixels)
  rng = np.random.default_rng(0)

  def op(name, level):
    return np.asarray(randaug.OPS[name](image, level, rng)).astype(int)[0]

  np.testing.assert_array_equal(op("Invert", 10), [255, 205, 128, 127, 55, 0])
  np.testing.assert_array_equal(op("Solarize", 5), [0, 50, 127, 127, 55, 0])  # >= 128 inverted
  np.testing.assert_array_equal(op("Solarize", 10), pixels[0])  # threshold 256: none
  np.testing.assert_array_equal(op("Posterize", 10), [0, 48, 112, 128, 192, 240])  # 4 bits
  np.testing.assert_array_equal(op("SolarizeAdd", 10), [110, 160, 237, 128, 200, 255])
  # factor 0.1, truncated to uint8 as TF's blend does
  np.testing.assert_array_equal(op("Brightness", 0), [0, 5, 12, 12, 20, 25])
  np.testing.assert_array_equal(op("AutoContrast", 10), pixels[0])  # already 0..255
  assert sorted(randaug.OP_NAMES) == sorted(
      ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
       "Cutout", "SolarizeAdd"])  # big_vision's RandAugment set
  grey = Image.fromarray(np.zeros((40, 40, 3), np.uint8))
  cut = np.asarray(randaug.OPS["Cutout"](grey, 5, np.random.default_rng(1)))
  assert set(np.unique(cut)) == {0, 128} and (cut == 128).all(-1).sum() <= 40 * 40  # half-side 20
  shifted = np.asarray(randaug.OPS["TranslateX"](grey, 1, rng))  # 10 px of fill
  assert (shifted == 128).all(-1).sum() == 10 * 40
  out = run("randaug(2, 15)|normalize", ramp(12, 12, 3).repeat(8, 0), seed=2, image_size=12,
            channels=3)
  assert out["image"].shape == (8, 12, 12, 3) and -1 <= out["image"].min() <= out["image"].max() <= 1
  again = run("randaug(2, 15)|normalize", ramp(12, 12, 3).repeat(8, 0), seed=2, image_size=12,
              channels=3)
  np.testing.assert_array_equal(out["image"], again["image"])


def test_label_smoothing_mixup_and_cutmix_targets():
  labels = np.array([0, 1, 2, 3], np.int32)
  images = np.stack([np.full((8, 8, 1), v, np.uint8) for v in (0, 255, 51, 102)])
  smooth = run("normalize|label_smoothing(0.1)", images, labels, image_size=8)
  np.testing.assert_allclose(smooth["soft_label"][0], [0.91] + [0.01] * 9, atol=1e-7)
  for spec in ("normalize|mixup(0.4)", "normalize|cutmix(1.0)", "normalize|label_smoothing(0.1)"
               "|mixup(0.4)|cutmix(1.0)"):
    for seed in range(5):
      out = run(spec, images, labels, seed=seed, image_size=8)
      np.testing.assert_allclose(out["soft_label"].sum(-1), 1, atol=1e-6)
      np.testing.assert_array_equal(out["label"], labels)  # accuracy keeps the own class
  x = data.transforms.normalise(images, *data.transforms.normalization_stats("minus_one_one", 1))
  for seed in range(5):
    out = run("normalize|mixup(0.4)", images, labels, seed=seed, image_size=8)
    lam = out["soft_label"][0, 0]  # pairs (0, 1), (2, 3)
    np.testing.assert_allclose(out["soft_label"][0, 1], 1 - lam, atol=1e-6)
    np.testing.assert_allclose(out["image"][0], lam * x[0] + (1 - lam) * x[1], atol=1e-5)
    np.testing.assert_allclose(out["image"][3], lam * x[3] + (1 - lam) * x[2], atol=1e-5)
    cut = run("normalize|cutmix(1.0)", images, labels, seed=seed, image_size=8)
    own = np.mean(cut["image"][2] == x[2])  # the pixels not pasted from the partner
    np.testing.assert_allclose(cut["soft_label"][2, 2], own, atol=1e-6)
    np.testing.assert_allclose(cut["soft_label"][2, 3], 1 - own, atol=1e-6)
  skipped = run("normalize|mixup(0.4, p=0.0)", images, labels, image_size=8)
  assert "soft_label" not in skipped and np.array_equal(skipped["image"], x)


def test_decode_jpeg_gray_to_rgb_and_draft_decoding_stays_close():
  rng = np.random.default_rng(0)
  colour = synthetic.synthetic_jpeg(rng, 480, 360)
  grey = io.BytesIO()
  Image.fromarray(np.full((30, 40), 90, np.uint8)).save(grey, "JPEG", quality=95)
  rgb = dict(channels=3, normalization="imagenet")
  p = pipeline("decode|resize(32)|normalize", image_size=32, **rgb)
  out = p.example(grey.getvalue(), None)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and np.all(np.abs(out - 90) <= 2)
  fused = p.example(colour, None)  # DCT-scaled decode (1/8 here), then resize
  full = np.asarray(Image.open(io.BytesIO(colour)).convert("RGB").resize(
      (32, 32), Image.Resampling.BILINEAR))
  assert np.mean(np.abs(fused.astype(int) - full)) < 4
  decoded = pipeline("decode|normalize", image_size=360, **rgb)
  assert decoded.example(colour, None).shape == (360, 480, 3)


@pytest.mark.parametrize("spec,field,message", [
    ("resize|pad_crop(2)", "data.pp_train", "needs exactly one normalize"),
    ("resize|flip|normalize", "data.pp_train", "op 'flip': unknown op; ops: decode, resize"),
    ("resize(28, 'lanczos9')|normalize", "data.pp_train", "method='lanczos9' must be one of"),
    ("pad_crop|normalize", "data.pp_train", "missing a required argument: 'padding'"),
    ("randaug(2, 15, 3)|normalize", "data.pp_train", "too many positional arguments"),
    ("resize|normalize|flip_lr", "data.pp_train", "must all come before normalize"),
    ("resize|normalize('clip')", "data.pp_train", "data.normalization='minus_one_one'"),
    ("resize|decode|normalize", "data.pp_train", "decode must be the first op"),
    ("resize(|normalize", "data.pp_train", "not an op"),
    ("inception_crop(28, (0.5, 0.2))|normalize", "data.pp_train", "scale=(0.5, 0.2)"),
])
def test_bad_pp_strings_are_one_line_errors_naming_the_op(spec, field, message):
  c = data_config(**{field.split(".")[1]: spec})
  with pytest.raises(ValueError) as e:
    data.config.validate(c)  # before any dataset is opened
  text = str(e.value)
  assert "\n" not in text and text.startswith(f"{field}=") and message in text, text


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("imagenet"))
  synthetic.write_imagenet2012(path, num_train=48, num_validation=16)
  return path


def imagenet_config(data_dir, size=32):
  c = data_config(name="imagenet2012", data_dir=data_dir, image_size=size, channels=3,
                  num_classes=1000, normalization="imagenet")
  c.pp_train = "decode|inception_crop|flip_lr|randaug(2, 15)|normalize|mixup(0.2)"
  return c


def imagenet_eval_pp(size=32):
  return f"decode|resize_small({size * 8 // 7})|central_crop|normalize"


def test_generated_imagenet2012_reads_like_the_real_format(imagenet_dir):
  info = data.dataset_info("imagenet2012", imagenet_dir, eval_split="validation")
  assert info == data.DatasetInfo(48, 16, (None, None, 3), 1000)
  c = imagenet_config(imagenet_dir)
  batch = next(data.make_dataset(c, "train", batch_size=8, seed=0, train=True))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["soft_label"].shape == (8, 1000)
  evaluation = list(data.make_dataset(c, "validation", batch_size=6, train=False,
                                      eval_pp=imagenet_eval_pp()))
  assert sum(b["mask"].sum() for b in evaluation) == 16 and len(evaluation) == 3
  c.pp_train = "inception_crop|normalize"
  with pytest.raises(ValueError, match="stores encoded images; start with decode"):
    data.make_dataset(c, "train", batch_size=8, seed=0, train=True)
  c.pp_train = "decode|resize_small(40)|normalize"
  with pytest.raises(ValueError, match="gives images of varying size"):
    data.make_dataset(c, "train", batch_size=8, seed=0, train=True)
  c.image_size = 48  # the eval string was written for 32: caught before any image is read
  with pytest.raises(ValueError, match=r"central_crop\(48\) of images whose shorter side is 36"):
    data.make_dataset(c, "validation", batch_size=8, train=False, eval_pp=imagenet_eval_pp())


def test_generated_imagenet2012_trains_2_steps_through_the_trainer(imagenet_dir, tmp_path):
  from moe_jax.commands import common
  from moe_jax.train import loop
  c = common.load_config("configs/vimoe_tiny_mnist.py:quick")
  c.data = imagenet_config(imagenet_dir)
  c.model.image_size, c.model.channels, c.model.num_classes = 32, 3, 1000
  c.model.depth, c.model.width, c.model.mlp_dim, c.model.num_heads = 1, 32, 64, 2
  c.model.moe.hidden_dim, c.model.moe_layers, c.model.patch_size = 64, "last:1", 8
  c.evals.test.update(dict(dataset="imagenet2012", split="validation", pp=imagenet_eval_pp(),
                           batch_size=16, every_steps=0))
  c.batch_size = 16
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 2, 1, 2
  last = loop.train_and_evaluate(c, str(tmp_path))
  assert np.isfinite(last["train/loss"]) and last["test/num_examples"] == 16
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    steps = [r["step"] for r in map(json.loads, f) if "train/loss" in r]
  assert steps == [1, 2]
