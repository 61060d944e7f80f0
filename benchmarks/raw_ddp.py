"""A raw PyTorch DDP loop: the baseline our trainer is held to.

The job's model (``build_model``), optimizer, learning-rate schedule, gradient clipping, precision,
``torch.compile`` setting and global batch, on the training split of the same Parquet held in
memory as tensors. ``torch.distributed`` (gloo on CPU, NCCL on GPU) between processes started with
``torch.multiprocessing``. Nothing else: no Ray, no data pipeline, no tracking, no checkpoints,
no per-step ``loss.item()``.

Step time is what our loop measures: the time between optimizer steps. On CUDA a single step's
time is only the host's share (kernels run asynchronously), so the whole timed window is also
measured between two synchronisations; compare means there.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from orchestrator.config import JobConfig


@dataclass(frozen=True, slots=True)
class RawResult:
    step_times: list[float]  # rank 0, every optimizer step
    window_s: float  # wall time of the steps after `warmup`, between two device synchronisations
    window_steps: int
    peak_memory_bytes: int | None  # CUDA only


# Ray's core worker raises its own niceness by this much (nice(2): relative to the raylet's, which is
# that of whoever started Ray, the benchmark here); the raw processes raise theirs by as much from
# the benchmark's, so both sides run at the same priority on a shared machine. (From a shell at
# niceness -10 both run at 5; an absolute 15 left raw DDP below Ray's workers there.)
RAY_WORKER_NICENESS = int(os.environ.get("RAY_worker_niceness", "15"))


def run_raw_ddp(job: JobConfig, *, workers: int, steps: int, warmup: int = 5, device: str = "cpu",
                threads: int = 1) -> RawResult:
    """Train `steps` optimizer steps on `workers` processes; returns rank 0's timings.

    `threads` is torch's intra-op thread count per process: Ray gives a 1-CPU worker one
    (OMP_NUM_THREADS=1), so the comparison runs the same.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    mp.start_processes(_worker, args=(workers, job.to_dict(), steps, warmup, device, threads, port, queue),
                       nprocs=workers, join=True, start_method="spawn")
    return queue.get()


def load_tensors(job: JobConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training split as tensors, converted by the loop's own collate (same dtypes, shapes)."""
    import pyarrow.dataset as pads

    from trainers.data.collate import Collate

    files = sorted(str(f) for p in job.data.paths for f in _parquet_files(p))
    table = pads.dataset(files, format="parquet").to_table(columns=job.data.columns)
    x, y = Collate(job.data)(table)
    # Ray Data's train_test_split keeps the first rows for training, as here.
    keep = len(x) - int(len(x) * job.data.val_fraction)
    return x[:keep], None if y is None else y[:keep]


def _parquet_files(path: str) -> list[Any]:
    from pathlib import Path

    root = Path(path)
    return [root] if root.is_file() else sorted(root.rglob("*.parquet"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, job_dict: dict[str, Any], steps: int, warmup: int, device_type: str,
            threads: int, port: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.nice(RAY_WORKER_NICENESS)
    torch.set_num_threads(threads)
    device = torch.device(f"cuda:{rank}" if device_type == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        result = _train(rank, world, JobConfig.model_validate(job_dict), steps=steps, warmup=warmup, device=device)
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:
        queue.put(result)


def _train(rank: int, world: int, job: JobConfig, *, steps: int, warmup: int, device: torch.device) -> RawResult:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainers.step import make_optimizer, make_scheduler
    from trainers.models import build_model

    cfg = job.training
    torch.manual_seed(cfg.seed)
    raw_model = build_model(job.model.name, job.model.kwargs).to(device)
    optimizer = make_optimizer(raw_model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps)
    model: Any = DDP(raw_model) if world > 1 else raw_model
    if cfg.compile:
        model = torch.compile(model)
    x, y = load_tensors(job)
    x, y = x[rank::world].to(device), None if y is None else y[rank::world].to(device)
    local = cfg.global_batch_size // world
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    generator = torch.Generator().manual_seed(cfg.seed + rank)

    times: list[float] = []
    window_start = 0.0
    tick = time.perf_counter()
    while len(times) < steps:
        order = torch.randperm(len(x), generator=generator).to(device)
        for start in range(0, len(x) - local + 1, local):
            if len(times) == steps:
                break
            idx = order[start:start + local]
            inputs, targets = (x[idx][:, :-1], x[idx][:, 1:]) if y is None else (x[idx], y[idx])
            with autocast:
                logits = model(inputs)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            now = time.perf_counter()
            times.append(now - tick)
            tick = now
            if len(times) == warmup:
                _sync(device)
                window_start = tick = time.perf_counter()
    _sync(device)
    window = time.perf_counter() - window_start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return RawResult(times, window, steps - warmup, peak)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
