"""Two waits of every job, before and after, side by side: the held-out split and the model's
registration.

- split: Ray Data's ``train_test_split`` materializes the whole data set before the first step
  (what the driver did); the seeded hash split (`trainers.data.split`) reads nothing through Ray
  Data before training and counts the training rows with pyarrow (what it does now). Timed from
  the driver's call to the training row count it needs.
- registration: ``mlflow.pytorch.log_model`` infers the pip requirements in a subprocess unless
  given them (what the driver did); the driver now gives the ones it knows
  (`orchestrator.driver.registration.requirements`). Both log the same model with the same input
  example to a sqlite store.

Each pair runs back to back, the order alternating, `repeats` times.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.harness import Row, SectionResult, Stat, Workspace, paired_ratios
from benchmarks.workloads import Workload

SECTION = "start-up parts"


def _split_before(job: Any) -> int:
    import ray.data

    train, _ = ray.data.read_parquet(job.data.paths).train_test_split(test_size=job.data.val_fraction)
    return train.count()


def _split_after(job: Any) -> int:
    from orchestrator.driver.data import load_datasets

    return load_datasets(job).train_rows


def _register(job: Any, uri: str, *, known: bool) -> None:
    import mlflow

    from orchestrator.driver.data import input_example
    from orchestrator.driver.registration import requirements
    from trainers.models import build_model

    mlflow.set_tracking_uri(uri)
    model = build_model(job.model.name, job.model.kwargs).eval()
    with mlflow.start_run():
        mlflow.pytorch.log_model(model, name="model", input_example=input_example(job),
                                 **({"pip_requirements": requirements()} if known else {}))


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _pairs(before: Any, after: Any, repeats: int) -> tuple[list[float], list[float]]:
    times: dict[str, list[float]] = {"before": [], "after": []}
    for i in range(repeats):
        for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
            times[name].append(_timed(before if name == "before" else after))
    return times["before"], times["after"]


def measure(ws: Workspace, workloads: list[Workload], *, repeats: int) -> SectionResult:
    """Needs a connected Ray (the per-step benchmark's local one)."""
    result = SectionResult()
    for workload in workloads:
        job = workload.prepare(ws).localized()
        before, after = _pairs(lambda: _split_before(job), lambda: _split_after(job), repeats)
        result.rows.append(Row(
            section=SECTION, measure=f"{workload.name}: held-out split to the training row count", unit="s",
            ours=Stat.of(after), baseline=Stat.of(before), baseline_label="train_test_split + count",
            ratio=paired_ratios(before, after), ratio_label="before/after"))
    job = workloads[0].prepare(ws)
    uri = f"sqlite:///{ws.root / 'register.db'}"
    before, after = _pairs(lambda: _register(job, uri, known=False), lambda: _register(job, uri, known=True), repeats)
    result.rows.append(Row(
        section=SECTION, measure=f"{workloads[0].name}: log the model (MLflow)", unit="s", ours=Stat.of(after),
        baseline=Stat.of(before), baseline_label="requirements inferred", ratio=paired_ratios(before, after),
        ratio_label="before/after"))
    result.notes.append(f"each pair back to back, {repeats} times, the order alternating; the split on a connected "
                        "local Ray")
    return result
