"""Data pipeline: Parquet -> torch batches on Ray Data, against what the trainer consumes.

For each default config, at the local batch 2 workers use:

* loader: ``ray.data.read_parquet`` + ``iter_torch_batches`` with the loop's collate and shuffle
  buffer, one consumer over the whole data set, after a warm-up pass; samples/s once the first
  batch is out (the time to that first batch is in the notes);
* trainer: what 2 workers consume at their best step rate, the compute alone (forward, backward,
  optimizer on a batch in memory, one thread each, as Ray gives a 1-CPU worker);
* in memory: the same tensors indexed out of memory, the fastest a loader can be.

The loader is not the bottleneck when loader/trainer >= 1. On this 2-core machine loader and
trainer share the cores; on a GPU node the loader has CPUs of its own.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from benchmarks.harness import Row, SectionResult, Stat, Workspace, paired_ratios
from benchmarks.raw_ddp import load_tensors
from benchmarks.workloads import Workload

Tensors = tuple[torch.Tensor, torch.Tensor | None]

SECTION = "data"
WORKERS = 2
TIMED_STEPS = 3
PASSES = 2  # timed loader passes per config, after one warm-up pass (a pass restarts the pipeline)


def measure(ws: Workspace, workloads: list[Workload], *, repeats: int = PASSES) -> SectionResult:
    result = SectionResult()
    for workload in workloads:
        rows, details = _compare(workload, workload.prepare(ws), repeats=repeats)
        result.rows += rows
        result.details[workload.name] = details
    return result


def _compare(workload: Workload, job: Any, *, repeats: int) -> tuple[list[Row], dict[str, Any]]:
    local = max(job.training.global_batch_size // WORKERS, 1)
    loads = loader_passes(job, local, repeats=repeats)
    rates = [rate for rate, _ in loads]
    tensors = load_tensors(job)
    memory = [memory_rate(tensors, local) for _ in range(repeats)]
    step_s = compute_step_time(job, tensors, local)
    trainer = WORKERS * local / step_s
    headroom = Stat.of([rate / trainer for rate in rates])
    rows = [
        Row(section=SECTION, measure=f"{workload.name}: loader vs trainer's best step rate", unit="samples/s",
            ours=Stat.of(rates), baseline=Stat.of([trainer]),
            baseline_label=f"trainer, {WORKERS} x {local} per {step_s * 1e3:.1f} ms",
            ratio=headroom, ratio_label="loader/trainer", goal=">= 1", met=headroom.median >= 1.0,
            note=" ".join(filter(None, [workload.note, _first_batch_note(loads)]))),
        Row(section=SECTION, measure=f"{workload.name}: loader vs in-memory tensors", unit="samples/s",
            ours=Stat.of(rates), baseline=Stat.of(memory), baseline_label="tensors in memory",
            ratio=paired_ratios(rates, memory), ratio_label="loader/in-memory"),
    ]
    details = {"local_batch": local, "compute_step_s": step_s, "trainer_samples_per_s": trainer,
               "loader_samples_per_s": rates, "loader_first_batch_s": [first for _, first in loads],
               "in_memory_samples_per_s": memory}
    return rows, details


def _first_batch_note(loads: list[tuple[float, float]]) -> str:
    first = statistics.median(f for _, f in loads)
    return f"first batch of a pass after {first:.1f} s (pipeline start, left out of the rate)"


def loader_passes(job: Any, local_batch: int, *, repeats: int) -> list[tuple[float, float]]:
    """(samples/s after the first batch, seconds to the first batch) of `repeats` passes over the
    data, after one warm-up pass (which also pays for listing the files)."""
    import ray

    ds = ray.data.read_parquet(job.data.paths)
    return [_one_pass(ds, job, local_batch) for _ in range(repeats + 1)][1:]


def _one_pass(ds: Any, job: Any, local_batch: int) -> tuple[float, float]:
    from trainers.data.arrow_collate import ArrowCollate

    batches = ds.iter_torch_batches(
        batch_size=local_batch, drop_last=True, collate_fn=ArrowCollate(job.data),
        local_shuffle_buffer_size=max(4 * local_batch, 256), local_shuffle_seed=0,
    )
    started = time.perf_counter()
    first_at, count = None, 0
    for x, _ in batches:
        if first_at is None:
            first_at = time.perf_counter()
            continue
        count += len(x)
    elapsed = time.perf_counter() - (first_at or started)
    return (count / elapsed if elapsed > 0 else 0.0), (first_at or started) - started


def memory_rate(tensors: Tensors, local_batch: int) -> float:
    """Samples/s of shuffled batches indexed out of tensors in memory (what raw_ddp.py feeds)."""
    x, y = tensors
    started = time.perf_counter()
    order = torch.randperm(len(x))
    count = 0
    for start in range(0, len(x) - local_batch + 1, local_batch):
        idx = order[start:start + local_batch]
        inputs, _ = x[idx], None if y is None else y[idx]
        count += len(inputs)
    return count / (time.perf_counter() - started)


def compute_step_time(job: Any, tensors: Tensors, local_batch: int) -> float:
    """Median seconds of forward + backward + optimizer step on one thread, data in memory."""
    import torch.nn.functional as F

    from trainers.step import make_optimizer
    from trainers.models import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model(job.model.name, job.model.kwargs)
        optimizer = make_optimizer(model, job.training)
        x, y = tensors
        x, y = x[:local_batch], None if y is None else y[:local_batch]
        inputs, targets = (x[:, :-1], x[:, 1:]) if y is None else (x, y)
        times = []
        for _ in range(1 + TIMED_STEPS):
            started = time.perf_counter()
            logits = model(inputs)
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
        return statistics.median(times[1:])
    finally:
        torch.set_num_threads(threads)
