"""The tracker, spill files and replay with an in-memory store: no server, milliseconds each.

The fake store keeps what the tracker relies on in MLflow (a run found by its run-key tag, an
identical metric point stored once, params set once) and can be down (refusing), stalled
(blocking the sender thread until released) or refusing one kind of operation. The same
behaviours against a real `mlflow server` are in test_tracking_server.py.
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
from orchestrator.errors import UserError
from orchestrator.tracking import ResolvedRun, Tracker, default_spill_dir, replay, store
from orchestrator.tracking.spill import fully_sent, send_file, spill_path
from orchestrator.tracking.writer import Writer

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
                 start_ms: int) -> ResolvedRun:
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
        return ResolvedRun(run.run_id, "1", f"file:///fake/{run.run_id}", resumed,
                           last.get(floor_key) if resumed else None, dict(run.params), dict(run.tags), last)

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


def _log_steps(run, steps: range, *, value: float = 1.0) -> None:
    for step in steps:
        run.log_metrics({"train/loss": value}, step=step, timestamp_ms=1_000_000 + step, per_step=True)


def _wait(check, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_calls_return_while_the_store_is_stalled_and_then_everything_arrives(fake: FakeStore, tracker: Tracker,
                                                                             tmp_path: Path) -> None:
    fake.released.clear()  # the sender thread blocks inside its first request, for as long as the test wants
    run = tracker.open_run(experiment="e", run_key="k", run_name="job")
    plot = tmp_path / "scaling.png"
    plot.write_text("plot v1")
    run.log_params({"training.lr": 0.1, "tracking.password": "hunter2", "uri": "http://me:pw@host/x"})
    run.set_tags({"phase": "one"})
    run.log_artifact(plot, "plan")
    plot.write_text("plot v2")  # the copy was taken at call time
    run.log_dict({"a": 1}, "config/resolved.json")
    run.log_dataset(name="digits", uri="/data", rows=10, schema={"x": "float"})
    _log_steps(run, range(50))
    run.set_tags({"phase": "two"})
    run.finish("KILLED")
    assert run.run_id is None and fake.calls == 0  # everything above returned while the store held the thread
    fake.released.set()
    report = tracker.close(timeout_s=5)
    got = fake.run("k")
    assert run.run_id == got.run_id and run.resumed is False
    assert got.steps() == list(range(50)) and [p[2] for p in got.points] == [1_000_000 + s for s in range(50)]
    assert got.params == {"training.lr": "0.1", "tracking.password": "***", "uri": "http://host/x"}
    assert got.tags["phase"] == "two" and got.status == "KILLED"
    assert got.artifacts == {"plan/scaling.png": "plot v1", "config/resolved.json": '{\n  "a": 1\n}'}
    assert got.datasets == ["digits"]
    assert report.spill_file is None and report.sent_points == 50 and not tracker.spill_file.exists()


def test_queue_is_bounded_the_oldest_spill_and_go_before_the_queue(fake: FakeStore, spill_dir: Path) -> None:
    fake.down = True
    tracker = Tracker(URI, spill_dir=spill_dir, max_queued=20)
    run = tracker.open_run(experiment="e", run_key="k", run_name="job")
    _log_steps(run, range(100))
    assert tracker.queued_in_memory <= 20 and tracker.waiting == 101  # the open operation and 100 points
    assert not fully_sent(tracker.spill_file)  # the other 81 or more are there, while the job runs
    fake.down = False
    report = tracker.close(timeout_s=5)
    assert fake.run("k").steps() == list(range(100))  # once each, in the order logged: the file first
    assert report.spill_file is None
    assert any("now wait in" in w for w in report.warnings)


def test_a_run_resumed_during_an_outage_drops_steps_at_or_below_its_floor(fake: FakeStore, spill_dir: Path) -> None:
    first = Tracker(URI, spill_dir=spill_dir)
    _log_steps(first.open_run(experiment="e", run_key="k", run_name="job"), range(10), value=1.0)
    first.close(timeout_s=5)
    fake.down = True
    second = Tracker(URI, spill_dir=spill_dir)
    run = second.open_run(experiment="e", run_key="k", run_name="job")
    _log_steps(run, range(5, 15), value=2.0)  # resumed from a checkpoint at step 4: steps 5-9 trained again
    run.log_metrics({"restarts": 1}, step=5)  # a driver point, not per step: kept
    run.log_dict({"new": True}, "config/new.json", new_run_only=True)
    fake.down = False
    second.close(timeout_s=5)
    got = fake.run("k")
    assert run.resumed is True and run.resume_floor == 9
    assert got.steps() == list(range(15))
    assert [p[1] for p in got.points if p[0] == "train/loss"] == [1.0] * 10 + [2.0] * 5
    assert got.steps("restarts") == [5] and "config/new.json" not in got.artifacts


def test_warnings_say_the_server_is_down_with_what_waits_and_when_it_is_back(fake: FakeStore, tracker: Tracker) -> None:
    fake.down = True
    run = tracker.open_run(experiment="e", run_key="k", run_name="job")
    _log_steps(run, range(3))
    _wait(lambda: any("did not take" in w for w in tracker._warnings))
    fake.down = False
    _wait(lambda: any("answers again" in w for w in tracker._warnings))
    drained = tracker.drain_warnings()
    assert "operations and metric points wait to be sent (retrying)" in drained[0]
    assert any("answers again: sent 4 operations and metric points" in w for w in drained)
    assert tracker.drain_warnings() == []


def test_a_refused_operation_is_dropped_and_the_rest_still_goes(fake: FakeStore, tracker: Tracker) -> None:
    fake.refuse.add("log_params")
    run = tracker.open_run(experiment="e", run_key="k", run_name="job")
    run.log_params({"a": 1})
    _log_steps(run, range(3))
    report = tracker.close(timeout_s=5)
    assert fake.run("k").steps() == [0, 1, 2] and fake.run("k").params == {}
    assert any("params operation could not be sent" in w for w in report.warnings)


def _spill_while_down(fake: FakeStore, spill_dir: Path, run_key: str, steps: range):
    fake.down = True
    tracker = Tracker(URI, spill_dir=spill_dir)
    run = tracker.open_run(experiment="e", run_key=run_key, run_name="job")
    run.log_params({"lr": 0.1})
    _log_steps(run, steps)
    run.finish()
    report = tracker.close(timeout_s=0.2)
    fake.down = False
    return report


def test_close_spills_and_replay_sends_each_line_once_however_often_it_runs(fake: FakeStore, spill_dir: Path) -> None:
    report = _spill_while_down(fake, spill_dir, "k", range(30))
    path = spill_path(spill_dir, URI, "k")
    assert report.spill_file == path and (report.waiting_points, report.waiting_operations) == (30, 3)
    assert report.replay_command == f"orchestrator tracking replay {path} --tracking-uri {URI}"
    assert fake.runs == {}

    fake.down, calls = True, fake.calls
    with pytest.raises(UserError, match="run the same command again"):
        replay(path, URI)
    fake.down = False
    result = replay(path, URI)
    assert (result.points, result.operations) == (30, 3) and not result.incomplete
    assert replay(path, URI).points == 0  # twice in a row: nothing sent again
    assert fake.opens == 1 and fake.run("k").steps() == list(range(30)) and fake.run("k").status == "FINISHED"
    assert fake.calls > calls


def test_replay_that_died_halfway_resends_at_most_one_batch_and_creates_one_run(fake: FakeStore,
                                                                               spill_dir: Path) -> None:
    _spill_while_down(fake, spill_dir, "k", range(2500))  # three batches of points after the open
    path = spill_path(spill_dir, URI, "k")
    writer = Writer(fake)
    original = fake.log_metrics

    def stored_but_no_answer(run_id: str, points: list) -> None:
        original(run_id, points)
        raise ConnectionError("the replay dies here")

    fake.log_metrics = stored_but_no_answer  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        send_file(path, writer)
    fake.log_metrics = original  # type: ignore[method-assign]
    result = replay(path, URI)  # a new process: the run comes from the progress record, not a second create
    assert fake.opens == 1 and fake.run("k").steps() == list(range(2500))
    assert result.points == 2500  # the first batch again (MLflow kept one copy), then the rest


def test_replay_leaves_a_torn_last_line_and_sends_lines_appended_later(fake: FakeStore, spill_dir: Path) -> None:
    _spill_while_down(fake, spill_dir, "k", range(5))
    path = spill_path(spill_dir, URI, "k")
    handle = next(iter(Path(path).read_text().splitlines())).split('"handle":"')[1].split('"')[0]
    line = ('{"op":"metrics","handle":"%s","t":1,"points":[["train/loss",0.5,2000000,99]],"per_step":true}\n'
            % handle).encode()
    with open(path, "ab") as f:
        f.write(line[:20])  # a job still writing this line
    result = replay(path, URI)
    assert result.incomplete and fake.run("k").steps() == list(range(5))
    with open(path, "ab") as f:
        f.write(line[20:])
    assert replay(path, URI).points == 1 and fake.run("k").steps() == [*range(5), 99]


def test_replay_skips_lines_that_are_not_operations_and_sends_the_rest(fake: FakeStore, spill_dir: Path) -> None:
    _spill_while_down(fake, spill_dir, "k", range(3))
    path = spill_path(spill_dir, URI, "k")
    with open(path, "a") as f:  # JSON nested past the decoder's recursion limit, not JSON, not an operation
        f.write("[" * 100_000 + "]" * 100_000 + "\n" + "not json\n" + '{"op": "rm -rf"}\n')
    result = replay(path, URI)
    assert result.unreadable == 3 and fake.run("k").steps() == list(range(3))


def test_a_new_tracker_sends_an_earlier_jobs_spill_before_its_own_run(fake: FakeStore, spill_dir: Path) -> None:
    _spill_while_down(fake, spill_dir, "earlier", range(10))
    earlier = spill_path(spill_dir, URI, "earlier")
    tracker = Tracker(URI, spill_dir=spill_dir)
    run = tracker.open_run(experiment="e", run_key="now", run_name="job")
    assert run.wait_resolved(5)
    assert list(fake.runs.values())[0].run_key == "earlier"  # created first
    report = tracker.close(timeout_s=5)
    assert fake.run("earlier").steps() == list(range(10)) and fully_sent(earlier)
    assert report.other_replay_commands == ()


def test_other_servers_spills_are_left_alone(fake: FakeStore, spill_dir: Path) -> None:
    _spill_while_down(fake, spill_dir, "k", range(3))
    other = Tracker("http://127.0.0.1:10/another", spill_dir=spill_dir)
    other.open_run(experiment="e", run_key="k2", run_name="job").finish()
    other.close(timeout_s=5)
    assert [r.run_key for r in fake.runs.values()] == ["k2"]


def test_spill_files_are_named_by_server_and_run_key_in_the_cache(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_spill_dir() == tmp_path / "orchestrator" / "tracking"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_spill_dir() == Path.home() / ".cache" / "orchestrator" / "tracking"
    a = spill_path(tmp_path, "http://user:secret@host:5000/", "k")
    assert a == spill_path(tmp_path, "http://host:5000", "k")  # credentials are not part of the name
    assert a != spill_path(tmp_path, "http://host:5000", "k2") and "secret" not in str(a)
    assert a.name.split("-")[0] != spill_path(tmp_path, "http://other:5000", "k").name.split("-")[0]


def test_replay_of_a_missing_or_other_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such spill file"):
        replay(tmp_path / "nope.jsonl", URI)
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(UserError, match="not a spill file"):
        replay(tmp_path / "notes.txt", URI)
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(UserError, match=r"folder.jsonl: not a regular file \(a spill file is one\)$"):
        replay(tmp_path / "folder.jsonl", URI)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.jsonl", "notes.txt"]


def test_an_unwritable_spill_dir_is_a_one_line_error_at_open(fake: FakeStore, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    tracker = Tracker(URI, spill_dir=tmp_path / "a-file" / "spill")
    with pytest.raises(UserError, match=r"^tracking.spill_dir: cannot write to .*a-file/spill"):
        tracker.open_run(experiment="e", run_key="k", run_name="job")
    tracker.close(timeout_s=0)


def test_a_spill_that_cannot_be_written_keeps_the_operations_in_memory(
    fake: FakeStore, spill_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.down = True
    tracker = Tracker(URI, spill_dir=spill_dir, max_queued=5)
    run = tracker.open_run(experiment="e", run_key="k", run_name="job")

    def disk_full(self, ops: list) -> int:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr("orchestrator.tracking.spill.SpillWriter.append", disk_full)
        _log_steps(run, range(20))  # no call raises into the caller
        assert tracker.queued_in_memory == 21
    fake.down = False
    report = tracker.close(timeout_s=5)
    assert fake.run("k").steps() == list(range(20))
    assert sum("No space left on device" in w for w in report.warnings) == 1  # said once, not per call


def test_unreadable_and_malformed_lines_are_skipped_and_said(fake: FakeStore, spill_dir: Path) -> None:
    _spill_while_down(fake, spill_dir, "k", range(2))
    path = spill_path(spill_dir, URI, "k")
    lines = path.read_bytes().splitlines(keepends=True)
    handle = next(iter(path.read_text().splitlines())).split('"handle":"')[1].split('"')[0]
    broken = [b"not json\n", b'{"op":"metrics","handle":"%s","t":1}\n' % handle.encode(),
              b'{"op":"metrics","handle":"%s","t":1,"points":[["k"]],"per_step":false}\n' % handle.encode()]
    path.write_bytes(b"".join(lines[:2] + broken + lines[2:]))
    result = replay(path, URI)
    assert fake.run("k").steps() == [0, 1] and fake.run("k").status == "FINISHED"
    assert result.unreadable == 2 and any("malformed" in r for r in result.refusals)
