"""A tracking outage never stops training: real jobs on the session cluster against a real
`mlflow server` that dies mid-run for 60 s, or is down for a job's whole life.

Afterwards MLflow holds one run with every step's points exactly once, each with the step and
the time the worker measured it; the checkpoints verify; what could not be sent waited in a local
spill file that the next run against the server sent by itself.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from live_servers import mlflow_server
from mlflow.tracking import MlflowClient
from ray_util import RecordingUI

from orchestrator import constants
from orchestrator.config import load_config
from orchestrator.driver import State, run_job
from trainers import checkpoint as ckpt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"
OUTAGE_S = 60.0


@pytest.fixture(autouse=True)
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "TRACKING_REQUEST_TIMEOUT_S", 2.0)
    monkeypatch.setattr(constants, "TRACKING_RETRY_BASE_S", 0.2)
    monkeypatch.setattr(constants, "TRACKING_RETRY_MAX_S", 2.0)
    monkeypatch.setattr(constants, "TRACKING_CLOSE_TIMEOUT_S", 3.0)


def _job(tmp_path: Path, digits: Path, uri: str, *extra: str):
    return load_config(DIGITS, [
        f"data.path={digits}", f"checkpoint.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri={uri}",
        f"tracking.spill_dir={tmp_path / 'spill'}", "tracking.registered_model=outage", "resources.profile=false",
        "data.val_fraction=0", "checkpoint.every_steps=10", "training.epochs=null", *extra])


def _points(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[tuple[int, int]]:
    return sorted((m.step, m.timestamp) for m in client.get_metric_history(run_id, key))


def _assert_every_step_once_in_order(points: list[tuple[int, int]], last: int) -> None:
    assert [s for s, _ in points] == list(range(1, last + 1))  # once each, none lost
    stamps = [t for _, t in points]
    assert stamps == sorted(stamps), "a point lost its original time"


def test_a_60_s_outage_mid_run_loses_nothing_and_stops_nothing(ray_cluster, digits_data, tmp_path: Path) -> None:
    with mlflow_server() as server:
        job = _job(tmp_path, digits_data, server.uri, "training.max_steps=100000")
        stop = threading.Event()
        timeline: dict[str, float] = {}

        def during(step: int, total: int, info: dict) -> None:
            if "killed" not in timeline and step >= 30:
                server.stop()
                timeline.update(killed=time.monotonic(), killed_step=step)
                restart = threading.Timer(OUTAGE_S, lambda: (server.start(), timeline.update(back=time.monotonic(),
                                                                                             back_step=ui.last_step)))
                restart.daemon = True
                restart.start()
            if "back" in timeline and step >= timeline["back_step"] + 30:
                stop.set()

        ui = RecordingUI(on_progress=during)
        result = run_job(job, workers=2, ui=ui, stop=stop)

        assert result.state is State.STOPPED and "back" in timeline
        assert timeline["back_step"] > timeline["killed_step"] + 20, timeline  # training went on while it was down
        assert any("did not take the last request" in s for s in ui.statuses), ui.statuses
        client = MlflowClient(server.uri)
        runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
        assert len(runs) == 1 and runs[0].info.run_id == result.run_id and runs[0].info.status == "KILLED"
        _assert_every_step_once_in_order(_points(client, result.run_id), result.final_step)
        newest = ckpt.candidates(tmp_path / "runs" / job.name)[0]
        assert ckpt.read(newest)["step"] == result.final_step  # the final checkpoint verifies


def test_a_job_started_while_the_server_is_down_finishes_and_the_next_run_sends_its_records(
    ray_cluster, digits_data, tmp_path: Path
) -> None:
    with mlflow_server() as server:
        server.stop()
        job = _job(tmp_path, digits_data, server.uri, "training.max_steps=40")
        ui = RecordingUI()
        first = run_job(job, workers=2, ui=ui)
        assert first.state is State.FINISHED and first.final_step == 40 and first.run_id is None
        assert first.model_version is None and any("model not logged" in s for s in ui.statuses)
        report = first.tracking
        assert report.spill_file is not None and report.spill_file.is_file() and report.waiting_points > 0
        assert "orchestrator tracking replay" in report.replay_command and str(report.spill_file) in report.replay_command
        assert ckpt.read(ckpt.candidates(tmp_path / "runs" / job.name)[0])["step"] == 40

        server.start()
        back_at_ms = int(time.time() * 1000)
        again = run_job(job, workers=2, ui=RecordingUI())  # complete: sends the spill, logs the model
        assert again.already_complete is not None and again.model_version == "1"
        client = MlflowClient(server.uri)
        runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        points = _points(client, runs[0].info.run_id)
        _assert_every_step_once_in_order(points, 40)
        assert points[-1][1] < back_at_ms  # logged with the time it was measured, not the time it was sent
        assert client.get_model_version("outage", "1").run_id == runs[0].info.run_id
