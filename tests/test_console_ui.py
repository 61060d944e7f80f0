"""The closing lines of `orchestrator run` (`orchestrator/console_ui.py`): what a user reads, and
scripts parse, once a job ends."""

from __future__ import annotations

from types import SimpleNamespace

from orchestrator.console_ui import result_lines
from orchestrator.driver.policies import State
from orchestrator.driver.ports import JobResult


def test_a_job_trained_through_a_whole_outage_ends_saying_what_waits_and_that_the_model_is_not_registered() -> None:
    """Trained and checkpointed, nothing taken by MLflow: the closing lines say so plainly, with the
    spill file, the replay command and the model owed (was: "MLflow run: not created yet")."""
    from pathlib import Path

    from orchestrator.tracking import CloseReport

    spill = Path("/spill/a-b.jsonl")
    command = f"orchestrator tracking replay {spill} --tracking-uri http://127.0.0.1:5000"
    report = CloseReport(0, 0, 326, 15, spill, command, (), ())
    result = JobResult(State.FINISHED, final_step=60, tracking=report)
    lines = result_lines(result, tracking_uri="http://127.0.0.1:5000", registered_model="digits-cnn")
    assert lines[0] == ("MLflow run: none yet (MLflow at http://127.0.0.1:5000 did not answer during the job; "
                        "sending what waits creates it)")
    assert lines[1] == "final step: 60"
    assert lines[2] == (f"MLflow did not take 326 metric points and 15 other operations; they are in {spill}. "
                        f"Send them with: {command}")
    assert lines[3] == ("model not registered as 'digits-cnn': MLflow at http://127.0.0.1:5000 did not take it; "
                        "once it answers, run the same command again: it sends what waits first and registers "
                        "the model")
    registered = JobResult(State.FINISHED, run_id="r1", final_step=60, model_version="1")
    assert not any("model not registered" in line for line in
                   result_lines(registered, tracking_uri="http://127.0.0.1:5000", registered_model="digits-cnn"))
    # MLflow answered and took everything but the model (refused: an artifact location on another host)
    taken = CloseReport(9, 4, 0, 0, None, None, (), ())
    refused = JobResult(State.FINISHED, run_id="r1", final_step=60, tracking=taken)
    assert not any("model not registered" in line for line in
                   result_lines(refused, tracking_uri="http://127.0.0.1:5000", registered_model="digits-cnn"))
    complete = JobResult(State.FINISHED, final_step=60, already_complete={"step": 60, "at": "now"})
    lines = result_lines(complete, tracking_uri="http://127.0.0.1:5000", registered_model="m")
    assert "(MLflow run none yet, model version none)" in lines[0]  # was "MLflow run None"
    assert lines[1].startswith("model not registered as 'm'")


def test_a_run_started_with_new_run_and_stopped_says_to_resume_without_it() -> None:
    """`run --new-run` stopped by Ctrl-C said "run the same command again to resume": that command
    starts yet another fresh run, and the stopped one is resumed without --new-run."""
    stopped = JobResult(State.STOPPED, run_id="r1", final_step=165)
    lines = result_lines(stopped, tracking_uri="sqlite:///m.db", new_run=True)
    assert lines[0] == "stopped at step 165; run the command again without --new-run to resume."
    owed = JobResult(State.FINISHED, final_step=60)
    lines = result_lines(owed, tracking_uri="http://127.0.0.1:5000", registered_model="m", new_run=True)
    assert lines[-2].endswith("once it answers, run the command again without --new-run: it sends what waits first "
                              "and registers the model")


def test_the_last_progress_line_keeps_its_step_count_at_80_columns() -> None:
    """A pipe or `jobs logs` (80 columns) ended a job's log with "train ━━━ 200/2… loss ...": the
    step count gave way to the figures beside it."""
    import io

    from rich.console import Console

    from orchestrator.console_ui import RichUI

    for total in (200, 4400):
        text = io.StringIO()
        ui = RichUI(Console(file=text, width=80))
        ui.sized(SimpleNamespace(job=SimpleNamespace(name="j", training=SimpleNamespace(global_batch_size=64)),
                                 total_steps=total, steps_per_epoch=22),
                 SimpleNamespace(profile=None, plan=None, explanation="as configured", workers=1), None)
        ui.progress(total, total, {"train/loss": 0.005165, "val/accuracy": 0.9971, "train/samples_per_s": 9104.0})
        ui.__exit__(None, None, None)
        last = text.getvalue().splitlines()[-1]
        assert f" {total}/{total} " in last and last.endswith("0:00:00"), last


def test_a_stop_says_a_checkpoint_only_once_the_workers_train() -> None:
    """A stop while the workers start leaves without a checkpoint (they check at the top of their
    training function), yet the console said "writing a final checkpoint" as soon as the job was sized."""
    import io

    from rich.console import Console

    from orchestrator.console_ui import RichUI

    ui = RichUI(Console(file=io.StringIO(), width=80))
    said = [ui.on_stop()]
    ui.sized(SimpleNamespace(job=SimpleNamespace(name="j", training=SimpleNamespace(global_batch_size=64)),
                             total_steps=10, steps_per_epoch=5),
             SimpleNamespace(profile=None, plan=None, explanation="as configured", workers=1), None)
    ui.progress(4, 10, {})  # a rerun at its checkpoint's step, its workers starting
    said.append(ui.on_stop())
    ui.progress(5, 10, {"train/loss": 0.5})
    said.append(ui.on_stop())
    ui.__exit__(None, None, None)
    assert said == ["stopping before training starts",
                    "stopping (with a final checkpoint if the workers have begun training)",
                    "writing a final checkpoint, then stopping"]


def test_the_bar_is_redrawn_no_more_often_than_the_driver_polls() -> None:
    """rich redraws 10 times a second by default: four of five redraws showed nothing new (the
    driver polls every PROGRESS_POLL_S) and cost the training workers' cores ~1 % of one."""
    import io

    from rich.console import Console

    from orchestrator import constants
    from orchestrator.console_ui import RichUI

    ui = RichUI(Console(file=io.StringIO(), width=80, force_terminal=True))
    ui.sized(SimpleNamespace(job=SimpleNamespace(name="j", training=SimpleNamespace(global_batch_size=64)),
                             total_steps=10, steps_per_epoch=5),
             SimpleNamespace(profile=None, plan=None, explanation="as configured", workers=1), None)
    try:
        assert ui._progress.live.refresh_per_second * constants.PROGRESS_POLL_S <= 1
    finally:
        ui.__exit__(None, None, None)
