"""The driver's controller through every transition, with fakes (no Ray, no MLflow): milliseconds
each. The real-cluster counterparts are test_train_integration.py and test_fault_tolerance.py."""

from __future__ import annotations

import threading

import pytest
from driver_fakes import FakeFit, FakeIdentity, FakeScaler, World, finished_fit, group, steps

from orchestrator import constants
from orchestrator.config import validate
from orchestrator.driver import replan as replan_module
from orchestrator.driver.controller import JobController
from orchestrator.console_ui import result_lines
from orchestrator.driver.ports import FitOutcome, JobResult
from orchestrator.driver.policies import Keep, Resize, State, diverged
from orchestrator.driver.replan import Replan
from orchestrator.driver.sizing import Sizing
from orchestrator.errors import UserError
from trainers.events import GroupEnded, StepPoint, StepsDone, WorkerFailed, WorkerWarning

BASE = {"name": "job", "model": {"name": "mlp"}, "training": {"max_steps": 10, "global_batch_size": 32},
        "data": {"path": "data", "features": {"column": "x", "dtype": "float32"}}}


def job(**resources):
    return validate({**BASE, "resources": resources})


def run(world: World, *, workers: int | None = None, stop: threading.Event | None = None) -> JobController:
    controller = JobController(world.job, world.ports(), workers=workers, stop=stop)
    controller.result = controller.run()
    return controller


def test_a_job_goes_from_preparing_to_finished_and_its_run_is_closed_once() -> None:
    world = World(job(), [finished_fit()])
    states = []
    controller = JobController(world.job, world.ports())
    while not controller.state.terminal:
        states.append(controller.state)
        controller.state = controller.step()
    controller._close()
    assert states[:3] == [State.PREPARING, State.SIZING, State.RUNNING] and controller.state is State.FINISHED
    assert world.run.status == "FINISHED" and world.run.closed and world.identity.released
    assert world.registered == 1 and world.identity.finished == {"step": 10, "run_id": "run-1", "model_version": "1"}
    assert world.run.steps_of("train/loss") == list(range(1, 11))
    assert all(per_step for k, _, _, per_step in world.run.metrics if k == "train/loss")
    assert world.run.tags["worker_group.1"].startswith("2 workers x local batch 16")
    assert world.ui.progress_calls[-1][:2] == (10, 10)


def test_training_log_every_sets_the_steps_whose_training_metrics_are_logged() -> None:
    # Accepted and documented, it was read by nothing since the driver's rewrite: every step was logged.
    world = World(validate({**BASE, "training": {**BASE["training"], "log_every": 4}}), [finished_fit()])
    run(world)
    assert world.run.steps_of("train/loss") == [4, 8] and world.run.status == "FINISHED"


def test_a_finished_job_run_again_touches_nothing() -> None:
    identity = FakeIdentity(complete=True)
    identity.state.finished = {"step": 10, "run_id": "run-1", "model_version": "3"}
    world = World(job(), [], identity=identity)
    controller = run(world)
    assert controller.state is State.FINISHED and controller.result.already_complete["model_version"] == "3"
    assert world.prepared == 0 and world.run.status is None and not world.started and identity.released


def test_ctrl_c_asks_the_workers_once_and_the_run_ends_killed() -> None:
    stop = threading.Event()
    fit = FakeFit([[group()], [steps(1, 4)], [steps(5, 5)], [GroupEnded(step=5, reason="stopped")]],
                  FitOutcome({"step": 5}))
    world = World(job(), [fit], on_poll=lambda w: stop.set() if w.current and len(w.current.batches) == 2 else None)
    controller = run(world, stop=stop)
    assert controller.state is State.STOPPED and world.stops == 1
    assert world.run.status == "KILLED" and world.registered == 0 and world.identity.finished is None
    assert controller.result.stopped and controller.result.final_step == 5


def test_a_failed_fit_fails_the_run_and_raises() -> None:
    world = World(job(), [FakeFit([[group()], [steps(1, 3)]], FitOutcome({}, error=ValueError("boom")))])
    controller = JobController(world.job, world.ports())
    with pytest.raises(ValueError, match="boom"):
        controller.run()
    assert controller.state is State.FAILED and world.run.status == "FAILED" and world.identity.released


def test_a_workers_user_error_is_one_line_not_ray_trains_failure() -> None:
    from ray.train import WorkerGroupError

    bad = UserError("data: epoch 2 of the training set gave this worker no full batch of 64 rows")
    failed = WorkerGroupError("rank 1 failed", {1: bad, 0: RuntimeError("peer gone")})
    world = World(job(), [FakeFit([[group()], [steps(1, 3)]], FitOutcome({}, error=failed))])
    controller = JobController(world.job, world.ports())
    with pytest.raises(UserError, match=r"^data: epoch 2 of the training set gave this worker no full batch"):
        controller.run()
    assert controller.state is State.FAILED and world.run.status == "FAILED" and world.identity.released
    other = WorkerGroupError("rank 0 failed", {0: RuntimeError("peer gone")})  # not the user's to fix
    world = World(job(), [FakeFit([[group()], [steps(1, 3)]], FitOutcome({}, error=other))])
    with pytest.raises(WorkerGroupError):
        JobController(world.job, world.ports()).run()


def test_a_diverged_loss_stops_the_workers_and_fails_the_run_in_one_line() -> None:
    nan = steps(4, 6)
    nan = StepsDone(step=6, points=(nan.points[0], StepPoint(step=5, metrics={"train/loss": float("nan")}, at_ms=5),
                                    nan.points[2]), step_times_s=nan.step_times_s)
    world = World(job(), [FakeFit([[group()], [steps(1, 3)], [nan], [steps(7, 10)]], FitOutcome({"step": 10}))])
    controller = JobController(world.job, world.ports())
    with pytest.raises(UserError, match=r"^train/loss: nan at step 5: training diverged; lower training.lr"):
        controller.run()
    assert controller.state is State.FAILED and world.run.status == "FAILED" and world.stops == 1
    assert "the job cannot go on at step 6; stopping the worker group" in world.ui.statuses
    assert 4 in world.run.steps_of("train/loss")  # the steps before it are logged
    assert diverged(steps(1, 3).points) is None
    assert diverged([StepPoint(step=2, metrics={"train/loss": float("inf")}, at_ms=0)]).step == 2


def test_a_group_that_ends_early_without_a_stop_is_a_failure() -> None:
    world = World(job(), [FakeFit([[group()], [steps(1, 3)]], FitOutcome({"step": 3}))])
    with pytest.raises(RuntimeError, match="stopped at step 3 of 10 without an error"):
        JobController(world.job, world.ports()).run()
    assert world.run.status == "FAILED"


def test_a_restart_is_recorded_with_its_cause_at_the_step_resumed_from() -> None:
    fit = FakeFit([[group()], [steps(1, 7)], [WorkerFailed(step=7, cause="rank 1: KilledError")],
                   [group(5, resumed=5)], [steps(6, 10)]], FitOutcome({"step": 10}))
    world = World(job(), [fit])
    controller = run(world)
    assert controller.result.restarts == 1 and world.run.status == "FINISHED"
    assert world.run.tags["restart.1"].startswith("rank 1: KilledError; resumed from step 5 on 2 workers")
    assert ("restarts", 1, 5, False) in world.run.metrics
    assert any(s == "worker failure after step 7: rank 1: KilledError" for s in world.ui.statuses)


def test_worker_warnings_and_tracking_warnings_reach_the_console() -> None:
    world = World(job(), [FakeFit([[group(), WorkerWarning(step=0, message="slow disk")], [steps(1, 10)]],
                                  FitOutcome({"step": 10}))])
    world.run.warnings = ["MLflow unreachable; 20 points wait"]
    run(world)
    assert "rank 0 at step 0: slow disk" in world.ui.statuses
    assert "MLflow unreachable; 20 points wait" in world.ui.statuses


def test_autoscaler_shortfall_resizes_on_what_arrived_and_releases_the_request() -> None:
    scaler = FakeScaler([1, 2, 3])
    world = World(job(workers="auto", autoscale_timeout_s=5), [finished_fit(workers=3)], scaler=scaler,
                  sizing=lambda cap: Sizing(min(cap or 4, 4), 64))
    controller = run(world)
    assert scaler.requested == [4] and world.sized_with == [None, 3]  # planned 4, re-sized on the 3 that came
    assert world.started == [3] and scaler.releases == 1  # released once the group ran, not again at the end
    assert world.run.tags["autoscale.shortfall"] == 1 and world.run.tags["autoscale.arrived"] == 3
    assert controller.state is State.FINISHED
    assert "autoscaler: 1/4 CPU workers available (0 s of 5 s)" in world.ui.statuses


def test_autoscaler_gives_up_below_the_minimum_before_any_run_exists() -> None:
    scaler = FakeScaler([0])
    world = World(job(workers={"min": 2, "max": 4}, autoscale_timeout_s=3), [], scaler=scaler)
    controller = JobController(world.job, world.ports())
    with pytest.raises(UserError, match="0 of the 4 workers wanted arrived within 3 s"):
        controller.run()
    assert controller.state is State.FAILED and world.run.status is None and scaler.releases == 1


def test_a_stop_while_preparing_starts_no_workers_and_opens_no_run() -> None:
    stop = threading.Event()
    world = World(job(workers=2), [finished_fit()])
    prepare = world._prepare
    world._prepare = lambda: (stop.set(), prepare())[1]  # Ctrl-C while profiling
    controller = run(world, stop=stop)
    assert controller.state is State.STOPPED and world.run.status is None and not world.started
    assert world.prepared == 1 and world.sized_with == []
    lines = result_lines(JobResult(State.STOPPED), tracking_uri="sqlite:///m.db")
    assert lines[:3] == ["stopped at step 0; run the same command again to resume.",
                         "MLflow run: none (stopped before training started)", "final step: 0"]


def test_a_stop_while_profiling_starts_no_workers_and_opens_no_run() -> None:
    # SIGTERM while the job was profiled said "stopping before training starts", then opened an
    # MLflow run, trained 15 steps and ended it KILLED.
    stop = threading.Event()
    world = World(job(workers=2), [finished_fit()])
    size = world._size
    world._size = lambda prepared, cap: (stop.set(), size(prepared, cap))[1]
    controller = run(world, stop=stop)
    assert controller.state is State.STOPPED and world.run.status is None and not world.started
    assert world.sized_with == [None]


def test_a_stop_while_waiting_for_workers_stops_without_a_run() -> None:
    stop = threading.Event()
    stop.set()
    world = World(job(workers=3), [], scaler=FakeScaler([0]))
    controller = run(world, stop=stop)
    assert controller.state is State.STOPPED and world.run.status is None and not world.started


def test_a_resize_stops_at_a_checkpoint_and_goes_on_with_the_new_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "REPLAN_MIN_STEPS", 4)
    decisions = iter([Resize(1, "resize 2 -> 1 worker: faster"), Keep("keep 1 worker: same count")])

    def fake_replan(group, **kwargs):
        return Replan(next(decisions), None, None, {"refit": {"scale": 2.0, "compute_scale": 1.0}}, "text")

    monkeypatch.setattr(replan_module, "replan", fake_replan)
    monkeypatch.setattr(replan_module, "predicted_at", lambda *a: None)
    first = FakeFit([[group()], [steps(1, 5)], [GroupEnded(step=5, reason="stopped")]], FitOutcome({"step": 5}))
    second = FakeFit([[group(5, 1, resumed=5)], [steps(6, 10)]], FitOutcome({"step": 10}))
    world = World(job(workers={"min": 1, "max": 2}), [first, second], sizing=lambda cap: Sizing((1, 2), 64))
    monkeypatch.setattr(replan_module, "predicted_at", lambda *a: object())
    monkeypatch.setattr(replan_module, "comparison", lambda observed, predicted: {"plan/observed_step_time_s": observed})
    controller = run(world)
    assert world.started == [(1, 2), (1, 1)] and world.stops == 1 and world.clears == 1
    assert controller.result.resizes == 1 and controller.result.restarts == 0
    assert world.run.tags["resize.1"].startswith("resize 2 -> 1 worker: faster (stopped at step 5); resumed from step 5")
    assert world.run.status == "FINISHED" and len(controller.replanner.replans) == 2


def test_a_second_ctrl_c_aborts_and_ends_the_run_killed() -> None:
    def interrupt(world: World) -> None:
        raise KeyboardInterrupt

    world = World(job(), [FakeFit([[group()], [steps(1, 3)], [steps(4, 10)]], FitOutcome({"step": 10}))],
                  on_poll=interrupt)
    with pytest.raises(KeyboardInterrupt):
        JobController(world.job, world.ports()).run()
    assert world.run.status == "KILLED" and world.identity.released
    assert world.stops == 1  # the workers are told to stop: they must not train on, unrecorded


def test_resuming_past_the_runs_last_logged_step_says_which_steps_have_no_metrics() -> None:
    # An earlier driver was killed at step 125 while its workers trained on to a checkpoint at 200.
    world = World(job(), [FakeFit([[group(200, resumed=200)], [steps(201, 210)]], FitOutcome({"step": 210}))])
    world.run.resumed, world.run.resume_floor = True, 125
    run(world)
    assert world.run.tags["metrics.gap.1"] == ("steps 126-200 were trained by an earlier driver that stopped before "
                                             "sending their metrics; this run has none for them")
    assert any("resumed from step 200: steps 126-200" in w for w in world.ui.statuses)
    whole = World(job(), [FakeFit([[group(200, resumed=200)], [steps(201, 210)]], FitOutcome({"step": 210}))])
    whole.run.resumed, whole.run.resume_floor = True, 200
    run(whole)
    assert "metrics.gap.1" not in whole.run.tags
    # a rerun after Ctrl-C said nothing of resuming: it read as a fresh start
    assert "resumed from step 200, the newest checkpoint" in whole.ui.statuses
    assert not any(s.startswith("resumed from step 200,") for s in world.ui.statuses)  # said once, with the gap


def test_a_rerun_resumed_at_the_last_step_finishes_at_it_and_registers_once() -> None:
    # A driver killed after its workers trained the last step: the rerun's group trains nothing. Its
    # start is the step the job reached: the job is marked finished there (it said "step 0").
    world = World(job(), [FakeFit([[group(10, resumed=10)], [GroupEnded(step=10, reason="finished")]],
                                  FitOutcome({"step": 10}))])
    world.run.resumed, world.run.resume_floor = True, 4
    controller = run(world)
    assert controller.state is State.FINISHED and world.run.status == "FINISHED" and world.registered == 1
    assert controller.result.final_step == 10 and world.identity.finished["step"] == 10
    assert world.run.tags["metrics.gap.1"].startswith("steps 5-10 were trained by an earlier driver")


def test_a_driver_failure_mid_run_stops_the_worker_group_and_ends_the_run_failed() -> None:
    def fail_after_first_steps(world: World) -> None:
        if world.current and len(world.current.batches) == 2:
            raise RuntimeError("a progress callback broke")

    fit = FakeFit([[group()], [steps(1, 4)], [steps(5, 8)], [steps(9, 10)]], FitOutcome({"step": 10}))
    world = World(job(), [fit], on_poll=fail_after_first_steps)
    with pytest.raises(RuntimeError, match="progress callback"):
        JobController(world.job, world.ports()).run()
    # The group was asked to stop and had ended before the run was closed: nothing trains on unrecorded.
    assert world.stops == 1 and fit.done()
    assert world.run.status == "FAILED" and world.identity.released
    assert any("driver failed (RuntimeError) at step 4; stopping the worker group" in s for s in world.ui.statuses)


def test_ranks_that_failed_alike_are_said_once() -> None:
    from orchestrator.driver.fit import failure_causes

    gone = UserError("data: epoch 1 of the training set gave this worker no full batch of 32 rows")
    causes = failure_causes({2: gone, 0: RuntimeError("peer gone"), 1: gone})
    assert causes == ("rank 0: RuntimeError: peer gone; "
                      "ranks 1, 2: UserError: data: epoch 1 of the training set gave this worker no full batch of 32 rows")


def test_a_workers_user_error_ends_the_job_at_the_first_failure() -> None:
    # Ray Train restarts the group on any worker error (max_failures); a UserError (the data went
    # empty, no checkpoint verifies) meets every restart again, so the first report ends the job.
    unusable = "checkpoint: none of the 2 checkpoints under runs/x is usable"
    failed = WorkerFailed(step=4, cause=f"ranks 0, 1: UnusableCheckpoints: {unusable}", user_error=unusable)
    fit = FakeFit([[group()], [steps(1, 4)], [failed], [steps(5, 8)]], FitOutcome({"step": 8}))
    world = World(job(), [fit])
    controller = JobController(world.job, world.ports())
    with pytest.raises(UserError, match=r"^checkpoint: none of the 2 checkpoints"):
        controller.run()
    assert controller.state is State.FAILED and world.run.status == "FAILED" and world.stops == 1
    assert any("the job cannot go on at step 4" in s for s in world.ui.statuses)


def test_the_failure_forwarder_marks_a_user_error_among_the_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator import autoscale
    from orchestrator.driver.fit import FailureForwarder

    # No cluster: the real refresh reached whatever head /tmp/ray/ray_current_cluster named (a dead one hung)
    monkeypatch.setattr(autoscale, "refresh_cluster_view", lambda: None)

    class Remote:
        def __init__(self) -> None:
            self.calls: list[tuple] = []
            self.remote = lambda *args: self.calls.append(args)

    class Progress:
        record_failure = Remote()

    progress = Progress()
    forwarder = FailureForwarder(progress)
    gone = UserError("data: epoch 1 of the training set gave this worker no full batch of 32 rows\nmore")
    forwarder.after_exception(None, {1: gone, 0: RuntimeError("peer gone")})
    forwarder.after_exception(None, {0: RuntimeError("peer gone")})
    (_, first), (_, second) = progress.record_failure.calls
    assert first == "data: epoch 1 of the training set gave this worker no full batch of 32 rows" and second is None


def test_a_failure_before_any_group_trained_is_not_said_to_be_after_step_0() -> None:
    # A rerun whose first group fails restoring: the progress actor has seen no step of this run.
    fit = FakeFit([[WorkerFailed(step=0, cause="rank 0: OSError: disk gone")], [group(30, resumed=30)],
                   [steps(31, 40)]], FitOutcome({"step": 40}))
    world = World(job(), [fit])
    run(world)
    assert "worker failure before its first step: rank 0: OSError: disk gone" in world.ui.statuses


def test_a_driver_whose_job_lock_was_taken_over_stops_its_workers_and_fails() -> None:
    def taken_over(world: World) -> None:
        if world.current and len(world.current.batches) == 2:
            world.identity.lost = "pid 7 on other-host since 2026-01-01T00:00:00+00:00"

    fit = FakeFit([[group()], [steps(1, 4)], [steps(5, 8)], [steps(9, 10)]], FitOutcome({"step": 10}))
    world = World(job(), [fit], on_poll=taken_over)
    with pytest.raises(UserError, match="taken over by pid 7 on other-host"):
        JobController(world.job, world.ports()).run()
    assert world.stops == 1 and fit.done() and world.run.status == "FAILED" and world.identity.released


def test_a_rerun_that_starts_while_mlflow_is_down_still_says_which_steps_have_no_metrics() -> None:
    """The killed driver's workers trained on to 200 while MLflow got 125; the rerun resumes from
    200 before the server answers (the run is not resolved at the group's start): the gap is said
    once it is."""
    def mlflow_answers(world: World) -> None:
        if world.current and len(world.current.batches) == 1:
            world.run.resumed, world.run.resume_floor = True, 125

    fit = FakeFit([[group(200, resumed=200)], [steps(201, 205)], [steps(206, 210)]], FitOutcome({"step": 210}))
    world = World(job(), [fit], on_poll=mlflow_answers)
    world.run.resumed, world.run.resume_floor = None, None
    run(world)
    assert world.run.tags["metrics.gap.1"].startswith("steps 126-200 were trained by an earlier driver")
    assert sum("steps 126-200" in w for w in world.ui.statuses) == 1


def test_workers_beyond_a_cluster_nothing_adds_nodes_to_are_one_line_before_anything_starts() -> None:
    # 1 worker of 64 CPUs on an embedded Ray of 2: Ray Train waited for its placement for good.
    import dataclasses

    world = World(job(workers=2, cpus_per_worker=8), [finished_fit()])
    ports = dataclasses.replace(world.ports(), slots=lambda: 1)
    controller = JobController(world.job, ports)
    with pytest.raises(UserError, match=r"^resources\.workers: 2 worker\(s\) of 8 CPUs each do not fit this "
                                        r"cluster, which has room for 1 and no autoscaler to add nodes"):
        controller.run()
    assert world.sized_with == [] and not world.started and world.run.status is None and world.identity.released
    elastic = World(job(workers={"min": 1, "max": 4}), [finished_fit()])  # its minimum fits: it starts
    JobController(elastic.job, dataclasses.replace(elastic.ports(), slots=lambda: 1)).run()
    assert elastic.started


def test_a_warning_the_ui_shows_is_not_logged_as_a_warning_too(caplog: pytest.LogCaptureFixture) -> None:
    # The CLI's log handler printed each driver warning a second time ("WARNING orchestrator...").
    import logging

    fit = FakeFit([[group()], [steps(1, 4)], [WorkerFailed(step=4, cause="rank 1: KilledError")], [group(4, resumed=4)],
                   [steps(5, 10)]], FitOutcome({"step": 10}))
    world = World(job(), [fit])
    with caplog.at_level(logging.WARNING):
        run(world)
    assert "worker failure after step 4: rank 1: KilledError" in world.ui.statuses
    assert not [r for r in caplog.records if r.name.startswith("orchestrator.driver")]


def test_a_rerun_of_the_run_adds_its_decisions_and_observations_to_the_earlier_ones(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Continued to a longer training.max_steps, the run held replan.1 and replan.2 tags, but
    replan/decisions.json and plan/observations.json (what `calibrate` learns from) only the rerun's."""
    monkeypatch.setattr(constants, "REPLAN_MIN_STEPS", 4)
    monkeypatch.setattr(replan_module, "replan", lambda group, **kwargs: Replan(
        Keep("keep 2 workers"), None, None, {"step": 10, "refit": {"scale": 1.0, "compute_scale": 1.0}}, "text"))
    monkeypatch.setattr(replan_module, "predicted_at", lambda *a: object())
    monkeypatch.setattr(replan_module, "comparison", lambda observed, predicted: {})
    monkeypatch.setattr(replan_module, "observation", lambda sizing, group, run_id: {"step_time_s": 0.02})
    world = World(job(), [FakeFit([[group(5, 2, resumed=5)], [steps(6, 10)]], FitOutcome({"step": 10}))])
    world.identity.state.records = {"replans": [{"step": 5}], "observations": [{"step_time_s": 0.05}]}
    world.identity.state.counts = {"replan": 1}
    run(world)
    assert world.run.tags["replan.2"] == "text" and [r["step"] for r in world.run.dicts["replan/decisions.json"]] == [5, 10]
    assert world.run.dicts["plan/observations.json"] == [{"step_time_s": 0.05}, {"step_time_s": 0.02}]
    assert world.identity.state.records["replans"] == world.run.dicts["replan/decisions.json"]  # for the next rerun
