"""The profiler's worker half: what one device measures of a job, with the step that trains.

`measure` runs the job's own model, loss, optimizer and training step (`trainers.step.TrainStep`:
precision, compile, clipping) for a few timed steps at a doubling ladder of local batch sizes,
until the configured maximum, out-of-memory (recorded, never fatal) or a time budget; then the
gradient noise scale and the data pipeline's rate. `time_steps` is one of the g workers of a
node-level measurement: all the GPUs (or CPU slots) of one node stepping at once without gradient
sync, so what they share (the CPU data pipeline, PCIe, memory bandwidth) shows in their step time.
The driver half (`orchestrator.profiler`) caches, schedules and assembles the profile.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from trainers.config import WorkerConfig
from trainers.data import open_dataset
from trainers.data.collate import Collate
from trainers.models import build_model
from trainers.step import TrainStep, compiled, eager, make_optimizer, seed_everything

WARMUP_STEPS = 2
TIMED_STEPS = 5
# Mini-batches whose gradient norms estimate the noise scale, at each of two batch sizes.
NOISE_BATCHES = 6


@dataclass(frozen=True, slots=True)
class Ladder:
    start: int
    limit: int
    budget_s: float

    @classmethod
    def for_job(cls, cfg: WorkerConfig, budget_s: float) -> Ladder:
        # One worker never needs a local batch above the global batch (or the configured cap).
        t = cfg.training
        limit = min(t.max_local_batch or t.global_batch_size, t.global_batch_size)
        return cls(start=max(1, min(8, limit)), limit=limit, budget_s=budget_s)

    def sizes(self) -> list[int]:
        sizes, b = [], self.start
        while b < self.limit:
            sizes.append(b)
            b *= 2
        return sizes + [self.limit]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free(step: TrainStep, device: torch.device) -> None:
    """After a step ran out of memory: drop its gradients and give CUDA's cached blocks back."""
    step.discard()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sample_rows(cfg: WorkerConfig, rows: int) -> dict[str, Any]:
    """Enough rows of the real data set, in memory, for the largest batch (repeated if short)."""
    import numpy as np

    columns = cfg.data.columns
    table = open_dataset(cfg.data.paths).head(rows, columns=columns)
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}
    reps = math.ceil(rows / max(len(table), 1))
    return {c: np.concatenate([v] * reps)[:rows] if reps > 1 else v for c, v in batch.items()}


class Bench:
    """The job's model, optimizer and training step on one device, as a worker builds them."""

    def __init__(self, cfg: WorkerConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.model = build_model(cfg.model.name, cfg.model.kwargs).to(device)
        self.optimizer = make_optimizer(self.model, cfg.training)
        self.step = TrainStep(compiled(self.model, cfg.training), self.optimizer, cfg=cfg.training, device=device)
        # Gradient norms for the noise scale are statistics, not timings: the module run eagerly
        # (`_noise_scale`) gives the same gradients without compiling two more batch shapes.
        self.plain = TrainStep(self.model, self.optimizer, cfg=cfg.training, device=device)
        self.collate = Collate(cfg.data)

    def batch(self, rows: dict[str, Any], size: int, offset: int = 0) -> tuple[Any, Any]:
        x, y = self.collate({k: v[offset: offset + size] for k, v in rows.items()})
        return x.to(self.device), None if y is None else y.to(self.device)

    def time_batch(self, rows: dict[str, Any], size: int, steps: int = TIMED_STEPS) -> dict[str, Any]:
        """Median forward+backward and optimizer seconds of `steps` steps at local batch `size`."""
        micro = [self.batch(rows, size)]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        fwd_bwd, opt = [], []
        for i in range(WARMUP_STEPS + steps):
            t0 = time.perf_counter()
            self.step.accumulate(micro)
            _sync(self.device)
            t1 = time.perf_counter()
            self.step.apply()
            _sync(self.device)
            if i >= WARMUP_STEPS:
                fwd_bwd.append(t1 - t0)
                opt.append(time.perf_counter() - t1)
        fb, op = statistics.median(fwd_bwd), statistics.median(opt)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        sample = {"local_batch": size, "step_time_s": fb + op, "fwd_bwd_s": fb, "optimizer_s": op}
        return sample | ({"peak_memory_bytes": peak} if peak is not None else {})

    def fits(self, rows: dict[str, Any], size: int) -> bool:
        """Whether one step at local batch `size` fits in device memory: one step of the module run
        eagerly (nothing compiled for the shape, nothing timed). Eager holds at least what the
        compiled step does (compilation fuses away intermediates), so a fit here is a fit there."""
        try:
            with eager():  # blocks compiled in place (step.compiled) run eagerly too
                self.plain.accumulate([self.batch(rows, size)])
                self.plain.apply()
            _sync(self.device)
            return True
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if not _is_oom(exc):
                raise
            _free(self.plain, self.device)
            return False

    def grad_sq_norm(self) -> float:
        return float(sum(float(p.grad.float().pow(2).sum()) for p in self.model.parameters() if p.grad is not None))


def gradient_noise_scale(small: tuple[int, list[float]], big: tuple[int, list[float]]) -> float | None:
    """B_simple = tr(Sigma) / |G|^2 from mean squared gradient norms at two batch sizes.

    E|G_B|^2 = |G|^2 + tr(Sigma)/B (McCandlish et al. 2018, appendix A.1): two batch sizes give
    two equations for the true gradient norm |G|^2 and the per-sample variance tr(Sigma).
    """
    (b_small, n_small), (b_big, n_big) = small, big
    if b_big <= b_small or not n_small or not n_big:
        return None
    g_small, g_big = statistics.fmean(n_small), statistics.fmean(n_big)
    true_sq = (b_big * g_big - b_small * g_small) / (b_big - b_small)
    trace = (g_small - g_big) / (1 / b_small - 1 / b_big)
    if not (true_sq > 0 and trace > 0):  # NaN fails this too (gradients of weights the timed steps blew up)
        return None  # too noisy to tell at these sizes
    scale = trace / true_sq
    return scale if math.isfinite(scale) else None


def _noise_scale(bench: Bench, rows: dict[str, Any], sizes: tuple[int, int]) -> float | None:
    available = len(next(iter(rows.values())))
    norms: dict[int, list[float]] = {}
    with eager():  # blocks compiled in place (step.compiled) run eagerly: no compile of these shapes
        for size in sizes:
            norms[size] = []
            for i in range(NOISE_BATCHES):
                bench.plain.accumulate([bench.batch(rows, size, offset=(i * size) % max(available - size, 1))])
                norms[size].append(bench.grad_sq_norm())
                bench.plain.discard()
    return gradient_noise_scale((sizes[0], norms[sizes[0]]), (sizes[1], norms[sizes[1]]))


def data_rate(cfg: WorkerConfig, *, batch_size: int, seconds: float) -> float:
    """Samples/s of the real Parquet pipeline (Ray Data -> torch batches), on its own."""
    import ray

    from trainers.data.arrow_collate import ArrowCollate

    collate = ArrowCollate(cfg.data)
    count, start = 0, None
    ds = ray.data.read_parquet(cfg.data.paths, partitioning=None)  # as the job reads it (driver.data)
    for x, _ in ds.iter_torch_batches(batch_size=batch_size, collate_fn=collate, device="cpu"):
        if start is None:  # the first batch pays for starting the pipeline
            start = time.perf_counter()
            continue
        count += len(x)
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start if start else 0.0
    return count / elapsed if elapsed > 0 and count else 0.0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def this_device() -> torch.device:
    # Ray points CUDA_VISIBLE_DEVICES at the one GPU it assigned; a logical GPU without CUDA is the CPU.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precision(cfg: WorkerConfig, device: torch.device) -> str:
    if cfg.training.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.training.precision


def measure(config: dict[str, Any], *, budget_s: float, data_s: float) -> dict[str, Any]:
    """Run the ladder on this process's device; returns Profile fields as a dict."""
    cfg = WorkerConfig.model_validate(config)
    started = time.perf_counter()
    ladder = Ladder.for_job(cfg, budget_s)
    device = this_device()
    seed_everything(cfg.training.seed)
    bench = Bench(cfg, device)
    sizes = ladder.sizes()
    rows = sample_rows(cfg, max(sizes) * 2)
    samples, meta = _climb(bench, rows, sizes, started, ladder.budget_s, check_fit=device.type == "cuda")
    fitted = [s["local_batch"] for s in samples]
    noise_sizes = (fitted[0], fitted[-1]) if len(fitted) > 1 else (max(fitted[0] // 4, 1), fitted[0])
    params = [p for p in bench.model.parameters() if p.requires_grad]
    result = {
        "model": cfg.model.name, "device": device_name(device), "param_count": sum(p.numel() for p in params),
        "grad_bytes": sum(p.numel() * p.element_size() for p in params), "samples": samples,
        # the largest batch that fitted: measured, or past the time budget checked by one step
        "max_local_batch": max(fitted[-1], *meta.get("fits_unmeasured", [0])),
        "gradient_noise_scale": _noise_scale(bench, rows, noise_sizes),
        # (data_s 0: no Ray Data here, e.g. a GPU check without Ray)
        "data_samples_per_s": (data_rate(cfg, batch_size=fitted[-1], seconds=data_s) or None) if data_s > 0 else None,
        "precision": precision(cfg, device),
        "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
    }
    # The global batch the profile was taken for: `orchestrator plan` holds it, as `run` does.
    meta.update(ladder=sizes, global_batch_size=cfg.training.global_batch_size,
                profile_seconds=round(time.perf_counter() - started, 3))
    return {**result, "meta": meta}


def _climb(bench: Bench, rows: dict[str, Any], sizes: list[int], started: float, budget_s: float, *,
           check_fit: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Time each rung until OOM or the budget. Past the budget, with `check_fit` (a GPU, whose
    memory is what limits the local batch), the rungs left are only checked to fit, one untimed
    step each, so that a slow first rung (compiling) does not leave max_local_batch at it; the
    planner then extrapolates their step time from the measured rungs (proportionally: cautious)."""
    samples: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    for size in sizes:
        try:
            samples.append(bench.time_batch(rows, size))
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if not _is_oom(exc):
                raise
            meta["oom_at_local_batch"] = size
            _free(bench.step, bench.device)
            break
        if time.perf_counter() - started > budget_s:
            meta["stopped_by_budget_at"] = size
            rest = sizes[sizes.index(size) + 1:] if check_fit else []
            fits = list(itertools.takewhile(lambda b: bench.fits(rows, b), rest))
            if fits:
                meta["fits_unmeasured"] = fits
            if len(fits) < len(rest):
                meta["oom_at_local_batch"] = rest[len(fits)]
            break
    if not samples:
        raise RuntimeError(f"profiling: even local batch {sizes[0]} does not fit on {device_name(bench.device)}")
    return samples, meta


def time_steps(config: dict[str, Any], *, local_batch: int, steps: int, barrier: Any = None,
               wait_s: float = 60.0) -> list[tuple[float, float]]:
    """One of a node's workers stepping beside the others, no gradient sync: (wall-clock start,
    seconds) of each of `steps` steps after warm-up. The driver keeps the steps that ran while
    every worker was stepping (`overlapping_median`). `barrier` (the driver's actor) holds each
    worker after its warm-up until all have warmed up, for at most `wait_s`: their start-ups (a
    process, the model, compiling) differ by seconds, longer than the timed steps take."""
    cfg = WorkerConfig.model_validate(config)
    device = this_device()
    bench = Bench(cfg, device)
    micro = [bench.batch(sample_rows(cfg, local_batch), local_batch)]

    def step() -> None:
        bench.step(micro)
        _sync(device)

    return stepping(step, steps=steps, ready=lambda: _arrive(barrier, wait_s) if barrier is not None else None)


def stepping(step: Callable[[], None], *, steps: int, ready: Callable[[], None]) -> list[tuple[float, float]]:
    """(wall-clock start, seconds) of `steps` steps, timed once warmed up and `ready` returned."""
    for _ in range(WARMUP_STEPS):
        step()
    ready()
    timed = []
    for _ in range(steps):
        wall, t0 = time.time(), time.perf_counter()
        step()
        timed.append((wall, time.perf_counter() - t0))
    return timed


def _arrive(barrier: Any, wait_s: float) -> None:
    import ray

    try:
        ray.get(barrier.wait.remote(), timeout=wait_s)
    except ray.exceptions.GetTimeoutError:
        pass  # a worker never came (it failed to start): the steps that overlap, if any, are what there is


def overlapping_median(workers: list[list[tuple[float, float]]]) -> float | None:
    """Median step time over the steps that started while every worker was stepping."""
    begin = max(steps[0][0] for steps in workers)
    end = min(steps[-1][0] + steps[-1][1] for steps in workers)
    inside = [seconds for steps in workers for wall, seconds in steps if begin <= wall and wall + seconds <= end]
    return statistics.median(inside) if inside else None
