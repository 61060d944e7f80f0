"""How a training worker talks to the driver while it trains, without ever waiting on it.

`Reporter` (rank 0) batches each optimizer step's metrics and sends them to the driver's progress
actor at most every `push_every_s` (and at every checkpoint, where it waits for the actor, never
for MLflow, so that every step up to a checkpoint is with the driver before the checkpoint is).
Losses stay device tensors until a push converts them all at once: one device sync per push, not
per step. `StopSignal` lets every rank agree, at the same step, on a stop the driver asked for.
`SystemSampler` (local rank 0 of each node) samples the node's CPU, memory and GPU memory.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import ray
import torch
import torch.distributed as dist

from trainers.events import (
    Event,
    GroupStarted,
    StepPoint,
    StepsDone,
    SystemSample,
    WorkerWarning,
    now_ms,
)

# The observed step time is the median of at most this many recent steps, after the first ones.
OBSERVED_WINDOW = 50
WARMUP_STEPS = 5


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


@dataclass
class _Pending:
    step: int
    loss: torch.Tensor
    lr: float
    step_time_s: float
    epoch: int
    at_ms: int = field(default_factory=now_ms)


def observed_step_time(step_times: list[float]) -> tuple[float | None, int]:
    """Median of the recent steps without the first ones (start-up), and how many steps ran."""
    timed = step_times[min(WARMUP_STEPS, len(step_times) // 2):][-OBSERVED_WINDOW:]
    return (statistics.median(timed) if timed else None), len(step_times)


class Reporter:
    """Rank 0's side of the progress channel (a no-op without one)."""

    def __init__(self, progress: Any, *, global_batch: int, push_every_s: float) -> None:
        self._progress, self._global_batch = progress, global_batch
        self._push = Throttle(push_every_s)
        self._pending: list[_Pending] = []
        self._events: list[Event] = []
        self._step_times: list[float] = []
        self._last_ref: Any = None

    @property
    def step_times(self) -> list[float]:
        return self._step_times

    def send(self, event: Event) -> None:
        """An event that goes at once (a group start, an evaluation, a warning)."""
        self._events.append(event)
        self._send()

    def warn(self, step: int, message: str) -> None:
        self.send(WorkerWarning(step=step, message=message))

    def started(self, event: GroupStarted) -> None:
        self.send(event)

    def step(self, *, step: int, loss: torch.Tensor, lr: float, step_time_s: float, epoch: int) -> None:
        self._step_times.append(step_time_s)
        self._pending.append(_Pending(step, loss, lr, step_time_s, epoch))
        if self._push.due():
            self._send()

    def flush(self) -> None:
        """Send what waits and wait until the actor has it (a checkpoint follows)."""
        self._send()
        if self._last_ref is not None:
            ray.get(self._last_ref)

    def _send(self) -> None:
        if self._progress is None:
            self._pending.clear()
            self._events.clear()
            return
        events = self._events
        if self._pending:
            events = [*events, self._steps_done()]
        if events:
            self._last_ref = self._progress.publish.remote(events)
        self._events, self._pending = [], []

    def _steps_done(self) -> StepsDone:
        losses = torch.stack([p.loss for p in self._pending]).float().cpu().tolist()  # the one device sync
        points = tuple(
            StepPoint(step=p.step, at_ms=p.at_ms, metrics={
                "train/loss": loss, "train/lr": p.lr, "train/step_time_s": p.step_time_s,
                "train/samples_per_s": self._global_batch / p.step_time_s if p.step_time_s > 0 else 0.0,
                "train/epoch": float(p.epoch)})
            for p, loss in zip(self._pending, losses)
        )
        observed, steps = observed_step_time(self._step_times)
        return StepsDone(step=self._pending[-1].step, points=points,
                         step_times_s=tuple(p.step_time_s for p in self._pending),
                         observed_step_time_s=observed, observed_steps=steps)


class StopSignal:
    """All ranks agree, at the same step, on whether the driver asked to stop (SIGTERM/Ctrl-C, or
    a resize), without stalling a step for it.

    Every `every` steps each rank starts an asynchronous MAX all-reduce of rank 0's latest answer
    and acts on the one it started the round before (by then long finished): a stop lands at most
    two rounds after the driver asks. Rank 0 asks the driver's actor without waiting, at most
    once per `ask_every_s`.
    """

    def __init__(self, progress: Any, rank: int, *, every: int, ask_every_s: float) -> None:
        self._progress, self._rank, self._every = progress, rank, every
        self._asking: Any = None
        self._ask = Throttle(ask_every_s)
        self._requested = False
        self._round: tuple[torch.Tensor, Any] | None = None

    def should_stop(self, step: int) -> bool:
        if self._progress is None or step % self._every:
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


class SystemSampler:
    """The node's CPU and memory use (and this process's CUDA memory), every `every_s` seconds,
    as MLflow names its system metrics."""

    def __init__(self, progress: Any, node: str, *, every_s: float | None, device: torch.device) -> None:
        self._progress, self._node, self._device = progress, node, device
        self._throttle = Throttle(every_s) if every_s and progress is not None else None
        psutil.cpu_percent(None)  # the first call only starts the measurement interval

    def maybe_sample(self, step: int) -> None:
        if self._throttle is None or not self._throttle.due():
            return
        memory = psutil.virtual_memory()
        metrics = {
            "cpu_utilization_percentage": psutil.cpu_percent(None),
            "system_memory_usage_megabytes": (memory.total - memory.available) / 2**20,
            "system_memory_usage_percentage": memory.percent,
        }
        if self._device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self._device)
            index = self._device.index or 0
            metrics[f"gpu_{index}_memory_usage_megabytes"] = (total - free) / 2**20
            metrics[f"gpu_{index}_memory_usage_percentage"] = 100.0 * (total - free) / total
        self._progress.publish.remote([SystemSample(step=step, node=self._node, metrics=metrics)])


def given_up(progress: Any) -> bool:
    """Whether an earlier worker group of this job failed on a UserError (bad input: the data went
    empty, no checkpoint verifies), which a restart only meets again: Ray Train restarts the group
    up to `max_failures` times, and each restarted worker leaves at once instead."""
    return progress is not None and ray.get(progress.given_up.remote()) is not None


def stopped_before_start(progress: Any, rank: int) -> bool:
    """Whether the driver asked to stop while this group started (a Ctrl-C while Ray Train scheduled
    it): every rank leaves at once, before building the model and starting the data, with nothing
    trained to checkpoint, instead of training on to its first stop check. Rank 0's answer, shared
    with every rank, so that none trains on alone."""
    if progress is None:
        return False
    flag = torch.tensor([1.0 if rank == 0 and ray.get(progress.stop_requested.remote()) else 0.0])
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def register(progress: Any, rank: int) -> None:
    """Tell the driver where this rank runs (process and node): the actual placement, and the
    process a fault-injection test or benchmark kills."""
    if progress is not None:
        progress.register_worker.remote(rank, os.getpid(), ray.get_runtime_context().get_node_id())
