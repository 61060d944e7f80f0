"""The held-out split by a seeded hash of each row: the same rows whoever reads them, in any
batching, with no pass over the data before training (pure: pyarrow and numpy)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from trainers.config import DataConfig
from trainers.data.split import Side, count_sides, held_out

DATA = DataConfig(path="x", features={"column": "x", "dtype": "float32", "shape": [4]},
                  label={"column": "y", "dtype": "int64"}, val_fraction=0.25)


def table(rows: int, offset: int = 0) -> pa.Table:
    values = np.arange(offset, offset + rows, dtype=np.float32)[:, None] * np.ones(4, dtype=np.float32)
    return pa.table({"x": pa.array(list(values)), "y": pa.array(np.arange(offset, offset + rows) % 10)})


def test_a_rows_side_does_not_depend_on_its_batch_and_the_sides_partition_the_data() -> None:
    whole = held_out(table(4000), DATA, seed=7)
    pieces = np.concatenate([held_out(table(n, start), DATA, seed=7) for start, n in ((0, 1), (1, 999), (1000, 3000))])
    assert (whole == pieces).all()
    assert 0.22 < whole.mean() < 0.28  # the configured share, within sampling noise
    train = Side(DATA, 7, validation=False)(table(4000))
    val = Side(DATA, 7, validation=True)(table(4000))
    assert train.num_rows + val.num_rows == 4000 and val.num_rows == whole.sum()
    assert not set(train["y"].to_pylist()) - set(range(10))
    assert set(np.asarray(train["x"].to_pylist())[:, 0]).isdisjoint(np.asarray(val["x"].to_pylist())[:, 0])


def test_identical_rows_share_a_side_and_the_seed_reshuffles() -> None:
    twice = pa.concat_tables([table(500), table(500)])
    mask = held_out(twice, DATA, seed=1)
    assert (mask[:500] == mask[500:]).all()  # a duplicated row never leaks into the held-out set
    assert (held_out(table(500), DATA, seed=2) != mask[:500]).any()


def test_the_driver_counts_what_the_workers_will_read() -> None:
    import pyarrow.dataset as pads

    dataset = pads.dataset(table(3000))
    train, val = count_sides(dataset, DATA, 3)
    assert train + val == 3000 and val == int(held_out(table(3000), DATA, 3).sum())
