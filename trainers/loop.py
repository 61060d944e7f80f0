"""`train_loop_per_worker` for Ray Train V2's TorchTrainer: the whole loop, top to bottom.

Ray Train owns the worker group, the process group (DDP) and checkpoint persistence; this loop
owns the model, the optimizer, the data order and what a step means (`trainers.step.TrainStep`,
the same step the profiler times). The global batch stays what the config says for any worker
count: local batch and gradient accumulation are recomputed from the world size at every
(re)start. The worker knows its own sections of the job config (`WorkerConfig`) and talks to the
driver only through its progress actor (`trainers.reporting`); it never writes to MLflow.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from trainers import checkpoint as ckpt
from trainers.batching import BatchSplit, split_global_batch
from trainers.config import WorkerConfig
from trainers.data.cache import EvalCache, ShardCache
from trainers.data.arrow_collate import ArrowCollate
from trainers.errors import UserError
from trainers.events import CheckpointSaved, Evaluated, GroupEnded, GroupStarted
from trainers.reporting import (
    Reporter,
    StopSignal,
    SystemSampler,
    given_up,
    observed_step_time,
    register,
    stopped_before_start,
)
from trainers.state import Resume, TrainState, restore
from trainers.step import Batch, TrainStep, compiled, eval_sums, seed_everything


# The compute-only probe at a group's start: after COMPUTE_PROBE_WARMUP untimed passes, at least
# COMPUTE_PROBE_MIN timed ones (the online refit trusts a median of 20, orchestrator.planner.refit),
# more up to COMPUTE_PROBE_STEPS while within COMPUTE_PROBE_S.
COMPUTE_PROBE_WARMUP = 2
COMPUTE_PROBE_MIN = 20
COMPUTE_PROBE_STEPS = 30
COMPUTE_PROBE_S = 2.0


@dataclass(frozen=True, slots=True)
class LoopArgs:
    """What the driver hands every worker (sent as a plain dict through train_loop_config)."""

    config: dict[str, Any]  # WorkerConfig: model, data, training, checkpoint
    steps_per_epoch: int
    total_steps: int
    run_dir: str | None = None  # the job's checkpoint folder when it is local (None on object storage)
    max_local_batch: int | None = None
    progress: Any = None  # the driver's progress actor (trainers.events.ProgressChannel)
    push_every_s: float = 0.25  # rank 0 sends progress at most this often
    stop_check_every: int = 5  # ranks agree on a stop every this many steps
    system_metrics_every_s: float | None = None  # None: no system metrics

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def device_for_worker() -> torch.device:
    # Ray may assign a logical GPU on a machine whose torch has no CUDA: use the CPU then.
    return ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class Worker:
    """One rank's view of its worker group."""

    args: LoopArgs
    cfg: WorkerConfig
    rank: int
    split: BatchSplit
    device: torch.device
    state: TrainState
    step_fn: TrainStep
    reporter: Reporter
    stop: StopSignal
    system: SystemSampler


def train_loop_per_worker(config: dict[str, Any]) -> None:
    args = LoopArgs(**config)
    if given_up(args.progress):  # an earlier group failed on bad input: the driver is saying so
        return
    if stopped_before_start(args.progress, ray.train.get_context().get_world_rank()):
        return  # the fit ends at the checkpoint it would have resumed from
    worker, resume = _start(args)
    try:
        _train(worker, resume)
    finally:
        worker.stop.close()


def _start(args: LoopArgs) -> tuple[Worker, Resume | None]:
    cfg = WorkerConfig.model_validate(args.config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    fixed = None if cfg.training.grad_accumulation == "auto" else cfg.training.grad_accumulation
    split = split_global_batch(cfg.training.global_batch_size, workers=world, max_local_batch=args.max_local_batch,
                               accumulation=fixed)
    device = device_for_worker()
    seed_everything(cfg.training.seed)
    state = TrainState.build(cfg, args.total_steps, device)
    resume = restore(state, Path(args.run_dir) if args.run_dir else None)
    seed_everything(cfg.training.seed * 1000 + rank + state.step)  # distinct dropout/shuffle per rank
    model = compiled(ray.train.torch.prepare_model(state.model, move_to_device=device), cfg.training)
    step_fn = TrainStep(model, state.optimizer, cfg=cfg.training, device=device, scheduler=state.scheduler)
    progress = args.progress
    register(progress, rank)
    node = f"node-{ray.get_runtime_context().get_node_id()[:8]}"
    every = args.system_metrics_every_s if ctx.get_local_rank() == 0 else None
    worker = Worker(
        args, cfg, rank, split, device, state, step_fn,
        Reporter(progress if rank == 0 else None, global_batch=split.global_batch, push_every_s=args.push_every_s),
        StopSignal(progress, rank, every=args.stop_check_every, ask_every_s=args.push_every_s),
        SystemSampler(progress, node, every_s=every, device=device),
    )
    return worker, resume


def _train(w: Worker, resume: Resume | None) -> None:
    cfg, args = w.cfg, w.args
    if w.state.step >= args.total_steps:
        # Resumed from the last step's checkpoint: an earlier driver was killed after its workers
        # finished (or while it registered the model). Say so and report the step, so this fit ends
        # at it with those weights, the ones registered. Their checkpoint is reported again (in a
        # fresh folder) only where Ray Train holds an older one as its latest: a copy of the one it
        # holds would be tracked too, and push an older distinct checkpoint out of keep_last.
        w.reporter.started(_group_started(w, resume, ()))
        if resume is not None and resume.latest:
            ray.train.report({"step": w.state.step})
        else:
            _save_and_report(w)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if cfg.data.val_fraction else None  # no held-out rows: no set
    collate = ArrowCollate(cfg.data)
    micro_per_epoch = args.steps_per_epoch * w.split.accumulation
    cache = ShardCache(budget_bytes=cfg.data.cache_mb * 2**20, expected_samples=micro_per_epoch * w.split.local_batch)
    val_cache = EvalCache(budget_bytes=cfg.data.cache_mb * 2**20)
    started = False
    while w.state.step < args.total_steps:
        epoch = w.state.step // args.steps_per_epoch
        skip = (w.state.step % args.steps_per_epoch) * w.split.accumulation  # resumed mid-epoch
        batches = _epoch_batches(w, train_shard, collate, cache, epoch)
        tick = time.perf_counter()
        before = w.state.step
        for micro in _optimizer_steps(batches, w.split.accumulation, skip=skip, limit=micro_per_epoch, cache=cache):
            if w.state.step >= args.total_steps:
                continue  # every rank reads the whole epoch, so streaming shards stay in step
            micro = [_to_device(b, w.device) for b in micro]
            if not started:
                started = True
                w.reporter.started(_group_started(w, resume, _compute_only_s(w.step_fn, micro, w.device)))
                tick = time.perf_counter()
            loss = w.step_fn(micro)
            w.state.step += 1
            now = time.perf_counter()
            w.reporter.step(step=w.state.step, loss=loss, lr=w.state.scheduler.get_last_lr()[0],
                            step_time_s=now - tick, epoch=epoch)
            w.system.maybe_sample(w.state.step)
            if _after_step(w):
                return
            tick = time.perf_counter()  # checkpoint writing stays out of the next step's time
        if w.state.step == before:  # another pass would read nothing again, and never see a stop signal
            raise UserError(f"data: epoch {epoch} of the training set gave this worker no full batch of "
                            f"{w.split.local_batch} rows (were its files removed or emptied while the job ran?)")
        _end_of_epoch(w, cache, val_cache, val_shard, collate, epoch)
    if w.rank == 0:
        w.reporter.send(GroupEnded(step=w.state.step, reason="finished"))
        w.reporter.flush()


def _after_step(w: Worker) -> bool:
    """Checkpoint when due or asked to stop; True when the group stops here."""
    stopping = w.stop.should_stop(w.state.step)
    if stopping or w.state.step % w.cfg.checkpoint.every_steps == 0 or w.state.step == w.args.total_steps:
        _save_and_report(w)
    if stopping and w.rank == 0:
        w.reporter.send(GroupEnded(step=w.state.step, reason="stopped"))
        w.reporter.flush()
    return stopping


def _epoch_batches(w: Worker, shard: Any, collate: ArrowCollate, cache: ShardCache, epoch: int) -> Iterable[Batch]:
    if cache.ready:
        return cache.batches(w.split.local_batch, seed=w.cfg.training.seed + 7919 * epoch + w.rank)
    return shard.iter_torch_batches(
        batch_size=w.split.local_batch, drop_last=True, collate_fn=collate,
        device=torch.device("cpu") if cache.enabled else w.device,
        local_shuffle_buffer_size=max(4 * w.split.local_batch, 256), local_shuffle_seed=w.cfg.training.seed + epoch,
    )


def _optimizer_steps(batches: Iterable[Batch], accumulation: int, *, skip: int, limit: int,
                     cache: ShardCache) -> Iterator[list[Batch]]:
    """Micro-batches grouped per optimizer step: the first `skip` passed over (resumed mid-epoch),
    none past `limit`, the whole epoch read (and, on a streaming pass, kept in the cache)."""
    group: list[Batch] = []
    for i, (x, y) in enumerate(batches):
        cache.add(x, y)
        if i < skip or i >= limit:
            continue
        group.append((x, y))
        if len(group) == accumulation:
            yield group
            group = []


def _to_device(batch: Batch, device: torch.device) -> Batch:
    x, y = batch
    return x.to(device, non_blocking=True), None if y is None else y.to(device, non_blocking=True)


def _compute_only_s(step_fn: TrainStep, micro: list[Batch], device: torch.device) -> tuple[float, ...]:
    """One optimizer step's forward and backward without gradient sync (the compute the network
    adds to), timed on this group's first batch: after `COMPUTE_PROBE_WARMUP` untimed passes, at
    least `COMPUTE_PROBE_MIN` times (what the refit needs, however long a step takes: a time budget
    alone gave a 0.1 s step too few, and the refit then put compute's change on the network), more
    up to `COMPUTE_PROBE_STEPS` within `COMPUTE_PROBE_S`; gradients and buffers (batch-norm
    statistics) left as they were."""
    buffers = {name: value.detach().clone() for name, value in step_fn.model.named_buffers()}
    times: list[float] = []
    started = time.perf_counter()
    for i in range(COMPUTE_PROBE_WARMUP + COMPUTE_PROBE_STEPS):
        _sync(device)
        start = time.perf_counter()
        step_fn.accumulate(micro, sync=False)
        _sync(device)
        if i >= COMPUTE_PROBE_WARMUP:
            times.append(time.perf_counter() - start)
        if len(times) >= COMPUTE_PROBE_MIN and time.perf_counter() - started > COMPUTE_PROBE_S:
            break
    step_fn.discard()
    with torch.no_grad():
        for name, value in step_fn.model.named_buffers():
            value.copy_(buffers[name])
    return tuple(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _group_started(w: Worker, resume: Resume | None, compute_s: tuple[float, ...]) -> GroupStarted:
    return GroupStarted(
        step=w.state.step, workers=w.split.workers, local_batch=w.split.local_batch,
        accumulation=w.split.accumulation, resumed_from=resume.step if resume else None,
        checkpoint=resume.checkpoint if resume else None, skipped=resume.skipped if resume else (),
        compute_step_times_s=compute_s,
    )


def _end_of_epoch(w: Worker, cache: ShardCache, val_cache: EvalCache, val_shard: Any, collate: ArrowCollate,
                  epoch: int) -> None:
    if not cache.ready and w.state.step < w.args.total_steps:  # (every rank is at the same step)
        _cache_ready_everywhere(cache)
    if val_shard is None:
        return
    if val_cache.ready:
        batches: Iterable[Batch] = val_cache.batches()
    else:
        batches = _kept(val_shard.iter_torch_batches(
            batch_size=w.split.local_batch, collate_fn=collate,
            device=torch.device("cpu") if val_cache.enabled else w.device), val_cache)
    metrics = evaluate(_unwrap(w.step_fn.model), batches, device=w.device)
    if not val_cache.ready:
        _cache_ready_everywhere(val_cache)
    if w.rank == 0 and metrics:
        w.reporter.send(Evaluated(step=w.state.step, metrics={**metrics, "epoch": float(epoch + 1)}))


def _kept(batches: Iterable[Batch], cache: EvalCache) -> Iterator[Batch]:
    for x, y in batches:
        cache.add(x, y)
        yield x, y


def _cache_ready_everywhere(cache: ShardCache | EvalCache) -> bool:
    """Seal the cache; every rank switches to it only if every rank has it (shards stay in step)."""
    flag = torch.tensor([1.0 if cache.seal() else 0.0])
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if not flag.item():
        cache.drop()
    return bool(flag.item())


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Batch], *, device: torch.device) -> dict[str, float]:
    # The unwrapped model: DDP's forward would sync buffers, and shards may differ in length.
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in batches:
        x, y = _to_device(batch, device)
        sums += eval_sums(model, x, y)
    model.train()
    sums = sums.cpu()
    if dist.is_initialized():
        dist.all_reduce(sums)
    loss, correct, count = sums.tolist()
    return {"val/loss": loss / count, "val/accuracy": correct / count} if count else {}


def _save_and_report(w: Worker) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint, once the driver holds
    every step it covers (a job resumed from it trains, and logs, only the later steps)."""
    observed, _ = observed_step_time(w.reporter.step_times)
    metrics = {"step": w.state.step, **({"observed_step_time_s": observed} if observed else {})}
    if w.rank != 0:
        ray.train.report(metrics)
        return
    start = time.perf_counter()
    w.reporter.flush()  # the driver sees a diverged loss before this checkpoint is weighed
    if not w.state.finite():  # never a checkpoint a resume cannot train from
        w.reporter.warn(w.state.step, f"step {w.state.step}: the weights are NaN or infinite (training diverged); "
                                      "no checkpoint written, so a resume starts from the one before")
        ray.train.report(metrics)
        return
    run_dir = Path(w.args.run_dir) if w.args.run_dir else None
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"local_batch": w.split.local_batch, "accumulation": w.split.accumulation, "workers": w.split.workers}
        ckpt.write(Path(tmp), w.state.to_dict(extra), step=w.state.step)
        name = ckpt.fresh_dir_name(run_dir, w.state.step)
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        except OSError as exc:  # Ray Train's copy into the storage
            if (refused := ckpt.unwritable(exc, run_dir, name)) is None:
                raise
            raise refused from None
    w.reporter.send(CheckpointSaved(step=w.state.step, seconds=time.perf_counter() - start))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP
