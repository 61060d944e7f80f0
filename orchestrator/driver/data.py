"""The job's data, on the driver: check it before any worker starts, then hand Ray Data's
training and validation sets to the trainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.config import JobConfig
from orchestrator.errors import UserError
from trainers.config import MAX_SAMPLES


@dataclass(frozen=True)
class Datasets:
    train: Any
    val: Any | None  # None without held-out rows: no validation set, no evaluation
    train_rows: int
    example: Any  # a few input rows, for the MLflow model signature


def check_data(job: JobConfig) -> int:
    """Prepare a built-in data set if missing, then check columns and dtypes, and that the model
    takes the features and the targets are in range; returns row count."""
    from trainers.compat import check_fit
    from trainers.data import ensure_prepared

    if job.data.dataset is not None:  # one folder (checked at validation)
        ensure_prepared(job.data.dataset, job.data.paths[0], **job.data.dataset_kwargs)
    return check_fit(job.model, job.data)


def load_datasets(job: JobConfig) -> Datasets:
    """Ray Data's sets (paths already absolute: the job is localized) and an input example.

    The held-out rows are chosen by a seeded hash of each row (`trainers.data.split`): nothing is
    read through Ray Data before training; the training rows are counted here with pyarrow."""
    import ray.data

    from trainers.data import open_dataset
    from trainers.data.split import Side, count_sides

    # No hive partitioning (Ray Data's default): it reads every key=value folder on the path as a
    # column, and puts the folder's value over a file's own column of that name (all labels 7 under
    # /data/label=7/), which `validate` never sees; the files' own columns are what it checks.
    ds = ray.data.read_parquet(job.data.paths, partitioning=None)
    if not job.data.val_fraction:
        return Datasets(ds, None, open_dataset(job.data.paths).count_rows(), input_example(job))
    seed = job.training.seed
    train = ds.map_batches(Side(job.data, seed, validation=False), batch_format="pyarrow", batch_size=None)
    val = ds.map_batches(Side(job.data, seed, validation=True), batch_format="pyarrow", batch_size=None)
    train_rows, _ = count_sides(open_dataset(job.data.paths), job.data, seed)
    return Datasets(train, val, train_rows, input_example(job))


def input_example(job: JobConfig) -> Any:
    """The model's input example (its MLflow signature): the first rows, read by pyarrow directly
    rather than by one more Ray Data job."""
    import numpy as np

    from trainers.data import open_dataset
    from trainers.data.collate import Collate

    x, _ = Collate(job.data)(open_dataset(job.data.paths).head(4, columns=job.data.columns))
    if job.data.label is None:
        x = x[:, :-1].contiguous()  # the model sees tokens without the last target
    return np.asarray(x.numpy())


def steps_per_epoch(train_rows: int, global_batch: int) -> int:
    if train_rows < global_batch:
        raise UserError(
            f"training.global_batch_size: {global_batch} is larger than the {train_rows} training rows"
        )
    return train_rows // global_batch


def check_batch_fits(job: JobConfig, rows: int) -> str | None:
    """`validate`'s check of the global batch against the `rows` its Parquet footers count (no
    data read): with no rows held out, `run`'s error; with some, an error where the batch exceeds
    even all rows, else a note where it exceeds the training rows the split leaves on average.
    The split's exact count hashes every row: `run` makes it (`steps_per_epoch`)."""
    batch, share = job.training.global_batch_size, job.data.val_fraction
    if not share:
        steps_per_epoch(rows, batch)
        return None
    if rows < batch:
        raise UserError(f"training.global_batch_size: {batch} is larger than all {rows} rows (the training rows "
                        f"are fewer: data.val_fraction is {share:g})")
    expected = rows * (1 - share)
    if batch <= expected:
        return None
    return (f"note: training.global_batch_size: {batch} is more than the ~{expected:,.0f} training rows that "
            f"data.val_fraction {share:g} leaves of {rows} on average; `run` counts them and refuses a batch "
            "larger than those")


def total_steps(job: JobConfig, per_epoch: int) -> int:
    t = job.training
    by_epochs = t.epochs * per_epoch if t.epochs is not None else None
    steps = min(s for s in (t.max_steps, by_epochs) if s is not None)
    if steps * t.global_batch_size > MAX_SAMPLES:
        field = "max_steps" if steps == t.max_steps else "epochs"
        raise UserError(f"training.{field}: {steps:,} steps of {t.global_batch_size:,} samples is more than "
                        f"2**53 samples; no job runs that long")
    return steps
