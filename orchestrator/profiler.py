"""Profile a job on ONE worker: step time per local batch, memory, gradient bytes, data rate, noise.

The job's own model, loss, optimizer and Parquet pipeline run for a few timed steps at a doubling
ladder of local batch sizes, until the configured maximum, out-of-memory (recorded, never fatal)
or the time budget. The result is the planner's `Profile`, cached by (config digest, device).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import constants
from orchestrator.config import JobConfig
from orchestrator.planner import PROFILE_VERSION, Profile, ProfileSample

log = logging.getLogger(__name__)

WARMUP_STEPS = 2
TIMED_STEPS = 5
# Mini-batches whose gradient norms estimate the noise scale, at each of two batch sizes.
NOISE_BATCHES = 6


@dataclass(frozen=True, slots=True)
class LadderSettings:
    start: int
    limit: int
    budget_s: float


def ladder_settings(job: JobConfig) -> LadderSettings:
    # One worker never needs a local batch above the global batch (or the configured cap).
    limit = min(job.training.max_local_batch or job.training.global_batch_size, job.training.global_batch_size)
    start = max(1, min(8, limit))
    return LadderSettings(start=start, limit=limit, budget_s=constants.PROFILE_BUDGET_S)


def ladder(settings: LadderSettings) -> list[int]:
    sizes, b = [], settings.start
    while b < settings.limit:
        sizes.append(b)
        b *= 2
    return sizes + [settings.limit]


# ---------------------------------------------------------------------------------------------
# Measurement (runs where the worker runs: a GPU node, or this process on CPU)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _sample_rows(job: JobConfig, rows: int) -> dict[str, Any]:
    """Enough rows of the real data set, in memory, for the largest batch (repeated if short)."""
    import numpy as np

    from trainers.data import open_dataset

    columns = job.data.columns
    table = open_dataset(job.data.paths).head(rows, columns=columns)
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}
    reps = math.ceil(rows / max(len(table), 1))
    return {c: np.concatenate([v] * reps)[:rows] if reps > 1 else v for c, v in batch.items()}


class _Bench:
    """The job's model, loss and optimizer on one device, as the training loop builds them."""

    def __init__(self, job: JobConfig, device: Any) -> None:
        from trainers.data.collate import Collate
        from trainers.loop import make_optimizer
        from trainers.models import build_model

        self.job, self.device = job, device
        self.model = build_model(job.model.name, job.model.kwargs).to(device)
        self.optimizer = make_optimizer(self.model, job.training)
        self.collate = Collate(job.data)

    def batch(self, rows: dict[str, Any], size: int, offset: int = 0) -> tuple[Any, Any]:
        picked = {k: v[offset : offset + size] for k, v in rows.items()}
        x, y = self.collate(picked)
        return x.to(self.device), None if y is None else y.to(self.device)

    def forward_backward(self, x: Any, y: Any) -> None:
        from trainers.loop import autocast_for, compute_loss

        with autocast_for(self.device, self.job.training.precision):
            loss, _, _ = compute_loss(self.model, x, y)
        loss.backward()

    def grad_sq_norm(self) -> float:
        return float(sum(float(p.grad.float().pow(2).sum()) for p in self.model.parameters() if p.grad is not None))

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def time_batch(self, rows: dict[str, Any], size: int) -> ProfileSample:
        import torch

        x, y = self.batch(rows, size)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        fwd_bwd, opt = [], []
        for i in range(WARMUP_STEPS + TIMED_STEPS):
            t0 = time.perf_counter()
            self.forward_backward(x, y)
            _sync(self.device)
            t1 = time.perf_counter()
            self.step()
            _sync(self.device)
            if i >= WARMUP_STEPS:
                fwd_bwd.append(t1 - t0)
                opt.append(time.perf_counter() - t1)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        fb, op = statistics.median(fwd_bwd), statistics.median(opt)
        return ProfileSample(local_batch=size, step_time_s=fb + op, fwd_bwd_s=fb, optimizer_s=op, peak_memory_bytes=peak)


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
    if true_sq <= 0 or trace <= 0:
        return None  # too noisy to tell at these sizes
    return trace / true_sq


def _noise_scale(bench: _Bench, rows: dict[str, Any], sizes: tuple[int, int]) -> float | None:
    norms: dict[int, list[float]] = {}
    for size in sizes:
        norms[size] = []
        for i in range(NOISE_BATCHES):
            x, y = bench.batch(rows, size, offset=(i * size) % max(len(next(iter(rows.values()))) - size, 1))
            bench.forward_backward(x, y)
            norms[size].append(bench.grad_sq_norm())
            bench.optimizer.zero_grad(set_to_none=True)
    return gradient_noise_scale((sizes[0], norms[sizes[0]]), (sizes[1], norms[sizes[1]]))


def data_rate(job: JobConfig, *, batch_size: int, seconds: float) -> float:
    """Samples/s of the real Parquet pipeline (Ray Data -> torch batches), on its own."""
    import ray

    from trainers.data.collate import Collate

    ds = ray.data.read_parquet(job.data.paths)
    collate = Collate(job.data)
    count, start = 0, None
    for x, _ in ds.iter_torch_batches(batch_size=batch_size, collate_fn=collate, device="cpu"):
        if start is None:  # the first batch pays for starting the pipeline
            start = time.perf_counter()
            continue
        count += len(x)
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start if start else 0.0
    return count / elapsed if elapsed > 0 and count else 0.0


def device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def measure(job: JobConfig) -> dict[str, Any]:
    """Run the ladder on this process's device; returns Profile fields as a dict."""
    import torch

    from trainers.loop import seed_everything

    started = time.perf_counter()
    settings = ladder_settings(job)
    # Ray points CUDA_VISIBLE_DEVICES at the one GPU it assigned; a logical GPU without CUDA is the CPU.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(job.training.seed)
    bench = _Bench(job, device)
    sizes = ladder(settings)
    rows = _sample_rows(job, max(sizes) * 2)
    samples: list[ProfileSample] = []
    meta: dict[str, Any] = {"config_digest": job.digest(), "ladder": sizes}
    for size in sizes:
        try:
            samples.append(bench.time_batch(rows, size))
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if not _is_oom(exc):
                raise
            meta["oom_at_local_batch"] = size
            bench.optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            break
        if time.perf_counter() - started > settings.budget_s:
            meta["stopped_by_budget_at"] = size
            break
    if not samples:
        raise RuntimeError(f"profiling: even local batch {sizes[0]} does not fit on {device_name(device)}")
    fitted = [s.local_batch for s in samples]
    noise_sizes = (fitted[0], fitted[-1]) if len(fitted) > 1 else (max(fitted[0] // 4, 1), fitted[0])
    noise = _noise_scale(bench, rows, noise_sizes)
    params = [p for p in bench.model.parameters() if p.requires_grad]
    rate = data_rate(job, batch_size=fitted[-1], seconds=constants.PROFILE_DATA_S)
    meta["profile_seconds"] = round(time.perf_counter() - started, 3)
    return {
        "version": PROFILE_VERSION,
        "model": job.model.name,
        "device": device_name(device),
        "param_count": sum(p.numel() for p in params),
        "grad_bytes": sum(p.numel() * p.element_size() for p in params),
        "samples": [s.to_dict() for s in samples],
        "max_local_batch": fitted[-1],  # the largest measured batch that fitted
        "data_samples_per_s": rate or None,
        "gradient_noise_scale": noise,
        "precision": _precision(job, device),
        "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
        "meta": meta,
    }


def _precision(job: JobConfig, device: Any) -> str:
    if job.training.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return job.training.precision


# ---------------------------------------------------------------------------------------------
# Driver side: cache, run on one Ray worker


def cache_path(job: JobConfig, device_key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_key).strip("-").lower()
    return Path(job.checkpoint.storage_path) / "profiles" / f"{job.digest()}-{slug}.json"


def device_key(use_gpu: bool) -> str:
    """What the profile's device will be, known before profiling (for the cache)."""
    import ray

    if not use_gpu:
        return "cpu"
    types = sorted(k.split(":", 1)[1] for k in ray.cluster_resources() if k.startswith("accelerator_type:"))
    return "gpu-" + "-".join(types) if types else "gpu"


def profile_job(job: JobConfig, *, use_gpu: bool, refresh: bool = False) -> tuple[Profile, bool]:
    """The job's profile, from the cache or measured on one Ray worker; returns (profile, cached)."""
    import ray

    path = cache_path(job, device_key(use_gpu))
    if path.is_file() and not refresh:
        return Profile.load(path), True
    task = ray.remote(num_cpus=job.resources.cpus_per_worker, num_gpus=1 if use_gpu else 0)(_measure_remote)
    profile = Profile.from_dict(ray.get(task.remote(job.localized().to_dict())))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return profile, False


def _measure_remote(job: dict[str, Any]) -> dict[str, Any]:
    return measure(JobConfig.model_validate(job))
