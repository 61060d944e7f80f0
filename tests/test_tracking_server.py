"""A real `mlflow server` (sqlite backend, proxied artifacts on 127.0.0.1): artifacts go through
the proxy, and rank 0's MetricBuffer loses no point when the server stalls, dies and comes back,
or never comes back (then its spill file is replayed into the server).

The end-to-end case, a submitted job logging its run and artifacts to the server, is in
test_submit.py, which already runs the job."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_servers import MlflowServer, base_env, free_port, mlflow_server, run_cli
from mlflow.tracking import MlflowClient

from orchestrator import constants
from orchestrator.tracking import MetricBuffer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def server() -> Iterator[MlflowServer]:
    with mlflow_server() as srv:
        yield srv


@pytest.fixture()
def run_id(server: MlflowServer, request: pytest.FixtureRequest) -> str:
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("buffer") or client.get_experiment(client.create_experiment("buffer"))
    return client.create_run(experiment.experiment_id, run_name=request.node.name).info.run_id


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "TRACKING_RETRY_BASE_S", 0.2)
    monkeypatch.setattr(constants, "TRACKING_RETRY_MAX_S", 1.0)
    monkeypatch.setattr(constants, "TRACKING_REQUEST_TIMEOUT_S", 2.0)


def _add_steps(buffer: MetricBuffer, steps: range) -> float:
    """Log like rank 0 does; returns the longest time one `add` took."""
    slowest = 0.0
    for step in steps:
        start = time.perf_counter()
        buffer.add({"train/loss": 1.0 / (step + 1), "train/samples_per_s": 1000.0 + step}, step=step)
        slowest = max(slowest, time.perf_counter() - start)
        time.sleep(0.02)
    return slowest


def _steps(server: MlflowServer, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in MlflowClient(server.uri).get_metric_history(run_id, key))


def test_artifacts_go_through_the_server_proxy(server: MlflowServer, run_id: str, tmp_path: Path) -> None:
    client = MlflowClient(server.uri)
    plot = tmp_path / "scaling.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64)
    client.log_artifact(run_id, str(plot), "plan")
    assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    stored = list(server.artifacts.rglob(f"{run_id}/artifacts/plan/scaling.png"))
    assert stored and stored[0].read_bytes() == plot.read_bytes()
    back = client.download_artifacts(run_id, "plan/scaling.png", str(tmp_path / "back"))
    assert Path(back).read_bytes() == plot.read_bytes()


def test_stalled_server_never_blocks_training_and_gets_every_point(
    server: MlflowServer, run_id: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    buffer = MetricBuffer(tracking_uri=server.uri, run_id=run_id, spill_dir=tmp_path, flush_every_s=0.1)
    _add_steps(buffer, range(0, 10))
    _signal_group(server, signal.SIGSTOP)  # alive but answering nothing: a slow server at its worst
    try:
        with caplog.at_level(logging.WARNING, logger="orchestrator.tracking"):
            slowest = _add_steps(buffer, range(10, 60))
            time.sleep(3)  # at least one request times out
    finally:
        _signal_group(server, signal.SIGCONT)
    assert slowest < 0.5, f"add() blocked for {slowest:.2f}s while the server stalled"
    assert any("metric points wait to be sent" in r.getMessage() for r in caplog.records)
    assert buffer.close(timeout_s=30) is None
    # At least once: a request that timed out may also have been stored, so duplicates are allowed.
    assert set(_steps(server, run_id)) == set(range(60))


def test_server_killed_mid_run_and_restarted_loses_no_point(
    server: MlflowServer, run_id: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    buffer = MetricBuffer(tracking_uri=server.uri, run_id=run_id, spill_dir=tmp_path, flush_every_s=0.1)
    _add_steps(buffer, range(0, 20))
    server.stop(signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking"):
        _add_steps(buffer, range(20, 60))
        time.sleep(1)
        waiting = buffer.pending
        server.start()
        _add_steps(buffer, range(60, 80))
        assert buffer.close(timeout_s=30) is None
    assert waiting >= 2 * 40 - 2  # the points logged while it was down (two keys a step) waited
    messages = [r.getMessage() for r in caplog.records]
    assert any("MLflow unreachable" in m for m in messages) and any("MLflow is back" in m for m in messages)
    assert _steps(server, run_id) == list(range(80))
    assert _steps(server, run_id, "train/samples_per_s") == list(range(80))


def test_server_that_never_returns_spills_to_a_file_that_replay_sends(
    server: MlflowServer, run_id: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gone = f"http://127.0.0.1:{free_port()}"  # the run's server, as seen by a job after it died for good
    buffer = MetricBuffer(tracking_uri=gone, run_id=run_id, spill_dir=tmp_path, flush_every_s=0.1)
    _add_steps(buffer, range(25))
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking"):
        spill = buffer.close(timeout_s=2)
    assert spill == tmp_path / f"unsent-metrics-{run_id}.jsonl"
    assert len(spill.read_text().splitlines()) == 2 * 25
    assert any(str(spill) in r.getMessage() for r in caplog.records)  # the user is told where

    result = run_cli(["tracking", "replay", str(spill), "--tracking-uri", server.uri], env=base_env())
    assert result.returncode == 0, result.stderr
    assert "sent 50 metric points" in result.stdout and not spill.exists()
    assert _steps(server, run_id) == list(range(25))


def _signal_group(server: MlflowServer, sig: int) -> None:
    os.killpg(server.proc.pid, sig)
