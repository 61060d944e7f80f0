"""Built-in data sets (written as Parquet) and the schema check run before training."""

from trainers.data.datasets import DATASETS, ensure_prepared, prepare_dataset
from trainers.data.schema import check_columns, open_dataset

__all__ = ["DATASETS", "check_columns", "ensure_prepared", "open_dataset", "prepare_dataset"]
