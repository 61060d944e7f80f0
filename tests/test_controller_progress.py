"""A progress actor that does not answer (its node lost, the actor stuck): `RayPorts` waits a bounded
time for it and the controller takes each unanswered drain as a missed poll, with fakes (no Ray
cluster, no MLflow). (test_controller.py holds the other transitions.)"""

from __future__ import annotations

import dataclasses
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from driver_fakes import FakeFit, World, finished_fit, group, resized_once, steps

from orchestrator import constants
from orchestrator.config import validate
from orchestrator.driver.controller import JobController
from orchestrator.driver.ports import FitOutcome, ProgressUnanswered
from trainers.events import GroupEnded

BASE = {"name": "job", "model": {"name": "mlp"}, "training": {"max_steps": 10, "global_batch_size": 32},
        "data": {"path": "data", "features": {"column": "x", "dtype": "float32"}}}
UNANSWERED = ProgressUnanswered("the progress actor did not answer a drain within 5 s")


def job(**resources: Any) -> Any:
    return validate({**BASE, "resources": resources})


def answering(world: World, missed: set[int]) -> Any:
    """The world's drain, unanswered at the calls numbered in `missed` (from 1)."""
    calls = [0]

    def drain() -> Any:
        calls[0] += 1
        if calls[0] in missed:
            raise UNANSWERED
        return world._drain()

    drain.calls = calls
    return drain


def unanswered_clears(world: World, times: int, *, lose_lease: bool = False) -> Any:
    """The world's clear_stop, unanswered at its first `times` calls (each notes the groups started so
    far); `lose_lease`: the driver's heartbeats are missed meanwhile, its lease taken over."""
    calls: list[int] = []

    def clear_stop() -> None:
        calls.append(len(world.started))
        assert len(calls) <= 50, "asked forever"
        if lose_lease:
            world.identity.lost = "driver-2"
        if len(calls) <= times:
            raise ProgressUnanswered("the progress actor did not clear the stop within 5 s")

    clear_stop.calls = calls
    return clear_stop


def missed_lines(world: World) -> list[str]:
    return [m for m in world.ui.statuses if m.endswith("progress is not shown until it answers, a stop is still acted on")]


def test_the_ray_ports_wait_a_bounded_time_and_await_an_unanswered_drain_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ray.get` without a timeout: a stuck progress actor hung the driver forever (no stop acted on).
    A drain not answered in time is awaited again, not sent again: the events it takes would be lost."""
    import ray
    from ray.exceptions import GetTimeoutError

    from orchestrator.driver.job import RayPorts, SilentUI

    sent: list[str] = []
    answers = {"drain": iter([GetTimeoutError("late"), ([], {0: {"pid": 1, "node_id": "n"}})]),
               "clear_stop": iter([GetTimeoutError("late")])}

    def method(name: str) -> SimpleNamespace:  # `actor.<name>.remote()` returns the name as its ref
        return SimpleNamespace(remote=lambda: sent.append(name) or name)

    actor = SimpleNamespace(drain=method("drain"), clear_stop=method("clear_stop"))

    def get(ref: str, *, timeout: float | None = None) -> Any:
        assert timeout == constants.PROGRESS_ANSWER_S, "waits forever for an actor that may never answer"
        answer = next(answers[ref])
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(ray, "get", get)
    ports = RayPorts(job(), None, None, False, SilentUI(), actor=actor)
    with pytest.raises(ProgressUnanswered, match="did not answer a drain within"):
        ports.drain()
    assert ports.drain() == ([], {0: {"pid": 1, "node_id": "n"}})
    with pytest.raises(ProgressUnanswered, match="did not clear the stop within"):
        ports.clear_stop()
    assert sent == ["drain", "clear_stop"]


def test_unanswered_drains_are_missed_polls_said_once_and_the_job_finishes() -> None:
    world = World(job(), [finished_fit()])
    ports = dataclasses.replace(world.ports(), drain=answering(world, {2, 3, 4}))
    result = JobController(world.job, ports).run()
    assert result.state.value == "finished" and result.final_step == 10 and world.run.status == "FINISHED"
    assert len(missed_lines(world)) == 1


def test_a_stop_is_asked_for_while_the_progress_actor_does_not_answer() -> None:
    stop = threading.Event()
    fit = FakeFit([[group()], [steps(1, 5)], [GroupEnded(step=5, reason="stopped")]], FitOutcome({"step": 5}))
    world = World(job(), [fit])
    drain = answering(world, {2, 3, 4, 5})

    def signalled() -> Any:
        if drain.calls[0] == 2:
            stop.set()  # Ctrl-C while the actor is stuck
        if drain.calls[0] == 3:
            assert world.stops == 1, "the stop waited for the progress actor"
        return drain()

    result = JobController(world.job, dataclasses.replace(world.ports(), drain=signalled), stop=stop).run()
    assert result.stopped and result.final_step == 5 and world.run.status == "KILLED"


def test_a_fit_that_ended_while_the_actor_did_not_answer_is_polled_again_for_its_last_events() -> None:
    fit = FakeFit([[group()], [steps(1, 5)], [steps(6, 10)]], FitOutcome({"step": 10}))
    fit.done = lambda: len(fit.batches) <= 1  # the workers ended; their last steps wait in the actor
    world = World(job(), [fit])
    result = JobController(world.job, dataclasses.replace(world.ports(), drain=answering(world, {3, 4}))).run()
    assert result.state.value == "finished" and result.final_step == 10
    assert world.run.steps_of("train/loss") == list(range(1, 11))


def test_a_fit_that_ended_is_not_waited_on_forever_for_an_actor_that_never_answers() -> None:
    fit = FakeFit([[group()], [steps(1, 5)], [steps(6, 10)]], FitOutcome({"step": 10}))
    fit.done = lambda: len(fit.batches) <= 1
    world = World(job(), [fit])
    drain = answering(world, set(range(3, 1000)))
    result = JobController(world.job, dataclasses.replace(world.ports(), drain=drain)).run()
    assert result.state.value == "finished" and world.run.status == "FINISHED"
    assert drain.calls[0] == 2 + constants.PROGRESS_MISSES_AT_END + 1


def test_a_resize_whose_stop_is_not_cleared_in_time_asks_again_before_the_new_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`clear_stop` unanswered: the new group would read the old group's stop and leave at once."""
    world = resized_once(job(workers={"min": 1, "max": 2}), monkeypatch)
    clear_stop = unanswered_clears(world, 2)
    clears = clear_stop.calls
    result = JobController(world.job, dataclasses.replace(world.ports(), clear_stop=clear_stop)).run()
    assert clears == [1, 1, 1] and world.started == [(1, 2), (1, 1)]
    assert result.state.value == "finished" and result.resizes == 1 and len(missed_lines(world)) == 1


def test_poll_again_waits_for_a_finished_fits_last_drain_a_bounded_number_of_polls() -> None:
    from orchestrator.driver.policies import poll_again

    assert poll_again(fit_done=False, drained=True, misses=0, limit=3)
    assert poll_again(fit_done=False, drained=False, misses=99, limit=3)  # still running: always polled
    assert not poll_again(fit_done=True, drained=True, misses=0, limit=3)
    assert poll_again(fit_done=True, drained=False, misses=3, limit=3)
    assert not poll_again(fit_done=True, drained=False, misses=4, limit=3)


def test_a_fit_whose_last_drains_went_unanswered_ends_at_the_step_its_final_report_reached() -> None:
    """The job ended on what it drained: job.json, the result and the run's summary said step 5 of
    a fit that reported step 10, the last, as its end (Ray Train's final metrics)."""
    fit = FakeFit([[group()], [steps(1, 5)], [steps(6, 10)]], FitOutcome({"step": 10}))
    fit.done = lambda: len(fit.batches) <= 1
    world = World(job(), [fit])
    result = JobController(world.job, dataclasses.replace(world.ports(), drain=answering(world, set(range(3, 99))))).run()
    summary = next(v for k, v in world.run.dicts.items() if k.startswith("summary/"))
    assert (result.final_step, world.identity.finished["step"], summary["final_step"]) == (10, 10, 10)


def test_misses_while_the_fit_ran_do_not_cut_short_the_polls_for_its_last_events() -> None:
    """The actor stuck a while as the group trained, answering again once it ended: the end's polls
    were counted from the first miss, so the job ended at once on what was drained, its last steps lost."""
    fit = FakeFit([[group()], [steps(1, 5)], [steps(6, 10)]], FitOutcome({"step": 10}))
    world = World(job(), [fit])
    stuck = constants.PROGRESS_MISSES_AT_END + 1  # polls missed while it trained
    drain = answering(world, set(range(3, 3 + stuck + constants.PROGRESS_MISSES_AT_END)))
    fit.done = lambda: drain.calls[0] >= 2 + stuck  # ended while the actor was still stuck
    result = JobController(world.job, dataclasses.replace(world.ports(), drain=drain)).run()
    assert result.state.value == "finished" and result.final_step == 10
    assert world.run.steps_of("train/loss") == list(range(1, 11))


def test_a_resize_whose_stop_is_never_cleared_fails_the_job_instead_of_asking_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RESIZING asked a stuck actor to clear the stop at every poll, for good: nothing else can end that state."""
    world = resized_once(job(workers={"min": 1, "max": 2}), monkeypatch)
    clear_stop = unanswered_clears(world, 50)
    with pytest.raises(RuntimeError, match="did not clear the stop"):
        JobController(world.job, dataclasses.replace(world.ports(), clear_stop=clear_stop)).run()
    assert len(clear_stop.calls) == constants.PROGRESS_MISSES_AT_END + 1 and world.started == [(1, 2)]
    assert world.run.status == "FAILED"


def test_a_lease_lost_while_the_stop_is_cleared_again_starts_no_new_group(monkeypatch: pytest.MonkeyPatch) -> None:
    world = resized_once(job(workers={"min": 1, "max": 2}), monkeypatch)
    ports = dataclasses.replace(world.ports(), clear_stop=unanswered_clears(world, 50, lose_lease=True))
    monkeypatch.setattr(constants, "PROGRESS_MISSES_AT_END", 99)
    from orchestrator.errors import UserError

    with pytest.raises(UserError, match="taken over by driver-2"):
        JobController(world.job, ports).run()
    assert world.started == [(1, 2)]
