"""A spill file replayed after a later run of its job logged to MLflow (the later driver used another
spill_dir, or spelled the server differently): the replay adds the history only it has and never
overwrites the later driver's status, points, tags or artifacts. Against a real MLflow (sqlite).
"""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import pytest
from tracking_fakes import quick  # noqa: F401 (fixture)

from orchestrator.tracking import Tracker, replay
from orchestrator.tracking.ops import floor_and_cut, later_driver

DOWN = "http://127.0.0.1:9"  # nothing listens: the first driver spills everything


def _driver(uri: str, spill_dir: Path, steps: range, *, value: float, plan: str, state: str, status: str,
            extra: bool = False):
    tracker = Tracker(uri, spill_dir=spill_dir)
    run = tracker.open_run(experiment="e", run_key="k", run_name="job")
    time.sleep(0.01)  # its points come after its open, as a trained step's do
    for step in steps:
        run.log_metrics({"train/loss": value}, step=step, timestamp_ms=None, per_step=True)
    run.set_tags({"orchestrator.state": state})
    run.log_dict({"plan": plan}, "plan/plan.json")
    if extra:
        run.log_dict({"only": plan}, "plan/plan_before_autoscale.json")
    run.finish(status)
    report = tracker.close(timeout_s=0.5 if uri == DOWN else 30)
    time.sleep(0.01)  # the next driver opens later
    return report


def test_a_stale_spill_file_adds_its_missing_steps_and_overwrites_nothing(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _driver(uri, tmp_path / "a", range(0, 10), value=0.0, plan="first", state="killed", status="KILLED")
    # The second driver cannot reach MLflow: it resumed from step 5 and trained to 19, all spilled.
    report = _driver(DOWN, tmp_path / "a", range(5, 20), value=1.0, plan="second", state="killed",
                     status="KILLED", extra=True)
    assert report.spill_file is not None
    # The third reaches MLflow (from another spill_dir): it resumed from the second's checkpoint at 15.
    _driver(uri, tmp_path / "b", range(15, 30), value=2.0, plan="third", state="done", status="FINISHED")

    result = replay(report.spill_file, uri)

    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("e").experiment_id])[0]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert history == [(s, 0.0) for s in range(10)] + [(s, 1.0) for s in range(10, 15)] + [(s, 2.0) for s in range(15, 30)]
    assert run.info.status == "FINISHED" and run.data.tags["orchestrator.state"] == "done"
    artifacts = Path(run.info.artifact_uri.removeprefix("file://")) / "plan"
    assert '"third"' in (artifacts / "plan.json").read_text()
    assert '"second"' in (artifacts / "plan_before_autoscale.json").read_text()  # the run lacked it
    assert result.points == 5 and result.kept == 3  # the finish, the state tag, plan.json
    assert any("later driver" in line for line in result.lines(report.spill_file))
    assert replay(report.spill_file, uri).points == 0


def test_a_live_rerun_is_not_taken_for_stale_and_resumes_the_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _driver(uri, tmp_path / "a", range(0, 10), value=0.0, plan="first", state="killed", status="KILLED")
    _driver(uri, tmp_path / "a", range(5, 20), value=1.0, plan="second", state="done", status="FINISHED")
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("e").experiment_id])[0]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert history == [(s, 0.0) for s in range(10)] + [(s, 1.0) for s in range(10, 20)]
    assert run.info.status == "FINISHED" and run.data.tags["orchestrator.state"] == "done"


def test_the_running_driver_is_never_stale_whatever_an_earlier_drivers_clock_said(tmp_path: Path) -> None:
    """The running driver holds the job: an earlier driver whose clock ran an hour ahead (or a tag
    edited by hand) must not leave its status, tags and artifacts unwritten."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _driver(uri, tmp_path / "a", range(0, 10), value=0.0, plan="first", state="killed", status="KILLED")
    client = mlflow.MlflowClient(uri)
    run_id = client.search_runs([client.get_experiment_by_name("e").experiment_id])[0].info.run_id
    client.set_tag(run_id, "orchestrator.opened_ms", str(int(time.time() * 1000) + 3_600_000))
    _driver(uri, tmp_path / "a", range(5, 20), value=1.0, plan="second", state="done", status="FINISHED")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["orchestrator.state"] == "done"
    assert '"second"' in (Path(run.info.artifact_uri.removeprefix("file://")) / "plan" / "plan.json").read_text()


@pytest.mark.parametrize(("tags", "start", "end", "stale"), [
    ({"orchestrator.opened_ms": "200"}, 50, None, True),  # a driver opened it later
    ({"orchestrator.opened_ms": "90"}, 50, 80, False),  # earlier drivers only
    ({}, 150, None, True),  # created after this handle opened (a run from before the tag existed)
    ({}, 50, 150, True),  # finished after it opened
    ({"orchestrator.opened_ms": "not a time"}, 50, None, False),
])
def test_later_driver_reads_the_drivers_clocks(tags: dict, start: int, end: int | None, stale: bool) -> None:
    assert later_driver(100, tags=tags, start_ms=start, end_ms=end) is stale


def test_floor_and_cut_split_the_history_at_the_handles_open() -> None:
    assert floor_and_cut([(1, 10), (2, 20), (7, 300), (8, 310)], 100) == (2, 7)
    assert floor_and_cut([], 100) == (None, None)
