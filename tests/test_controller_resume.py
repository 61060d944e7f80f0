"""A rerun stopped before its worker group's first report, with fakes (no Ray, no MLflow):
milliseconds. The driver learned where a resumed job stands only from the group's reports, so a
rerun stopped before one said "stopped at step 0" and "MLflow run: none", although the job had
checkpoints and an MLflow run."""

from __future__ import annotations

import threading

import pytest
from driver_fakes import FakeFit, FakeIdentity, World

from orchestrator.config import validate
from orchestrator.console_ui import result_lines
from orchestrator.driver.controller import JobController
from orchestrator.driver.ports import Aborted, FitOutcome

BASE = {"name": "job", "model": {"name": "mlp"}, "training": {"max_steps": 200, "global_batch_size": 32},
        "data": {"path": "data", "features": {"column": "x", "dtype": "float32"}}}


def rerun(**kwargs) -> World:
    """A rerun of a job checkpointed at step 90, whose MLflow run an earlier driver recorded."""
    return World(validate(BASE), total_steps=200, identity=FakeIdentity(checkpoint_step=90, run_id="run-0"), **kwargs)


def test_a_rerun_stopped_while_preparing_names_its_checkpoints_step_and_its_run() -> None:
    stop = threading.Event()
    world = rerun(fits=[])
    prepare = world._prepare
    world._prepare = lambda: (stop.set(), prepare())[1]  # Ctrl-C while the data loads
    result = JobController(world.job, world.ports(), workers=1, stop=stop).run()
    assert result.stopped and not world.started and world.run.status is None  # still nothing started
    assert (result.final_step, result.run_id) == (90, "run-0")
    assert result_lines(result, tracking_uri="sqlite:///m.db")[:3] == [
        "stopped at step 90; run the same command again to resume.", "MLflow run: run-0", "final step: 90"]


def test_a_rerun_stopped_while_its_group_starts_ends_at_its_checkpoints_step() -> None:
    """The group leaves before its first report: the result and the run's summary say step 90."""
    stop = threading.Event()
    world = rerun(fits=[FakeFit([[], []], FitOutcome({}))], on_poll=lambda w: stop.set())
    result = JobController(world.job, world.ports(), workers=1, stop=stop).run()
    assert result.stopped and world.stops == 1 and world.run.status == "KILLED"
    assert (result.final_step, result.run_id) == (90, "run-1")
    summary = next(v for k, v in world.run.dicts.items() if k.startswith("summary/"))
    assert summary["final_step"] == 90


def test_a_rerun_aborted_before_its_groups_first_report_ends_at_its_checkpoints_step() -> None:
    def abort(world: World) -> None:
        raise KeyboardInterrupt  # a second Ctrl-C while the group starts

    world = rerun(fits=[FakeFit([[], []], FitOutcome({}))], on_poll=abort)
    with pytest.raises(Aborted) as raised:
        JobController(world.job, world.ports(), workers=1).run()
    assert (raised.value.result.final_step, raised.value.result.run_id) == (90, "run-1")
    assert "aborted at step 90; stopping the worker group" in world.ui.statuses


def test_the_run_is_recorded_for_the_next_rerun_once_mlflow_answers() -> None:
    stop = threading.Event()

    def answers_then_stop(world: World) -> None:
        world.run.run_id = "run-1"  # MLflow answered: the run the tracker found by the job's key
        stop.set()

    world = rerun(fits=[FakeFit([[], []], FitOutcome({}))], on_poll=answers_then_stop)
    world.run.run_id = None
    JobController(world.job, world.ports(), workers=1, stop=stop).run()
    assert world.identity.run_id == "run-1"


def test_a_driver_whose_lease_was_taken_over_leaves_job_json_to_its_new_holder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MLflow answers only as the run is closed, after the lease was lost: recording the run then
    wrote this driver's stale job.json over the one the new holder keeps."""
    from orchestrator.errors import UserError

    world = rerun(fits=[FakeFit([[], [], []], FitOutcome({}))],
                  on_poll=lambda w: setattr(w.identity, "lost", "driver-2"))
    world.run.run_id = None
    saved: list[str] = []
    monkeypatch.setattr(world.identity, "save_run_id", saved.append)
    close = world.run.close
    monkeypatch.setattr(world.run, "close", lambda: (setattr(world.run, "run_id", "run-1"), close())[1])
    with pytest.raises(UserError, match="taken over by driver-2"):
        JobController(world.job, world.ports(), workers=1).run()
    assert saved == []
