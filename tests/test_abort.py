"""A second stop signal (Ctrl-C twice, SIGTERM twice) aborts `orchestrator run` without waiting for
a final checkpoint: the run is still closed, and the closing lines still say where the job got and
what MLflow did not take, with the command that sends it. Fakes only: milliseconds."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import typer
from driver_fakes import FakeFit, World, group, steps

from orchestrator.config import validate
from orchestrator.driver.controller import JobController
from orchestrator.driver.policies import State
from orchestrator.driver.ports import Aborted, FitOutcome, JobResult
from orchestrator.tracking import CloseReport

BASE = {"name": "job", "model": {"name": "mlp"}, "training": {"max_steps": 10, "global_batch_size": 32},
        "data": {"path": "data", "features": {"column": "x", "dtype": "float32"}}}


def test_an_abort_raises_with_the_closed_runs_result() -> None:
    """The KeyboardInterrupt of a second Ctrl-C left the controller without its result: the CLI
    printed nothing of it (not the final step, not the spilled points nor their replay command)."""
    polls = []

    def interrupt_at_the_third_poll(world: World) -> None:
        polls.append(1)
        if len(polls) == 3:
            raise KeyboardInterrupt

    world = World(validate(BASE), [FakeFit([[group()], [steps(1, 3)], [steps(4, 10)]], FitOutcome({"step": 10}))],
                  on_poll=interrupt_at_the_third_poll)
    unsent = "MLflow did not take 12 metric points and 3 other operations; they are in s.jsonl. Send them with: X"
    world.run.unsent = [unsent]
    with pytest.raises(KeyboardInterrupt) as raised:  # still a KeyboardInterrupt to any other caller
        JobController(world.job, world.ports()).run()
    assert isinstance(raised.value, Aborted)
    result = raised.value.result
    assert (result.state, result.final_step, result.run_id) == (State.STOPPED, 3, "run-1")
    assert result.tracking.lines() == [unsent] and unsent not in world.ui.statuses  # said once: from the result
    assert world.run.status == "KILLED" and world.run.closed and world.identity.released and world.stops == 1


def test_the_cli_prints_an_aborted_jobs_closing_lines_and_exits_with_its_signal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Was: after SIGTERM twice (or Ctrl-C twice) with MLflow down, only "aborted at step N" and
    exit 130; the points spilled at the run's close were never said, nor how to send them."""
    import orchestrator.driver
    from orchestrator.cli.train import run

    spill = tmp_path / "k.jsonl"
    command = f"orchestrator tracking replay {spill} --tracking-uri http://127.0.0.1:5000"
    report = CloseReport(0, 0, 590, 12, spill, command, (), ())

    def aborted_job(job, *, stop, **kwargs) -> JobResult:
        os.kill(os.getpid(), signal.SIGTERM)  # the first: a graceful stop is asked for
        assert stop.wait(5)
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the second: the CLI's handler raises KeyboardInterrupt
        except KeyboardInterrupt as exc:  # as the controller does, once the run is closed
            raise Aborted(JobResult(State.STOPPED, run_id="r1", final_step=590, tracking=report)) from exc
        raise AssertionError("the second signal did not abort")

    monkeypatch.setattr(orchestrator.driver, "run_job", aborted_job, raising=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # no Ray of the test session is shut down
    overrides = ["tracking.tracking_uri=http://127.0.0.1:5000", f"tracking.spill_dir={tmp_path}",
                 f"checkpoint.storage_path={tmp_path}"]
    with pytest.raises(typer.Exit) as exited:
        run(Path(__file__).parents[1] / "configs" / "digits.yaml", workers=None, address=None, new_run=False, config_sha256=None,
            set_=overrides)
    assert exited.value.exit_code == 128 + signal.SIGTERM  # was 130 whichever signal it was
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["stopped at step 590; run the same command again to resume.", "MLflow run: r1"]
    assert f"MLflow did not take 590 metric points and 12 other operations; they are in {spill}. " \
           f"Send them with: {command}" in lines
