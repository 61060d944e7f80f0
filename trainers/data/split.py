"""The held-out split, by a seeded hash of each row's content: no pass over the data before
training.

Ray Data's `train_test_split` materializes the whole data set to split it by position. Here each
row's side is a pure function of its bytes (features and label) and a seed, so every reader
(Ray Data's streaming workers, the driver counting the training rows with pyarrow) agrees on it
batch by batch, with nothing materialized; identical rows always land on the same side (no leak
of a duplicated row into the held-out set).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from trainers.config import DataConfig
from trainers.data.collate import column_array

# Hash buckets: the held-out share is `val_fraction` of them.
BUCKETS = 1 << 20
_MIX = np.uint64(0x9E3779B97F4A7C15)  # the 64-bit golden ratio: Knuth's multiplicative hashing


def row_hashes(batch: pa.Table | Mapping[str, Any], data: DataConfig, seed: int) -> np.ndarray:
    """One 64-bit hash per row of the batch, from its feature (and label) bytes and the seed."""
    columns = [column_array(batch, data.features.column)]
    if data.label is not None:
        columns.append(column_array(batch, data.label.column))
    rows = len(columns[0])
    parts = [np.ascontiguousarray(c).reshape(rows, -1).view(np.uint8) for c in columns]
    raw = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    words = np.pad(raw, ((0, 0), (0, -raw.shape[1] % 8))).view(np.uint64)
    h = np.full(rows, np.uint64(seed) ^ np.uint64(0xCBF29CE484222325), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(words.shape[1]):
            h = (h ^ words[:, i]) * _MIX
            h ^= h >> np.uint64(29)
    return h


def held_out(batch: pa.Table | Mapping[str, Any], data: DataConfig, seed: int) -> np.ndarray:
    """Which rows of the batch belong to the held-out (validation) set."""
    return (row_hashes(batch, data, seed) % np.uint64(BUCKETS)) < np.uint64(round(data.val_fraction * BUCKETS))


class Side:
    """A Ray Data `map_batches` function keeping one side of the split (a picklable callable)."""

    def __init__(self, data: DataConfig, seed: int, *, validation: bool) -> None:
        self.data, self.seed, self.validation = data, seed, validation

    def __call__(self, batch: pa.Table) -> pa.Table:
        mask = held_out(batch, self.data, self.seed)
        return batch.filter(pa.array(mask if self.validation else ~mask))


def count_sides(dataset: Any, data: DataConfig, seed: int) -> tuple[int, int]:
    """(training rows, held-out rows) of a pyarrow dataset, reading only the hashed columns."""
    train = val = 0
    for batch in dataset.to_batches(columns=data.columns, batch_size=65536):
        mask = held_out(pa.Table.from_batches([batch]), data, seed)
        val += int(mask.sum())
        train += len(mask) - int(mask.sum())
    return train, val
