"""The driver's controller under injected faults, with fakes (no Ray, no MLflow): whatever fails and
wherever, the run it opened ends with the true status and is closed, the autoscaler request is
withdrawn, the job's lock released and a worker group still training asked to stop."""

from __future__ import annotations

import dataclasses
import errno

import pytest
from driver_fakes import FakeFit, FakeScaler, World, finished_fit, group, resized_once, steps

from orchestrator.config import validate
from orchestrator.driver.controller import JobController
from orchestrator.driver.ports import FitOutcome
from orchestrator.driver.policies import State

BASE = {"name": "job", "model": {"name": "mlp"}, "training": {"max_steps": 10, "global_batch_size": 32},
        "data": {"path": "data", "features": {"column": "x", "dtype": "float32"}}}


def job(**resources):
    return validate({**BASE, "resources": resources})


def fail(exc: BaseException):
    def raising(*args, **kwargs):
        raise exc
    return raising


def test_a_job_record_the_disk_has_no_room_for_still_ends_and_closes_the_run() -> None:
    # Training finished; writing job.json hit a full disk: the run was left RUNNING, never closed
    # (what MLflow had not taken was neither sent nor spilled), the lock kept.
    world = World(job(), [finished_fit()])
    full = OSError(errno.ENOSPC, "No space left on device", "runs/job/job.json")
    world.identity.mark_finished = fail(full)
    controller = JobController(world.job, world.ports())
    with pytest.raises(OSError, match="No space left"):
        controller.run()
    assert controller.state is State.FAILED and world.run.status == "FAILED" and world.run.closed
    assert world.identity.released


def test_an_autoscaler_that_cannot_withdraw_its_request_still_ends_the_run_and_releases_the_lock() -> None:
    scaler = FakeScaler([2])
    scaler.release = fail(ConnectionError("GCS unreachable"))
    world = World(job(workers=2), [FakeFit([[steps(1, 3)]], FitOutcome({"step": 3}))], scaler=scaler)
    ports = dataclasses.replace(world.ports(), start_fit=fail(RuntimeError("no placement group")))
    with pytest.raises((RuntimeError, ConnectionError)):
        JobController(world.job, ports).run()
    assert world.run.status == "FAILED" and world.run.closed and world.identity.released


def test_a_run_whose_end_cannot_be_queued_is_still_closed() -> None:
    world = World(job(), [FakeFit([[group()], [steps(1, 3)]], FitOutcome({}, error=ValueError("boom")))])
    world.run.finish = fail(RuntimeError("queue broken"))
    with pytest.raises((ValueError, RuntimeError)):
        JobController(world.job, world.ports()).run()
    assert world.run.closed and world.identity.released


def test_a_ui_that_fails_too_does_not_keep_the_workers_training_or_replace_the_failure() -> None:
    # stderr became a closed pipe: the driver's "stopping the worker group" line raised
    # BrokenPipeError before the stop was asked for, and that error replaced the driver's own.
    def broken_pipe(message: str) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def fail_after_first_steps(world: World) -> None:
        if world.current and len(world.current.batches) == 2:
            world.ui.status = broken_pipe
            raise RuntimeError("a progress callback broke")

    fit = FakeFit([[group()], [steps(1, 4)], [steps(5, 8)], [steps(9, 10)]], FitOutcome({"step": 10}))
    world = World(job(), [fit], on_poll=fail_after_first_steps)
    with pytest.raises(RuntimeError, match="progress callback"):
        JobController(world.job, world.ports()).run()
    assert world.stops == 1 and fit.done() and world.run.status == "FAILED" and world.identity.released


def test_a_failure_while_closing_does_not_replace_the_jobs_own_error() -> None:
    # The lease was taken over while the storage was down; releasing it (reading the lease back)
    # failed too, and that traceback replaced the one-line UserError (exit 2).
    from orchestrator.errors import UserError

    def taken_over(world: World) -> None:
        if world.current and len(world.current.batches) == 2:
            world.identity.lost = "pid 7 on other-host"

    fit = FakeFit([[group()], [steps(1, 4)], [steps(5, 8)], [steps(9, 10)]], FitOutcome({"step": 10}))
    world = World(job(), [fit], on_poll=taken_over)
    world.identity.release = fail(ConnectionError("storage unreachable"))
    with pytest.raises(UserError, match="taken over by pid 7"):
        JobController(world.job, world.ports()).run()
    assert world.run.status == "FAILED" and world.run.closed
    assert "could not release the job's lock: storage unreachable" in world.ui.statuses


def test_a_failed_job_says_what_mlflow_did_not_take_and_the_replay_command() -> None:
    # The closing lines that say it are printed from the result, which a failed job never returns:
    # the replay command was only logged at DEBUG.
    from orchestrator.errors import UserError

    unsent = "MLflow did not take 12 metric points and 3 other operations; they are in s.jsonl. Send them with: X"
    world = World(job(), [FakeFit([[group()], [steps(1, 3)]], FitOutcome({}, error=UserError("data: gone")))])
    world.run.unsent = [unsent]
    with pytest.raises(UserError, match="data: gone"):
        JobController(world.job, world.ports()).run()
    assert world.run.status == "FAILED" and unsent in world.ui.statuses
    finished = World(job(), [finished_fit()])
    finished.run.unsent = [unsent]
    JobController(finished.job, finished.ports()).run()
    assert unsent not in finished.ui.statuses  # said by the closing lines, from the result


def test_a_stop_after_a_restart_that_redid_steps_says_the_step_it_stopped_at() -> None:
    # Trained to 7, a worker died, the group resumed from the checkpoint at 5 and was stopped at 6:
    # it said "stopped at step 7" (steps the failed group trained and lost) and the rerun resumed from 6.
    import threading

    from orchestrator.console_ui import result_lines
    from trainers.events import GroupEnded, WorkerFailed

    stop = threading.Event()
    fit = FakeFit([[group()], [steps(1, 7)], [WorkerFailed(step=7, cause="rank 1: KilledError")], [group(5, resumed=5)],
                   [steps(6, 6)], [GroupEnded(step=6, reason="stopped")]], FitOutcome({"step": 6}))
    world = World(job(), [fit], on_poll=lambda w: stop.set() if len(w.current.batches) == 1 else None)
    result = JobController(world.job, world.ports(), stop=stop).run()
    assert result.stopped and result.final_step == 6 and result.metrics["train/loss"] == 1 / 6
    assert result_lines(result, tracking_uri="sqlite:///m.db")[0].startswith("stopped at step 6;")


def test_a_stop_while_resizing_starts_no_new_worker_group(monkeypatch: pytest.MonkeyPatch) -> None:
    # SIGTERM as the group stopped for a resize: a new group was started (placement, processes, a
    # restore) only to be told to stop at its first stop check.
    import threading

    world = resized_once(job(workers={"min": 1, "max": 2}), monkeypatch)
    stop = threading.Event()
    ports = dataclasses.replace(world.ports(), clear_stop=stop.set)  # the signal comes as it resizes
    result = JobController(world.job, ports, stop=stop).run()
    assert result.stopped and result.final_step == 5 and world.started == [(1, 2)]
    assert world.run.status == "KILLED"


def test_a_stop_while_profiling_asks_the_autoscaler_for_nothing() -> None:
    # Ctrl-C during the profile (tens of seconds): the plan's GPU nodes were still requested from
    # the autoscaler, which may launch them, before the job stopped and withdrew the request.
    import threading

    from orchestrator.driver.sizing import Sizing

    stop = threading.Event()
    scaler = FakeScaler([4])
    world = World(job(workers="auto"), [finished_fit()], scaler=scaler, sizing=lambda cap: Sizing(4, 64))
    size = world._size
    world._size = lambda prepared, cap: (stop.set(), size(prepared, cap))[1]
    result = JobController(world.job, world.ports(), stop=stop).run()
    assert result.stopped and scaler.requested == [] and not world.started and world.run.status is None


def test_a_lock_taken_over_while_sizing_starts_no_worker_group() -> None:
    # The lease was lost while the job was profiled (or waited for nodes): a worker group was started
    # and trained on the job beside its new holder until the first progress poll noticed.
    from orchestrator.errors import UserError

    world = World(job(), [finished_fit()])
    size = world._size

    def lost_while_sizing(prepared, cap):
        world.identity.lost = "pid 7 on other-host"
        return size(prepared, cap)

    world._size = lost_while_sizing
    with pytest.raises(UserError, match="taken over by pid 7"):
        JobController(world.job, world.ports()).run()
    assert not world.started and world.run.status is None and world.identity.released
