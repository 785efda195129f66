"""A generated dataset in the real `imagenet2012` tfds format, for benchmarks and end-to-end tests.

    synthetic.write_imagenet2012(data_dir, num_train=1000, num_validation=200)
    data.data_source("imagenet2012", "train", data_dir)   # like the real one, TF-free

It is written by a subclass of tfds' own `imagenet2012` builder (same name, version, features:
`image` JPEG-encoded `Image(shape=(None, None, 3))`, `label` `ClassLabel(1000)`, `file_name`),
as array_record, so `moe_jax.data` reads it exactly as it reads a prepared ImageNet. Images are
~500x375 (sizes vary by +-20%, a fifth are portrait), smooth colour fields with shapes and
pixel noise, JPEG quality 95: ~110 KB each (measured; ImageNet's train JPEGs average ~110 KB,
138 GB / 1.28 M), where pure random noise would take ~170 KB at quality 90.
"""
from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as tfds_imagenet

NUM_CLASSES = 1000


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
  """One JPEG (quality 95) of `width x height`: an upsampled colour field, a few filled shapes
  and pixel noise."""
  field = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
  image = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
  draw = ImageDraw.Draw(image)
  for _ in range(int(rng.integers(3, 8))):
    x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
    w, h = int(rng.integers(20, width // 2)), int(rng.integers(20, height // 2))
    color = tuple(int(v) for v in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=color)
  pixels = np.asarray(image, np.int16) + rng.normal(0, 12, (height, width, 3)).astype(np.int16)
  buffer = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=95)
  return buffer.getvalue()


class SyntheticImagenet2012(tfds_imagenet.Builder, skip_registration=True):
  """tfds' imagenet2012 builder with generated examples instead of the downloaded archives."""

  name = "imagenet2012"

  def __init__(self, *, splits: dict[str, int], seed: int, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    self.splits_to_write, self.seed = splits, seed
    super().__init__(**kwargs)

  @classmethod
  def _get_pkg_dir_path(cls):  # metadata (labels, checksums) of the real builder
    return tfds_imagenet.Builder._get_pkg_dir_path()

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._examples(split, n) for split, n in self.splits_to_write.items()}

  def _examples(self, split: str, n: int):
    rng = np.random.default_rng([self.seed, sorted(self.splits_to_write).index(split)])
    for i in range(n):
      width, height = (int(s * rng.uniform(0.8, 1.2)) for s in (500, 375))
      if rng.random() < 0.2:
        width, height = height, width
      name = f"synthetic_{split}_{i:08d}.JPEG"
      yield name, {"image": io.BytesIO(synthetic_jpeg(rng, width, height)),
                   "label": int(rng.integers(NUM_CLASSES)), "file_name": name}


def write_imagenet2012(data_dir: str, *, num_train: int, num_validation: int,
                       seed: int = 0) -> tfds.core.DatasetBuilder:
  """Writes the generated `imagenet2012` (train, validation) into `data_dir` (once: an existing
  one is kept, whatever its size) and returns its builder."""
  builder = SyntheticImagenet2012(data_dir=data_dir, seed=seed,
                                  splits={"train": num_train, "validation": num_validation})
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder
