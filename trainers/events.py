"""What the training workers tell the driver, as typed events, and the channel they go through.

Rank 0 reports its worker group's start, every optimizer step (with the metric points to log,
stamped with their own step and time), evaluations, checkpoints, warnings and how it ended; the
local rank 0 of every node reports system samples; every rank registers its process and node. The
driver's progress actor (`orchestrator.driver.progress.ProgressActor`) collects them, and the
driver drains them: it is the one process that writes to MLflow and to the console.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupStarted:
    """A worker group began (or resumed) training."""

    step: int  # the step it starts from
    workers: int
    local_batch: int
    accumulation: int
    resumed_from: int | None = None  # the checkpoint's step, None: from scratch
    checkpoint: str | None = None  # the checkpoint folder resumed from
    skipped: tuple[str, ...] = ()  # newer checkpoints that failed verification, one line each
    # This worker's forward and backward of one optimizer step without gradient sync, timed at the
    # group's start (each repeat): what the network adds to.
    compute_step_times_s: tuple[float, ...] = ()
    at_ms: int = field(default_factory=now_ms)

    @property
    def note(self) -> str:
        if self.resumed_from is None:
            return "start"
        note = f"resumed from step {self.resumed_from} ({self.checkpoint})"
        if self.skipped:
            note += ("; the newer checkpoint failed verification, so the previous one was used: "
                     + " | ".join(self.skipped))
        return note


@dataclass(frozen=True, slots=True, kw_only=True)
class StepPoint:
    """One optimizer step's metrics, to be logged at `step` with the time it was measured."""

    step: int
    metrics: dict[str, float]
    at_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StepsDone:
    """The optimizer steps since the last report, and the group's step time so far."""

    step: int  # the last of them
    points: tuple[StepPoint, ...]
    step_times_s: tuple[float, ...]  # each step's time, checkpoint writing left out
    observed_step_time_s: float | None = None  # median over the group's recent steps, after warm-up
    observed_steps: int = 0  # steps the group has run


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluated:
    step: int
    metrics: dict[str, float]
    at_ms: int = field(default_factory=now_ms)


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointSaved:
    step: int
    seconds: float  # writing and reporting it (kept out of the step time)
    at_ms: int = field(default_factory=now_ms)


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemSample:
    """psutil (and CUDA) figures of one node, logged as MLflow system metrics of that node."""

    step: int
    node: str
    metrics: dict[str, float]
    at_ms: int = field(default_factory=now_ms)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerWarning:
    step: int
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupEnded:
    """Rank 0 left the loop: `reason` is "finished" (every step trained) or "stopped" (asked to)."""

    step: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerFailed:
    """Sent by Ray Train's controller (not a worker) when the group failed, before it restarts.
    `user_error`: the one line of a worker's UserError among the causes (bad input, which no
    restart mends: the job gives up instead of restarting on it)."""

    step: int
    cause: str
    at_ms: int = field(default_factory=now_ms)
    user_error: str | None = None


Event = GroupStarted | StepsDone | Evaluated | CheckpointSaved | SystemSample | WorkerWarning | GroupEnded | WorkerFailed


class ProgressChannel(Protocol):
    """The handle of the driver's progress actor, as the workers use it (Ray actor methods)."""

    publish: Any  # .remote(events: list[Event])
    register_worker: Any  # .remote(rank, pid, node_id)
    stop_requested: Any  # .remote() -> bool
    given_up: Any  # .remote() -> str | None
