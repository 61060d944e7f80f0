"""The tracker against a real `mlflow server` (sqlite backend, proxied artifacts, 127.0.0.1): the run
page it writes; a server stalled (SIGSTOP), then killed and restarted mid-stream; a server down when
jobs start (a new run, a resumed run, and a job that ended during the outage); and a server that
never comes back, whose spill file `orchestrator tracking replay` (a real subprocess) sends (a torn
line completed later is sent by the next replay: test_tracking.py shows it without a server).

One server for the module; short timeouts and back-off through the constants. The same behaviours
with an in-memory store, in milliseconds, are in test_tracking.py.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_servers import MlflowServer, base_env, free_port, mlflow_server, run_cli
from mlflow.tracking import MlflowClient

from orchestrator import constants
from orchestrator.tracking import RUN_KEY_TAG, RunHandle, Tracker
from orchestrator.tracking.spill import SpillWriter, fully_sent
from orchestrator.tracking.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

T0 = 1_700_000_000_000  # points carry their own timestamps: T0 + step


@pytest.fixture(scope="module")
def server() -> Iterator[MlflowServer]:
    with mlflow_server() as srv:
        yield srv


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "TRACKING_FLUSH_S", 0.1)
    monkeypatch.setattr(constants, "TRACKING_RETRY_BASE_S", 0.2)
    monkeypatch.setattr(constants, "TRACKING_RETRY_MAX_S", 1.0)
    monkeypatch.setattr(constants, "TRACKING_REQUEST_TIMEOUT_S", 1.5)


def _open(uri: str, spill_dir: Path, key: str, **kwargs: int) -> tuple[Tracker, RunHandle]:
    tracker = Tracker(uri, spill_dir=spill_dir, **kwargs)
    return tracker, tracker.open_run(experiment="tracking-test", run_key=key, run_name=key)


def _log(run: RunHandle, steps: range, *, value: float = 1.0) -> float:
    """Log like the driver does for rank 0; returns the longest time one call took."""
    slowest = 0.0
    for step in steps:
        start = time.perf_counter()
        run.log_metrics({"train/loss": value, "train/samples_per_s": 1000.0 + step}, step=step,
                        timestamp_ms=T0 + step, per_step=True)
        slowest = max(slowest, time.perf_counter() - start)
        time.sleep(0.01)
    return slowest


def _history(server: MlflowServer, key: str, metric: str = "train/loss") -> list[tuple[int, float, int]]:
    """(step, value, timestamp) of every point of the run tagged with `key`, which must be the only one."""
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("tracking-test")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{key}'")
    assert len(runs) == 1, f"{len(runs)} runs for {key}"
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(runs[0].info.run_id, metric))


def _exactly_once(server: MlflowServer, key: str, steps: range) -> None:
    history = _history(server, key)
    assert [s for s, _, _ in history] == list(steps)  # sorted: each step once
    assert all(stamp == T0 + step for step, _, stamp in history)  # with its original timestamp


def _signal_group(server: MlflowServer, sig: int) -> None:
    os.killpg(server.proc.pid, sig)


def test_the_run_page_params_tags_description_artifacts_dataset(server: MlflowServer, tmp_path: Path) -> None:
    tracker, run = _open(server.uri, tmp_path, "page")
    plot = tmp_path / "scaling.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64)
    run.log_params({"training.lr": 0.1, "tracking.tracking_uri": "http://me:secret@host:5000", "s3.secret_key": "x"})
    run.set_tags({"git_commit": "abc"})
    run.set_description("**page**: a test run")
    run.log_artifact(plot, "plan")
    run.log_dict({"lr": 0.1}, "config/resolved.json")
    run.log_dataset(name="digits", uri=str(tmp_path), rows=10, schema={"x": "list<float32>", "y": "int64"})
    _log(run, range(3))
    run.finish()
    assert tracker.close(timeout_s=30).spill_file is None
    client = MlflowClient(server.uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.artifact_uri.startswith("mlflow-artifacts:")
    assert got.data.params == {"training.lr": "0.1", "tracking.tracking_uri": "http://host:5000",
                               "s3.secret_key": "***"}
    assert got.data.tags["git_commit"] == "abc" and got.data.tags["mlflow.note.content"] == "**page**: a test run"
    stored = list(server.artifacts.rglob(f"{run.run_id}/artifacts/plan/scaling.png"))  # through the proxy
    assert stored and stored[0].read_bytes() == plot.read_bytes()
    assert client.download_artifacts(run.run_id, "config/resolved.json", str(tmp_path / "back"))
    assert [d.dataset.name for d in got.inputs.dataset_inputs] == ["digits"]


def test_every_kind_of_request_is_bounded_while_the_server_stalls(server: MlflowServer, tmp_path: Path) -> None:
    bounded = Store(server.uri, timeout_s=0.5)
    run = bounded.open_run(experiment="tracking-test", run_key="bounded", run_name="bounded", handle="h",
                           floor_key="train/loss", start_ms=T0)
    (tmp_path / "f.txt").write_text("x")
    calls = {
        "open": lambda: bounded.open_run(experiment="tracking-test", run_key="bounded", run_name="bounded",
                                         handle="h2", floor_key="train/loss", start_ms=T0),
        "metrics": lambda: bounded.log_metrics(run.run_id, [["m", 1.0, T0, 0]]),
        "params": lambda: bounded.log_params(run.run_id, {"p": "1"}),
        "tags": lambda: bounded.set_tags(run.run_id, {"t": "1"}),
        "artifact": lambda: bounded.log_artifact(run, tmp_path / "f.txt", "a"),
        "text": lambda: bounded.log_text(run, "{}", "a/b.json"),
        "dataset": lambda: bounded.log_dataset(run.run_id, name="d", uri=str(tmp_path), rows=1, schema={"x": "f"}),
        "status": lambda: bounded.set_status(run.run_id, "FINISHED", T0),
    }
    outcome: dict[str, str] = {}

    def call_all() -> None:
        for name, call in calls.items():
            try:
                call()
                outcome[name] = "answered"
            except Exception as exc:  # noqa: BLE001 - the timeout is what is expected
                outcome[name] = type(exc).__name__

    _signal_group(server, signal.SIGSTOP)
    try:
        caller = threading.Thread(target=call_all, daemon=True)
        caller.start()
        caller.join(30)  # MLflow's own client would wait 120 s per attempt, and retry
        still_waiting = caller.is_alive()
    finally:
        _signal_group(server, signal.SIGCONT)
    assert not still_waiting and outcome == dict.fromkeys(calls, "MlflowException"), outcome


def test_stalled_then_killed_and_restarted_server_never_blocks_and_gets_every_point_once(
    server: MlflowServer, tmp_path: Path
) -> None:
    tracker, run = _open(server.uri, tmp_path, "stall-and-kill")
    slowest = _log(run, range(10))
    assert run.wait_resolved(30)
    _signal_group(server, signal.SIGSTOP)  # alive but answering nothing: a slow server at its worst
    try:
        slowest = max(slowest, _log(run, range(10, 40)))
        time.sleep(2)  # at least one request times out
    finally:
        _signal_group(server, signal.SIGCONT)
    _log(run, range(40, 50))
    server.stop(signal.SIGKILL)
    slowest = max(slowest, _log(run, range(50, 80)))
    server.start()
    _log(run, range(80, 100))
    run.finish()
    report = tracker.close(timeout_s=60)
    assert slowest < 0.5, f"a call took {slowest:.2f}s while the server stalled or was down"
    assert report.spill_file is None, report.lines()
    _exactly_once(server, "stall-and-kill", range(100))
    warnings = " ".join(report.warnings)
    assert "did not take the last request" in warnings and "answers again" in warnings


def test_jobs_that_start_while_the_server_is_down_lose_nothing(server: MlflowServer, tmp_path: Path) -> None:
    before, earlier = _open(server.uri, tmp_path, "resumed")
    _log(earlier, range(10), value=1.0)
    earlier.finish("KILLED")
    before.close(timeout_s=30)
    server.stop()
    ended, gone = _open(server.uri, tmp_path, "ended-during-outage")  # a job that ends while it is down
    _log(gone, range(5))
    gone.finish()
    left = ended.close(timeout_s=1)
    assert left.spill_file is not None and left.waiting_points == 2 * 5
    new_job, new = _open(server.uri, tmp_path, "new")
    new.log_params({"training.lr": 0.2})
    slowest = _log(new, range(20))
    resumed_job, resumed = _open(server.uri, tmp_path, "resumed")
    _log(resumed, range(5, 15), value=2.0)  # resumed from a checkpoint at step 4: steps 5-9 trained again
    resumed.log_dict({"config": "first run only"}, "config/config.json", new_run_only=True)
    assert new.run_id is None and resumed.run_id is None and slowest < 0.5
    server.start()
    assert new.wait_resolved(60) and resumed.wait_resolved(60)
    new.finish()
    resumed.finish()
    assert new_job.close(timeout_s=30).spill_file is None and resumed_job.close(timeout_s=30).spill_file is None
    _exactly_once(server, "new", range(20))
    _exactly_once(server, "ended-during-outage", range(5))  # sent by the next trackers by themselves
    assert fully_sent(left.spill_file)
    assert resumed.resumed is True and resumed.resume_floor == 9
    kept = [(s, v) for s, v, _ in _history(server, "resumed")]
    assert kept == [(s, 1.0) for s in range(10)] + [(s, 2.0) for s in range(10, 15)]  # steps 5-9: the first values
    client = MlflowClient(server.uri)
    assert client.get_run(new.run_id).data.params == {"training.lr": "0.2"}
    assert not client.list_artifacts(resumed.run_id, "config")


def test_a_server_that_never_returns_spills_and_replay_sends_it_once(server: MlflowServer, tmp_path: Path) -> None:
    gone = f"http://127.0.0.1:{free_port()}"  # the job's server, gone for good
    tracker, run = _open(gone, tmp_path, "never-returns", max_queued=10)  # spills while it runs
    run.log_params({"training.lr": 0.3})
    _log(run, range(20))
    path = tracker.spill_file
    replay = ["tracking", "replay", str(path), "--tracking-uri", server.uri]
    first = run_cli(replay, env=base_env())  # while the job still runs and appends
    assert first.returncode == 0, first.stderr
    assert int(re.search(r"sent (\d+) metric points", first.stdout)[1]) >= 2 * 10, first.stdout
    _log(run, range(20, 30))
    run.finish()
    report = tracker.close(timeout_s=1)
    assert report.spill_file == path
    assert report.replay_command == f"orchestrator tracking replay {path} --tracking-uri {gone}"
    live = SpillWriter(path)
    live.append([])  # a writer that has the file open, in the middle of a line
    with open(path, "ab") as f:
        f.write(path.read_bytes().splitlines(keepends=True)[-2][:25])
    second = run_cli(replay, env=base_env())  # the lines appended since the first, not the torn one
    assert second.returncode == 0 and "incomplete last line is left" in second.stdout, second.stdout + second.stderr
    third = run_cli(replay, env=base_env())  # twice in a row: nothing is sent again
    assert "sent 0 metric points and 0 other operations" in third.stdout, third.stdout + third.stderr
    assert "incomplete last line is left" in third.stdout
    live.close()
    _exactly_once(server, "never-returns", range(30))
    client = MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("tracking-test").experiment_id],
                              f"tags.`{RUN_KEY_TAG}` = 'never-returns'")
    assert runs[0].info.status == "FINISHED" and runs[0].data.params == {"training.lr": "0.3"}
