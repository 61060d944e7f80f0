"""The driver's decisions, as pure functions returning typed decisions: the controller acts on
them (in the spirit of Ray Train V2's `FailurePolicy.make_decision`). No Ray, no MLflow, no
clock: everything a decision depends on is an argument, so each is unit-tested in microseconds.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

from trainers.events import StepPoint


class State(enum.Enum):
    """Where a job is. `step()` moves it; the last three are terminal."""

    PREPARING = "preparing"  # data checked, Ray joined, identity locked, tracking opened
    SIZING = "sizing"  # profile and plan (or predict a fixed count)
    AWAITING_WORKERS = "awaiting_workers"  # the autoscaler was asked; waiting for them to arrive
    RUNNING = "running"  # a TorchTrainer.fit is in flight
    RESIZING = "resizing"  # the fit stopped at a checkpoint to go on with another worker count
    FINISHED = "finished"
    STOPPED = "stopped"  # asked to stop (Ctrl-C, SIGTERM, `jobs stop`): a final checkpoint was written
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (State.FINISHED, State.STOPPED, State.FAILED)


# The MLflow run status each terminal state ends the run with.
RUN_STATUS = {State.FINISHED: "FINISHED", State.STOPPED: "KILLED", State.FAILED: "FAILED"}


class StopReason(enum.Enum):
    USER = "user"  # Ctrl-C, SIGTERM, `jobs stop`
    RESIZE = "resize"  # online re-planning chose another worker count


# ---------------------------------------------------------------------------------------------
# Waiting for the autoscaler


@dataclass(frozen=True, slots=True)
class KeepWaiting:
    arrived: int


@dataclass(frozen=True, slots=True)
class Proceed:
    workers: int  # the workers that arrived (at most the wanted count)
    shortfall: int


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: str


WaitDecision = KeepWaiting | Proceed | GiveUp


def wait_decision(*, wanted: int, arrived: int, least: int, waited_s: float, timeout_s: float) -> WaitDecision:
    """Go on once every wanted worker fits; at the timeout, go on with what arrived if it is at
    least `least` (the range's minimum, or 1), else give up with a sentence saying why."""
    if arrived >= wanted:
        return Proceed(wanted, 0)
    if waited_s < timeout_s:
        return KeepWaiting(arrived)
    if arrived >= least:
        return Proceed(arrived, wanted - arrived)
    return GiveUp(f"resources.workers: {arrived} of the {wanted} workers wanted arrived within {timeout_s:g} s "
                  f"(at least {least} needed); raise resources.autoscale_timeout_s or check the autoscaler")


def beyond_cluster(*, least: int, slots: int, use_gpu: bool, cpus_per_worker: float) -> str | None:
    """Why a job cannot start on a cluster nothing adds nodes to (no autoscaler, or autoscale off),
    or None. Ray Train waits for its workers' placement without a word: 1 worker of 64 CPUs on
    an embedded Ray of 2 hung for good."""
    if least <= slots:
        return None
    each = f"1 GPU and {cpus_per_worker:g} CPUs" if use_gpu else f"{cpus_per_worker:g} CPUs"
    return (f"resources.workers: {least} worker(s) of {each} each do not fit this cluster, which has room for "
            f"{slots} and no autoscaler to add nodes; lower resources.workers or resources.cpus_per_worker, or add "
            "nodes")


# ---------------------------------------------------------------------------------------------
# Worker groups: first start, restart after a failure, or the resize the driver asked for


class GroupKind(enum.Enum):
    FIRST = "first"
    RESTART = "restart"
    RESIZE = "resize"


def group_kind(*, groups_before: int, resize_pending: bool, failed_before: bool = False) -> GroupKind:
    """`failed_before`: a worker failure was reported since the last group started. The first group
    of a driver can fail before it says it started (a worker killed while it loads the data or the
    checkpoint): the group Ray Train starts next is still a restart."""
    if resize_pending:
        return GroupKind.RESIZE
    return GroupKind.RESTART if groups_before > 0 or failed_before else GroupKind.FIRST


# ---------------------------------------------------------------------------------------------
# Online re-planning


@dataclass(frozen=True, slots=True)
class Keep:
    reason: str


@dataclass(frozen=True, slots=True)
class Resize:
    workers: int
    reason: str


ReplanDecision = Keep | Resize


def replan_guard(*, elastic: bool, replan_enabled: bool, resizes: int, max_resizes: int, current: int) -> Keep | None:
    """Why re-planning cannot resize this job at all (a Keep), or None when it may."""
    keep = f"keep {current} worker{'s' if current != 1 else ''}"
    if not elastic:
        return Keep(f"{keep}: the worker count is fixed")
    if not replan_enabled:
        return Keep(f"{keep}: resources.replan is off")
    if resizes >= max_resizes:
        return Keep(f"{keep}: already resized {resizes} times (ORCH_MAX_RESIZES)")
    return None


def replan_ready(*, observed_steps: int, min_steps: int, last_at: int, settled: bool) -> bool:
    """Re-plan once a group ran `min_steps` steps more than at its last re-plan (its step time is
    trusted after that many), until a refit learned nothing new (each refit moves the model by a
    bounded factor, so a model far off takes a few rounds)."""
    return not settled and observed_steps >= last_at + min_steps


def diverged(points: Iterable[StepPoint]) -> StepPoint | None:
    """The first step whose training loss is not a finite number: every step after it is NaN too
    (the optimizer has written it into the weights), so training on only burns the GPUs."""
    return next((p for p in points if not math.isfinite(p.metrics.get("train/loss", 0.0))), None)


# ---------------------------------------------------------------------------------------------
# How a fit ended


def after_fit(*, error: bool, stop: StopReason | None, completed: bool) -> State:
    """The state a finished `TorchTrainer.fit` leads to."""
    if error:
        return State.FAILED
    if completed:
        return State.FINISHED
    if stop is StopReason.RESIZE:
        return State.RESIZING
    if stop is StopReason.USER:
        return State.STOPPED
    # The group ended without training every step and without being asked to: Ray Train gave up
    # on it (max_failures) without raising; that is a failure, not a finish.
    return State.FAILED


def poll_again(*, fit_done: bool, drained: bool, misses: int, limit: int) -> bool:
    """Poll once more before acting on how the fit ended? While it runs, yes. Once it ended, until a
    drain is answered (it holds the fit's last events) or `limit` polls since it ended (`misses`, not
    those missed while it ran) went unanswered: then the job ends on what was drained, rather than
    wait on a stuck progress actor forever."""
    return not fit_done or (not drained and misses <= limit)


def stop_to_request(*, user_stop: bool, resize_to: int | None, requested: StopReason | None) -> StopReason | None:
    """Which stop to ask the workers for now (None: nothing new). A user's stop overrides a
    pending resize; a resize is asked for once."""
    if user_stop and requested is not StopReason.USER:
        return StopReason.USER
    if resize_to is not None and requested is None:
        return StopReason.RESIZE
    return None
