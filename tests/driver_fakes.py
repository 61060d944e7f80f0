"""Fakes of everything the driver's controller talks to: the job's identity, the MLflow run, the
trainer (a scripted fit), the progress actor, the autoscaler, the UI and the clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from orchestrator.driver.ports import FitOutcome, Ports, Prepared
from orchestrator.driver.sizing import Sizing
from orchestrator.errors import UserError
from trainers.events import Event, GroupEnded, GroupStarted, StepPoint, StepsDone


def group(step: int = 0, workers: int = 2, *, resumed: int | None = None, compute: float = 0.01) -> GroupStarted:
    return GroupStarted(step=step, workers=workers, local_batch=32 // workers, accumulation=1, resumed_from=resumed,
                        checkpoint=None if resumed is None else f"checkpoint_{resumed:09d}",
                        compute_step_times_s=(compute,) * 3)


def steps(first: int, last: int, *, step_time: float = 0.02, observed_steps: int | None = None) -> StepsDone:
    points = tuple(StepPoint(step=s, metrics={"train/loss": 1.0 / s, "train/step_time_s": step_time}, at_ms=1000 * s)
                   for s in range(first, last + 1))
    return StepsDone(step=last, points=points, step_times_s=tuple(step_time for _ in points),
                     observed_step_time_s=step_time, observed_steps=observed_steps or last)


@dataclass
class FakeIdentity:
    complete: bool = False
    model_pending: bool = False
    key: str = "job-key"
    state: Any = field(default_factory=lambda: SimpleNamespace(finished=None, counts={}, records={}))
    finished: dict[str, Any] | None = None
    released: bool = False
    lost: str | None = None
    checkpoint_step: int = 0
    run_id: str | None = None

    def save_run_id(self, run_id: str) -> None:
        self.run_id = run_id

    def mark_finished(self, *, step: int, run_id: str | None, model_version: str | None,
                      checkpoint: str | None = None) -> None:
        self.finished = {"step": step, "run_id": run_id, "model_version": model_version}

    def save_counts(self, counts: dict[str, int]) -> None:
        self.state.counts = dict(counts)

    def save_records(self, name: str, rows: list[Any]) -> None:
        self.state.records = {**self.state.records, name: list(rows)}

    def release(self) -> None:
        self.released = True

    def check_held(self) -> None:
        if self.lost:
            raise UserError(f"digits: the lock was taken over by {self.lost}")


@dataclass
class FakeRun:
    run_id: str | None = "run-1"
    resumed: bool | None = False
    resume_floor: int | None = None
    metrics: list[tuple[str, float, int, bool]] = field(default_factory=list)
    tags: dict[str, Any] = field(default_factory=dict)
    dicts: dict[str, Any] = field(default_factory=dict)
    status: str | None = None
    closed: bool = False
    warnings: list[str] = field(default_factory=list)
    unsent: list[str] = field(default_factory=list)  # the lines of close()'s report: what MLflow did not take

    def log_params(self, params: Any) -> None:
        pass

    def set_tags(self, tags: Any) -> None:
        self.tags.update(tags)

    def log_metrics(self, metrics: Any, *, step: int, at_ms: int | None = None, per_step: bool = False) -> None:
        self.metrics += [(k, v, step, per_step) for k, v in metrics.items()]

    def log_dict(self, data: Any, name: str) -> None:
        self.dicts[name] = data

    def log_artifact(self, path: Any, artifact_path: str | None = None) -> None:
        pass

    def set_description(self, text: str) -> None:
        self.description = text

    def finish(self, status: str) -> None:
        assert self.status is None, "the run was ended twice"
        self.status = status

    def close(self) -> Any:
        self.closed = True
        return SimpleNamespace(lines=lambda: list(self.unsent), waiting_points=len(self.unsent), waiting_operations=0)

    def drain_warnings(self) -> list[str]:
        out, self.warnings = self.warnings, []
        return out

    def steps_of(self, key: str) -> list[int]:
        return [step for k, _, step, _ in self.metrics if k == key]


class FakeFit:
    """A fit whose workers publish the scripted event batches, one batch per poll, then end."""

    def __init__(self, batches: list[list[Event]], outcome: FitOutcome) -> None:
        self.batches, self._outcome = list(batches), outcome
        self.stopped_by: Callable[[], bool] | None = None  # set by World: has a stop been requested?

    def done(self) -> bool:
        return not self.batches

    def wait(self, timeout_s: float) -> bool:
        if self.stopped_by is not None and self.stopped_by():
            self.batches = []  # the workers saw the stop and ended
        return self.done()

    def outcome(self) -> FitOutcome:
        return self._outcome


@dataclass
class FakeScaler:
    arrivals: list[int]  # what arrived() answers, one per call (the last one repeats)
    on: bool = True
    requested: list[int] = field(default_factory=list)
    releases: int = 0

    def enabled(self, job: Any) -> bool:
        return self.on

    def request(self, workers: int) -> None:
        self.requested.append(workers)

    def arrived(self) -> int:
        return self.arrivals.pop(0) if len(self.arrivals) > 1 else self.arrivals[0]

    def release(self) -> None:
        self.releases += 1


@dataclass
class FakeUI:
    statuses: list[str] = field(default_factory=list)
    sizings: list[Sizing] = field(default_factory=list)
    progress_calls: list[tuple[int, int, dict[str, float]]] = field(default_factory=list)

    def status(self, message: str) -> None:
        self.statuses.append(message)

    def sized(self, prepared: Prepared, sizing: Sizing, resumed: bool | None) -> None:
        self.sizings.append(sizing)

    def progress(self, step: int, total: int, info: dict[str, float]) -> None:
        self.progress_calls.append((step, total, info))


@dataclass
class World:
    """The fakes of one test, wired into `Ports`."""

    job: Any
    fits: list[FakeFit]
    identity: FakeIdentity = field(default_factory=FakeIdentity)
    run: FakeRun = field(default_factory=FakeRun)
    ui: FakeUI = field(default_factory=FakeUI)
    scaler: FakeScaler | None = None
    sizing: Callable[[int | None], Sizing] = lambda cap: Sizing(2, 64)
    total_steps: int = 10
    prepared: int = 0
    sized_with: list[int | None] = field(default_factory=list)
    started: list[Any] = field(default_factory=list)
    stops: int = 0
    clears: int = 0
    registered: int = 0
    now: float = 0.0
    current: FakeFit | None = None
    on_poll: Callable[[World], None] | None = None

    def ports(self) -> Ports:
        return Ports(claim=lambda: self.identity, prepare=self._prepare, size=self._size,
                     open_run=lambda prepared, sizing, identity: self.run, start_fit=self._start_fit,
                     drain=self._drain, request_stop=self._stop, clear_stop=self._clear, register=self._register,
                     ui=self.ui, autoscale=self.scaler, slots=lambda: 4, clock=lambda: self.now, sleep=self._sleep)

    def _prepare(self) -> Prepared:
        self.prepared += 1
        return Prepared(self.job, False, SimpleNamespace(train_rows=320), 10, self.total_steps)

    def _size(self, prepared: Prepared, cap: int | None) -> Sizing:
        self.sized_with.append(cap)
        return self.sizing(cap)

    def _start_fit(self, prepared: Prepared, sizing: Sizing, workers: Any) -> FakeFit:
        self.started.append(workers)
        self.current = self.fits.pop(0)
        self.current.stopped_by = lambda: self.stops > 0
        return self.current

    def _drain(self) -> tuple[list[Event], dict[int, dict[str, Any]]]:
        if self.on_poll is not None:
            self.on_poll(self)
        batch = self.current.batches.pop(0) if self.current.batches else []
        workers = batch[0].workers if batch and isinstance(batch[0], GroupStarted) else 2
        return batch, {r: {"pid": 100 + r, "node_id": f"node-{r}"} for r in range(workers)}

    def _stop(self) -> None:
        self.stops += 1

    def _clear(self) -> None:
        self.clears += 1

    def _register(self, prepared: Prepared, outcome: FitOutcome, run: Any) -> str:
        self.registered += 1
        return "1"

    def _sleep(self, seconds: float) -> None:
        self.now += seconds


def resized_once(job: Any, monkeypatch: Any) -> World:
    """A job of 1 to 2 workers whose first group is re-planned down to 1 worker at step 5 and stops
    there for the resize; its second group trains to step 10."""
    from orchestrator import constants
    from orchestrator.driver import replan as replan_module
    from orchestrator.driver.policies import Resize
    from orchestrator.driver.replan import Replan

    monkeypatch.setattr(constants, "REPLAN_MIN_STEPS", 4)
    monkeypatch.setattr(replan_module, "replan", lambda group, **kwargs: Replan(
        Resize(1, "resize 2 -> 1 worker: faster"), None, None, {"refit": {"scale": 1.0, "compute_scale": 1.0}}, "text"))
    monkeypatch.setattr(replan_module, "predicted_at", lambda *a: object())
    monkeypatch.setattr(replan_module, "comparison", lambda observed, predicted: {})
    first = FakeFit([[group()], [steps(1, 5)], [GroupEnded(step=5, reason="stopped")]], FitOutcome({"step": 5}))
    return World(job, [first, finished_fit(workers=1)], sizing=lambda cap: Sizing((1, 2), 64))


def finished_fit(total: int = 10, workers: int = 2) -> FakeFit:
    return FakeFit([[group(0, workers)], [steps(1, total)], [GroupEnded(step=total, reason="finished")]],
                   FitOutcome({"step": total}))
