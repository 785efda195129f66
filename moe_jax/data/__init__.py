"""Data: TF-free tfds builders for embedded real datasets, and grain pipelines."""
from moe_jax.data.pipeline import dataset_info, default_config, eval_dataset, train_dataset
from moe_jax.data.sources import DatasetNotPreparedError, data_source, ensure_prepared

__all__ = ["default_config", "train_dataset", "eval_dataset", "dataset_info", "data_source",
           "ensure_prepared", "DatasetNotPreparedError"]
