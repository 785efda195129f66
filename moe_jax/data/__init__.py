"""Data: TF-free tfds builders for embedded real datasets, and resumable grain pipelines."""
from moe_jax.data.config import default_config, model_refs
from moe_jax.data.pipeline import EvalSource, eval_dataset, make_dataset, train_dataset
from moe_jax.data.sources import (DatasetInfo, DatasetNotPreparedError, data_source, dataset_info,
                                  prepared_builder)

__all__ = ["EvalSource", "default_config", "model_refs", "make_dataset", "train_dataset", "eval_dataset", "dataset_info",
           "DatasetInfo", "data_source", "prepared_builder", "DatasetNotPreparedError"]
