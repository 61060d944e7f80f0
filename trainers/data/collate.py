"""Rows -> (inputs, targets) tensors, straight from Arrow.

A ``pyarrow.Table`` batch's ``list<float32>`` feature column becomes one flat buffer reshaped to
``(rows, ...)``: no per-row numpy objects, no ``np.stack``. The same function takes a dict of
numpy columns (the profiler slices rows it already holds). `ArrowCollate` is the same function as
Ray Data's ``ArrowBatchCollateFn``, so Ray Data hands it Arrow tables; this module itself needs
no Ray (the profiler and the planner's tools use it where Ray is not installed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from trainers.config import DataConfig

# Config dtype -> the array dtype a tensor is made from: float inputs become float32, the dtype the
# models' weights have (a float64 batch into a float32 layer is torch's "mat1 and mat2 must have the
# same dtype"; autocast lowers precision from there); integer inputs become int64, as embeddings want.
INPUT_DTYPES = {"float32": np.float32, "float64": np.float32, "int32": np.int64, "int64": np.int64}


class Collate:
    """A batch (Arrow table or numpy columns) -> ``(x, y)``; ``y`` is None for language models."""

    def __init__(self, data: DataConfig) -> None:
        super().__init__()
        self.features, self.label = data.features, data.label

    def __call__(self, batch: pa.Table | Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = _tensor(column_array(batch, self.features.column), INPUT_DTYPES[self.features.dtype])
        if self.features.shape is not None:
            x = x.reshape(len(x), *self.features.shape)
        y = _tensor(column_array(batch, self.label.column), np.int64) if self.label else None
        return x, y


def column_array(batch: pa.Table | Mapping[str, Any], name: str) -> np.ndarray:
    column = batch[name]
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if isinstance(column, pa.Array):
        return _arrow_to_numpy(column)
    column = np.asarray(column)
    return np.stack(column) if column.dtype == object else column


def _arrow_to_numpy(column: pa.Array) -> np.ndarray:
    if column.null_count:
        raise ValueError(f"{column.null_count} null values in a batch; fill or drop them before training")
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type):
        rows = len(column)
        if rows and not pa.types.is_fixed_size_list(column.type):
            lengths = pc.min_max(pc.list_value_length(column))
            if lengths["min"] != lengths["max"]:
                raise ValueError(f"list rows hold {lengths['min']} to {lengths['max']} values; every row must "
                                 "hold the same number")
        values = column.flatten()  # honours the array's offset: only this batch's values
        return values.to_numpy(zero_copy_only=False).reshape(rows, -1)
    return column.to_numpy(zero_copy_only=False)


def _tensor(array: np.ndarray, dtype: type[np.generic]) -> torch.Tensor:
    # A copy: Arrow buffers are read-only, and the batch must outlive them. (from_numpy of a copy
    # is several times faster than torch.tensor on small batches.)
    return torch.from_numpy(array.astype(dtype, copy=True))
