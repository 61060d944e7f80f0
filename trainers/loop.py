"""`train_loop_per_worker` for Ray Train V2's TorchTrainer: the whole loop, top to bottom.

Ray Train owns the worker group, the process group (DDP) and checkpoint persistence; this loop
owns the model, the optimizer, the data order and what a step means. The global batch stays what
the config says for any worker count: local batch and gradient accumulation are recomputed from
the world size at every (re)start.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from orchestrator import constants
from orchestrator.config import JobConfig, TrainingConfig
from trainers import checkpoint as ckpt
from trainers.batching import BatchSplit, split_global_batch
from trainers.data.cache import ShardCache
from trainers.data.collate import Collate
from trainers.metric_sink import DeferredSink
from trainers.models import build_model

log = logging.getLogger(__name__)

# Ranks agree on "stop now" (SIGTERM/Ctrl-C on the driver, or a resize) every this many optimizer steps.
STOP_CHECK_EVERY = 5
# The observed step time is the median of at most this many recent steps.
OBSERVED_WINDOW = 50


@dataclass(frozen=True, slots=True)
class LoopArgs:
    """What the driver hands every worker (sent as a plain dict through train_loop_config)."""

    job: dict[str, Any]
    steps_per_epoch: int
    total_steps: int
    run_id: str | None = None
    tracking_uri: str | None = None
    max_local_batch: int | None = None
    progress: Any = None  # ActorHandle of the driver's progress actor
    spill_dir: str = "."


def device_for_worker() -> torch.device:
    # Ray may assign a logical GPU on a machine whose torch has no CUDA: use the CPU then.
    return ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, *, cfg: TrainingConfig, total_steps: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.lr_schedule == "linear":
        return max(1.0 - progress, 0.0)
    return 1.0


def compute_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean loss, number correct, count): classification, or next-token prediction when y is None."""
    if y is None:
        x, y = x[:, :-1], x[:, 1:]
    logits = model(x)
    logits = logits.reshape(-1, logits.shape[-1])
    y = y.reshape(-1)
    loss = F.cross_entropy(logits.float(), y)
    correct = (logits.argmax(dim=-1) == y).sum()
    return loss, correct, y.numel()


def autocast_for(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, *, device: torch.device, precision: str) -> dict[str, float]:
    # The unwrapped model: DDP's forward would sync buffers, and shards may differ in length.
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for x, y in batches:
        x, y = x.to(device), None if y is None else y.to(device)
        with autocast_for(device, precision):
            loss, correct, count = compute_loss(model, x, y)
        sums += torch.tensor([loss.item() * count, correct.item(), count], dtype=torch.float64)
    model.train()
    if dist.is_initialized():
        dist.all_reduce(sums)
    if sums[2] == 0:
        return {}
    return {"val/loss": float(sums[0] / sums[2]), "val/accuracy": float(sums[1] / sums[2])}


class StopSignal:
    """All ranks agree, at the same step, on whether the driver asked to stop (SIGTERM/Ctrl-C, or
    a resize), without stalling a step for it.

    Every STOP_CHECK_EVERY steps each rank starts an asynchronous MAX all-reduce of rank 0's latest
    answer and acts on the one it started the round before (by then long finished): a stop lands
    at most two rounds after the driver asks. Rank 0 asks the driver's actor without waiting, at
    most once per PROGRESS_PUSH_S.
    """

    def __init__(self, progress: Any, rank: int) -> None:
        self._progress, self._rank = progress, rank
        self._asking: Any = None  # rank 0's unanswered question to the actor
        self._ask = Throttle(constants.PROGRESS_PUSH_S)
        self._requested = False  # rank 0's latest answer
        self._round: tuple[torch.Tensor, Any] | None = None  # the all-reduce in flight

    def should_stop(self, step: int) -> bool:
        if self._progress is None or step % STOP_CHECK_EVERY:
            return False
        if self._rank == 0:
            self._poll_driver()
        if not dist.is_initialized():
            return self._requested
        decided = self._finish_round()
        flag = torch.tensor([1.0 if self._requested else 0.0])
        self._round = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True))
        return decided

    def close(self) -> None:
        """Wait for the all-reduce in flight (every rank started it, so it completes)."""
        self._finish_round()

    def _finish_round(self) -> bool:
        if self._round is None:
            return False
        flag, work = self._round
        self._round = None
        work.wait()
        return bool(flag.item())

    def _poll_driver(self) -> None:
        if self._asking is not None:
            ready, _ = ray.wait([self._asking], timeout=0)
            if not ready:
                return
            self._requested = self._requested or bool(ray.get(ready[0]))
            self._asking = None
        if self._ask.due():
            self._asking = self._progress.stop_requested.remote()


@dataclass
class TrainState:
    model: torch.nn.Module  # unwrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0

    def to_dict(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "rng": ckpt.rng_state(),
            **extra,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        ckpt.restore_rng(state["rng"])


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a (re)started worker group picked up: the step, the folder, and corrupt ones passed over."""

    step: int
    checkpoint: str
    skipped: tuple[str, ...] = ()

    @property
    def note(self) -> str:
        note = f"resumed from step {self.step} ({self.checkpoint})"
        if self.skipped:
            note += ("; the newer checkpoint failed verification, so the previous one was used: "
                     + " | ".join(self.skipped))
        return note


def restore(state: TrainState, run_dir: Path | None) -> Resume | None:
    """Load the newest verified checkpoint of the run: on local storage the newest folder that
    holds its checksum (newer than Ray's latest when Ray had not registered it yet, older when the
    newest is corrupt); on remote storage Ray's latest."""
    latest = ray.train.get_checkpoint()
    if latest is not None and latest.filesystem.type_name != "local":
        with latest.as_directory() as folder:
            ckpt.apply_state(state.load, ckpt.read(Path(folder)), Path(latest.path))
        return Resume(state.step, Path(latest.path).name)
    folder = Path(latest.path).parent if latest is not None else run_dir
    restored = ckpt.restore_newest(folder, state.load) if folder is not None else None
    if restored is None:
        if latest is not None:
            raise RuntimeError(f"no readable checkpoint under {folder}")
        return None
    return Resume(state.step, restored.folder.name, restored.skipped)


def run_folder(job: JobConfig) -> Path | None:
    """Where Ray Train keeps this job's checkpoints, when that is a local folder."""
    storage = job.checkpoint.storage_path
    return None if "://" in storage else Path(storage) / job.name


def save_and_report(state: TrainState, metrics: dict[str, Any], *, rank: int, split: BatchSplit, sink,
                    run_dir: Path | None) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint, once the metrics of the
    steps it covers are in MLflow (a job resumed from it trains, and logs, only the later steps)."""
    metrics = {**metrics, "step": state.step}
    if rank != 0:
        ray.train.report(metrics)
        return
    if sink is not None and not sink.flush(constants.METRIC_CHECKPOINT_FLUSH_S):
        log.warning("checkpoint at step %d: %d metric points are not in MLflow yet; a failure before they "
                    "are sent loses them", state.step, sink.pending)
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"local_batch": split.local_batch, "accumulation": split.accumulation, "workers": split.workers}
        ckpt.write(Path(tmp), state.to_dict(extra), step=state.step)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=ckpt.fresh_dir_name(run_dir, state.step),
        )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    args = LoopArgs(**config)
    job = JobConfig.model_validate(args.job)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    accumulation = None if job.training.grad_accumulation == "auto" else job.training.grad_accumulation
    split = split_global_batch(
        job.training.global_batch_size, workers=world, max_local_batch=args.max_local_batch, accumulation=accumulation
    )
    device = device_for_worker()
    seed_everything(job.training.seed)

    raw_model = build_model(job.model.name, job.model.kwargs).to(device)
    optimizer = make_optimizer(raw_model, job.training)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg=job.training, total_steps=args.total_steps)
    )
    state = TrainState(raw_model, optimizer, scheduler)
    resume = restore(state, run_folder(job))
    seed_everything(job.training.seed * 1000 + rank + state.step)  # distinct dropout/shuffle per rank
    model = ray.train.torch.prepare_model(raw_model, move_to_device=device)
    if job.training.compile:
        model = torch.compile(model)

    sink = _metric_sink(args, rank)
    _register(args, rank)
    if rank == 0:
        note = resume.note if resume else "start"
        log.info("worker group: %d workers, local batch %d x accumulation %d; %s",
                 world, split.local_batch, split.accumulation, note)
        _progress(args, state.step, {
            "event": note, "workers": world, "local_batch": split.local_batch, "accumulation": split.accumulation,
            "resumed_from": resume.step if resume else None, "skipped": list(resume.skipped) if resume else [],
        })
    try:
        _train(job, args, state, model, split=split, rank=rank, device=device, sink=sink)
    finally:
        if sink is not None:
            sink.close()


def _metric_sink(args: LoopArgs, rank: int) -> DeferredSink | None:
    if rank != 0 or args.run_id is None:
        return None

    def open_sink():
        from orchestrator.tracking import MetricBuffer, client

        # Steps logged before a restart (past the checkpoint we resume from) are not logged again.
        history = client(args.tracking_uri).get_metric_history(args.run_id, "train/loss")
        last_logged = max((m.step for m in history), default=None)
        return MetricBuffer(tracking_uri=args.tracking_uri, run_id=args.run_id, skip_through_step=last_logged,
                            spill_dir=args.spill_dir)

    return DeferredSink(open_sink)


def _progress(args: LoopArgs, step: int, info: dict[str, Any]) -> None:
    if args.progress is not None:
        args.progress.update.remote(step, info)


def _register(args: LoopArgs, rank: int) -> None:
    """Tell the driver where this rank runs (process and node): the actual placement, and the
    process a fault-injection test or benchmark kills."""
    if args.progress is not None:
        args.progress.register_worker.remote(rank, os.getpid(), ray.get_runtime_context().get_node_id())


def _train(job: JobConfig, args: LoopArgs, state: TrainState, model, *, split: BatchSplit, rank: int,
           device: torch.device, sink) -> None:
    cfg = job.training
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    collate = Collate(job.data)
    stop = StopSignal(args.progress, rank)
    micro_per_epoch = args.steps_per_epoch * split.accumulation
    cache = ShardCache(budget_bytes=job.data.cache_mb * 2**20, expected_samples=micro_per_epoch * split.local_batch)
    cached = False
    push, pushed = Throttle(constants.PROGRESS_PUSH_S), 0
    step_times: list[float] = []
    last_metrics: dict[str, float] = {}

    while state.step < args.total_steps:
        epoch = state.step // args.steps_per_epoch
        skip = (state.step % args.steps_per_epoch) * split.accumulation  # resumed mid-epoch
        if cached:
            batches = cache.batches(split.local_batch, seed=cfg.seed + 7919 * epoch + rank)
        else:
            batches = train_shard.iter_torch_batches(
                batch_size=split.local_batch, drop_last=True, collate_fn=collate,
                device=torch.device("cpu") if cache.enabled else device,
                local_shuffle_buffer_size=max(4 * split.local_batch, 256), local_shuffle_seed=cfg.seed + epoch,
            )
        tick = time.perf_counter()
        loss_sum = 0.0
        for i, (x, y) in enumerate(batches):
            if not cached:
                cache.add(x, y)
            # Every rank reads the whole epoch so streaming shards stay in step; only the
            # first steps_per_epoch * accumulation micro-batches are trained on.
            if i < skip or i >= micro_per_epoch or state.step >= args.total_steps:
                continue
            x, y = x.to(device, non_blocking=True), None if y is None else y.to(device, non_blocking=True)
            last_micro = (i + 1) % split.accumulation == 0
            sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
            with sync, autocast_for(device, cfg.precision):
                loss, _, _ = compute_loss(model, x, y)
                (loss / split.accumulation).backward()
            loss_sum += loss.item() if rank == 0 and last_micro else 0.0
            if not last_micro:
                continue
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            state.optimizer.step()
            state.scheduler.step()
            state.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            now = time.perf_counter()
            step_times.append(now - tick)
            tick = now
            if rank == 0 and state.step % cfg.log_every == 0:
                last_metrics = {
                    "train/loss": loss_sum,
                    "train/lr": state.scheduler.get_last_lr()[0],
                    "train/samples_per_s": split.global_batch / step_times[-1],
                    "train/step_time_s": step_times[-1],
                    "train/epoch": epoch,
                }
                if sink is not None:
                    sink.add(last_metrics, step=state.step)
                if push.due():
                    # Every step time since the last push goes along (a benchmark's recorder keeps them).
                    recent = {"step_times_s": step_times[pushed:]}
                    _progress(args, state.step, {**last_metrics, **_observed(step_times), **recent})
                    pushed = len(step_times)
            loss_sum = 0.0
            stopping = stop.should_stop(state.step)
            if stopping or state.step % job.checkpoint.every_steps == 0 or state.step == args.total_steps:
                save_and_report(state, _summary(last_metrics, step_times), rank=rank, split=split, sink=sink,
                                run_dir=run_folder(job))
            if stopping:
                stop.close()
                _progress(args, state.step, {"event": "stopped"})
                return
        if not cached and state.step < args.total_steps:  # (every rank is at the same step)
            cached = _cache_ready_everywhere(cache)
            if cached and rank == 0:
                log.info("training shard kept in memory after its first pass (%.1f MiB per worker)",
                         cache.estimate_bytes / 2**20)
        val = evaluate(_unwrap(model), val_shard.iter_torch_batches(batch_size=split.local_batch, collate_fn=collate, device=device),
                       device=device, precision=cfg.precision)
        if rank == 0 and val:
            if sink is not None:
                sink.add({**val, "epoch": epoch + 1}, step=state.step)
            _progress(args, state.step, val)
    stop.close()
    if rank == 0:
        _progress(args, state.step, {"event": "finished"})


def _cache_ready_everywhere(cache: ShardCache) -> bool:
    """Seal the cache; every rank switches to it only if every rank has it (shards stay in step)."""
    flag = torch.tensor([1.0 if cache.seal() else 0.0])
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if not flag.item():
        cache.drop()
    return bool(flag.item())


class Throttle:
    """`due()` is True at most once per `every_s` seconds (the first call always)."""

    def __init__(self, every_s: float) -> None:
        self._every, self._last = every_s, None

    def due(self) -> bool:
        now = time.monotonic()
        if self._last is not None and now - self._last < self._every:
            return False
        self._last = now
        return True


def _summary(last: dict[str, float], step_times: list[float]) -> dict[str, float]:
    # Skip the first steps (warm-up, data pipeline start) in the observed step time.
    timed = step_times[min(5, len(step_times) // 2):]
    observed = {"observed_step_time_s": statistics.median(timed)} if timed else {}
    return {**{k.replace("/", "_"): v for k, v in last.items()}, **observed}


def _observed(step_times: list[float]) -> dict[str, float]:
    """For the driver, which compares it with the prediction and refits the network from it: the
    median of this worker group's recent steps (without the first ones), and how many it ran."""
    timed = step_times[min(5, len(step_times) // 2):][-OBSERVED_WINDOW:]
    return {"observed_step_time_s": statistics.median(timed), "observed_steps": len(step_times)} if timed else {}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP
