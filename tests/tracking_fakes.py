"""An in-memory MLflow for the tracker's tests: no server, milliseconds each.

The fake store keeps what the tracker relies on in MLflow (a run found by its run-key tag, an
identical metric point stored once, params set once) and can be down (refusing), stalled
(blocking the sender thread until released) or refusing one kind of operation. Import the
fixtures into a test module to use them (`quick` is autouse there).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from orchestrator import constants
from orchestrator.tracking import ResolvedRun, Tracker, store
from orchestrator.tracking.ops import RUN_KEY_TAG

URI = "http://127.0.0.1:9/fake"


@dataclass
class FakeRun:
    run_id: str
    run_key: str
    creator: str
    status: str = "RUNNING"
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    points: list[tuple[str, float, int, int]] = field(default_factory=list)  # in arrival order
    seen: set[tuple[str, float, int, int]] = field(default_factory=set)
    artifacts: dict[str, str] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)

    def steps(self, key: str = "train/loss") -> list[int]:
        return [p[3] for p in self.points if p[0] == key]


class FakeStore:
    """Stands in for orchestrator.tracking.store.Store (same methods)."""

    def __init__(self, tracking_uri: str = URI, *, timeout_s: float = 1.0) -> None:
        self.tracking_uri, self.timeout_s = tracking_uri, timeout_s
        self.runs: dict[str, FakeRun] = {}
        self.down = False
        self.released = threading.Event()
        self.released.set()
        self.refuse: set[str] = set()  # method names answered with INVALID_PARAMETER_VALUE
        self.calls = self.opens = 0

    def _call(self, name: str) -> None:
        self.released.wait()
        self.calls += 1
        if self.down:
            raise ConnectionError("connection refused")
        if name in self.refuse:
            raise MlflowException(f"{name} refused", INVALID_PARAMETER_VALUE)

    def run(self, run_key: str) -> FakeRun:
        return next(r for r in self.runs.values() if r.run_key == run_key)

    def open_run(self, *, experiment: str, run_key: str, run_name: str, handle: str, floor_key: str,
                 start_ms: int, may_be_stale: bool = True) -> ResolvedRun:
        self._call("open_run")
        self.opens += 1
        found = [r for r in self.runs.values() if r.run_key == run_key]
        if not found:
            run = FakeRun(uuid.uuid4().hex, run_key, handle)
            self.runs[run.run_id] = run
        run = found[0] if found else run
        resumed = run.creator != handle
        run.status = "RUNNING"
        last = {}
        for key, _, _, step in run.points:
            last[key] = max(step, last.get(key, step))
        # as MLflow answers: the run's tags hold the run key it was made with
        return ResolvedRun(run.run_id, "1", f"file:///fake/{run.run_id}", resumed, last.get(floor_key) if resumed
                           else None, dict(run.params), {RUN_KEY_TAG: run.run_key, **run.tags}, last)

    def run_key(self, run_id: str) -> str | None:
        self._call("run_key")
        run = self.runs.get(run_id)
        return None if run is None else run.run_key

    def log_metrics(self, run_id: str, points: list) -> None:
        self._call("log_metrics")
        run = self.runs[run_id]
        for key, value, stamp, step in points:
            point = (key, value, stamp, step)
            if point not in run.seen:  # MLflow keeps one copy of an identical point
                run.seen.add(point)
                run.points.append(point)

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        self._call("log_params")
        self.runs[run_id].params.update(params)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self._call("set_tags")
        self.runs[run_id].tags.update(tags)

    def set_status(self, run_id: str, status: str, end_ms: int) -> None:
        self._call("set_status")
        self.runs[run_id].status = status

    def log_text(self, run: ResolvedRun, text: str, name: str) -> None:
        self._call("log_text")
        self.runs[run.run_id].artifacts[name] = text

    def log_artifact(self, run: ResolvedRun, local: Path, artifact_path: str | None) -> None:
        self._call("log_artifact")
        self.runs[run.run_id].artifacts[f"{artifact_path}/{local.name}"] = local.read_text()

    def log_dataset(self, run_id: str, *, name: str, uri: str, rows: int, schema: dict[str, str]) -> None:
        self._call("log_dataset")
        self.runs[run_id].datasets.append(name)


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "TRACKING_FLUSH_S", 0.02)
    monkeypatch.setattr(constants, "TRACKING_RETRY_BASE_S", 0.02)
    monkeypatch.setattr(constants, "TRACKING_RETRY_MAX_S", 0.1)
    monkeypatch.setattr(constants, "TRACKING_REPLAY_LOCK_WAIT_S", 0.5)


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeStore:
    """The store every Tracker and replay of the test talks to."""
    the_store = FakeStore()
    monkeypatch.setattr(store, "Store", lambda uri, *, timeout_s: the_store)
    return the_store


@pytest.fixture()
def spill_dir(tmp_path: Path) -> Path:
    return tmp_path / "spill"


@pytest.fixture()
def tracker(spill_dir: Path) -> Iterator[Tracker]:
    t = Tracker(URI, spill_dir=spill_dir)
    yield t
    t.close(timeout_s=0)


def log_steps(run, steps: range, *, value: float = 1.0) -> None:
    for step in steps:
        run.log_metrics({"train/loss": value}, step=step, timestamp_ms=1_000_000 + step, per_step=True)


def wait_for(check, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def spill_while_down(fake: FakeStore, spill_dir: Path, run_key: str, steps: range):
    fake.down = True
    tracker = Tracker(URI, spill_dir=spill_dir)
    run = tracker.open_run(experiment="e", run_key=run_key, run_name="job")
    run.log_params({"lr": 0.1})
    log_steps(run, steps)
    run.finish()
    report = tracker.close(timeout_s=0.2)
    fake.down = False
    return report
