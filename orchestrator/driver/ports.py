"""What the driver's controller talks to, as types: the ports (Ray, the trainer, the tracking
path, the autoscaler, the UI, the clock) and what passes through them. The real ones are wired in
`job.py`; the tests' fakes in `tests/driver_fakes.py`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.config import JobConfig
from orchestrator.driver.policies import State
from orchestrator.driver.sizing import Sizing, Workers
from trainers.events import Event, WorkerFailed


@dataclass
class Prepared:
    """What PREPARING established: the localized job, its data and length, the device kind."""

    job: JobConfig
    use_gpu: bool
    data: Any  # driver.data.Datasets
    steps_per_epoch: int
    total_steps: int


@dataclass
class FitOutcome:
    metrics: dict[str, Any]
    checkpoint: Any = None  # ray.train.Checkpoint
    error: BaseException | None = None


class ProgressUnanswered(Exception):
    """The progress actor did not answer within `PROGRESS_ANSWER_S`: a missed poll, not a failure."""


class Fit(Protocol):
    def done(self) -> bool: ...
    def wait(self, timeout_s: float) -> bool: ...  # True once ended
    def outcome(self) -> FitOutcome: ...


class Run(Protocol):
    """The MLflow run (`recorder.RunLog`) plus what only its owner does."""

    run_id: str | None
    resumed: bool | None

    def finish(self, status: str) -> None: ...
    def close(self) -> Any: ...
    def drain_warnings(self) -> list[str]: ...


class Identity(Protocol):
    complete: bool
    model_pending: bool
    key: str
    state: Any  # identity.JobState: `finished` holds what a finished job ended with
    checkpoint_step: int  # where a rerun resumes (its newest checkpoint's step), 0 for a new job
    run_id: str | None  # the job's MLflow run as last recorded

    def save_run_id(self, run_id: str) -> None: ...

    def mark_finished(self, *, step: int, run_id: str | None, model_version: str | None) -> None: ...
    def save_counts(self, counts: dict[str, int]) -> None: ...
    def save_records(self, name: str, rows: list[Any]) -> None: ...
    def release(self) -> None: ...
    def check_held(self) -> None: ...


class UI(Protocol):
    def status(self, message: str) -> None: ...
    def sized(self, prepared: Prepared, sizing: Sizing, resumed: bool | None) -> None: ...
    def progress(self, step: int, total: int, info: dict[str, float]) -> None: ...


@dataclass
class Ports:
    claim: Callable[[], Identity]  # lock the job, check its config
    prepare: Callable[[], Prepared]  # data, Ray, datasets
    size: Callable[[Prepared, int | None], Sizing]  # profile and plan, capped at max workers
    open_run: Callable[[Prepared, Sizing, Identity], Run]  # the MLflow run, with params, tags, artifacts
    start_fit: Callable[[Prepared, Sizing, Workers], Fit]
    drain: Callable[[], tuple[list[Event], dict[int, dict[str, Any]]]]
    request_stop: Callable[[], None]
    clear_stop: Callable[[], None]
    register: Callable[[Prepared, FitOutcome, Run], str | None]  # the trained model; its version
    ui: UI
    # A finished job's model that never reached MLflow (it was down then): log it now; its version.
    register_finished: Callable[[Identity], str | None] = lambda identity: None
    autoscale: Any = None  # .enabled(job) .request(workers) .arrived() .release(); None: never
    slots: Callable[[], int] = lambda: 0  # worker slots on the cluster now (re-planning's ceiling)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


@dataclass
class JobResult:
    state: State
    run_id: str | None = None
    final_step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint_path: str | None = None
    model_version: str | None = None
    workers: int = 0
    restarts: int = 0
    resizes: int = 0
    replans: list[dict[str, Any]] = field(default_factory=list)
    tracking: Any = None  # the run log's closing report
    groups: list[Any] = field(default_factory=list)  # recorder.Group: each worker group, in order
    failures: list[WorkerFailed] = field(default_factory=list)
    already_complete: dict[str, Any] | None = None  # a finished job run again: what it finished with

    @property
    def stopped(self) -> bool:
        return self.state is State.STOPPED


class Aborted(KeyboardInterrupt):
    """A second stop signal (the CLI raises KeyboardInterrupt) ended the job without waiting for
    its final checkpoint. `result` is how far it got, its MLflow run and what MLflow did not take
    (the run was closed first): the CLI still prints the closing lines from it."""

    def __init__(self, result: JobResult) -> None:
        super().__init__(f"aborted at step {result.final_step}")
        self.result = result
