"""Arrow -> tensor collate, the in-memory shard cache the training loop switches to, and an epoch
that reads nothing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import ray.train
import torch

from orchestrator.config import ColumnConfig, DataConfig, load_config
from trainers import loop
from trainers.batching import split_global_batch
from trainers.config import WorkerConfig
from trainers.errors import UserError
from trainers.data.cache import EvalCache, ShardCache
from trainers.data.collate import Collate

DATA = DataConfig(path="unused", features=ColumnConfig(column="pixels", dtype="float32", shape=[1, 2, 2]),
                  label=ColumnConfig(column="label", dtype="int64"))


def _table(rows: int, list_type: pa.DataType = pa.list_(pa.float32())) -> pa.Table:
    pixels = [np.arange(4, dtype=np.float32) + 10 * i for i in range(rows)]
    return pa.table({"pixels": pa.array(pixels, type=list_type), "label": pa.array(range(rows), type=pa.int64())})


@pytest.mark.parametrize("list_type", [pa.list_(pa.float32()), pa.large_list(pa.float32()), pa.list_(pa.float32(), 4)])
def test_collate_reads_a_sliced_arrow_batch_as_the_numpy_path_does(list_type: pa.DataType) -> None:
    table = _table(10, list_type)
    batch = table.slice(3, 4)  # an offset into shared buffers, as Ray Data hands out
    x, y = Collate(DATA)(batch)
    assert x.shape == (4, 1, 2, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [3, 4, 5, 6]
    assert x[0].flatten().tolist() == [30.0, 31.0, 32.0, 33.0]
    numpy_columns = {c: table.column(c).to_numpy(zero_copy_only=False)[3:7] for c in table.column_names}
    x2, y2 = Collate(DATA)(numpy_columns)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_a_float64_column_becomes_float32_the_models_dtype() -> None:
    data = DataConfig(path="unused", features=ColumnConfig(column="pixels", dtype="float64", shape=[1, 2, 2]),
                      label=ColumnConfig(column="label", dtype="int64"))
    table = _table(3, pa.list_(pa.float64()))
    x, _ = Collate(data)(table)
    assert x.dtype == torch.float32 and x[2].flatten().tolist() == [20.0, 21.0, 22.0, 23.0]
    torch.nn.Conv2d(1, 2, 1)(x)  # a float32 layer takes it


def test_collate_refuses_ragged_rows_and_nulls() -> None:
    ragged = pa.table({"pixels": pa.array([[1.0, 2.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], type=pa.list_(pa.float32())),
                       "label": pa.array([0, 1])})
    with pytest.raises(ValueError, match="2 to 6 values"):
        Collate(DATA)(ragged)
    nulls = pa.table({"pixels": pa.array([[1.0] * 4, None], type=pa.list_(pa.float32())), "label": pa.array([0, 1])})
    with pytest.raises(ValueError, match="1 null"):
        Collate(DATA)(nulls)


def _fill(cache: ShardCache, rows: int, batch: int) -> None:
    for start in range(0, rows, batch):
        ids = torch.arange(start, start + batch)
        cache.add(ids.float().unsqueeze(1).repeat(1, 4), ids)


def test_cache_replays_every_cached_sample_once_per_epoch_in_a_seeded_order() -> None:
    cache = ShardCache(budget_bytes=10**6, expected_samples=64)
    _fill(cache, 64, 8)
    assert cache.seal() and cache.ready
    epoch = list(cache.batches(16, seed=1))
    assert len(epoch) == 4
    labels = torch.cat([y for _, y in epoch])
    assert sorted(labels.tolist()) == list(range(64))
    assert all(torch.equal(x[:, 0].long(), y) for x, y in epoch)  # rows stay paired with their labels
    again = torch.cat([y for _, y in cache.batches(16, seed=1)])
    other = torch.cat([y for _, y in cache.batches(16, seed=2)])
    assert torch.equal(labels, again) and not torch.equal(labels, other)


def test_cache_gives_up_over_its_budget_and_when_off() -> None:
    # 64 samples x (4 floats + 1 int64) = 64 x 24 bytes = 1,536 bytes.
    small = ShardCache(budget_bytes=1_000, expected_samples=64)
    _fill(small, 64, 8)
    assert not small.enabled and not small.seal()
    off = ShardCache(budget_bytes=0, expected_samples=64)
    _fill(off, 64, 8)
    assert not off.seal()
    with pytest.raises(RuntimeError):
        next(off.batches(8, seed=0))


def test_cache_of_a_language_model_shard_has_no_labels() -> None:
    cache = ShardCache(budget_bytes=10**6, expected_samples=8)
    cache.add(torch.arange(32).reshape(8, 4), None)
    assert cache.seal()
    (x, y), = list(cache.batches(8, seed=0))
    assert y is None and sorted(x[:, 0].tolist()) == [0, 4, 8, 12, 16, 20, 24, 28]


def test_eval_cache_keeps_every_batch_in_order_and_gives_up_over_budget() -> None:
    batches = [(torch.full((n, 4), float(i)), torch.full((n,), i)) for i, n in enumerate([8, 8, 3])]
    cache = EvalCache(budget_bytes=10**6)
    for x, y in batches:
        cache.add(x, y)
    assert cache.seal()
    kept = list(cache.batches())
    assert [len(y) for _, y in kept] == [8, 8, 3]  # the last partial batch too: every held-out row counts
    assert all(torch.equal(a[1], b[1]) for a, b in zip(kept, batches))
    small = EvalCache(budget_bytes=8 * 24 + 1)  # one batch of 8 x (4 floats + 1 int64) fits, two do not
    for x, y in batches:
        small.add(x, y)
    assert not small.seal() and not small.enabled
    with pytest.raises(RuntimeError):
        small.batches()


def test_an_epoch_that_reads_nothing_is_one_line_not_a_spin(monkeypatch: pytest.MonkeyPatch) -> None:
    # The data set's files removed while the job ran: a restarted group's shard yields no batch. The
    # loop used to start the next epoch at once, forever, and never reached a stop check.
    job = load_config(Path(__file__).resolve().parents[1] / "configs" / "digits.yaml")
    cfg = WorkerConfig.model_validate(job.localized().worker_config().model_dump(mode="json"))
    shard = SimpleNamespace(iter_torch_batches=lambda **_: iter(()))
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: shard)
    worker = SimpleNamespace(cfg=cfg, args=loop.LoopArgs(config={}, steps_per_epoch=10, total_steps=30), rank=0,
                             split=split_global_batch(64, workers=2, max_local_batch=None), device=None,
                             state=SimpleNamespace(step=10))
    with pytest.raises(UserError, match=r"^data: epoch 1 of the training set gave this worker no full batch of 32 rows"):
        loop._train(worker, None)
