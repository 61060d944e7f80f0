"""What the tracker says as it closes, with an in-memory store (tracking_fakes.py)."""

from __future__ import annotations

from pathlib import Path

from tracking_fakes import URI, FakeStore, fake, spill_dir  # noqa: F401 (fixtures)

from orchestrator.tracking import Tracker


def test_a_failure_once_the_close_has_run_out_of_time_does_not_say_retrying(fake: FakeStore, spill_dir: Path) -> None:
    # Printed just before the close's "N wait in <spill file>" line, "(retrying)" promised a retry
    # that never came: the job was ending.
    import time

    tracker = Tracker(URI, spill_dir=spill_dir)
    tracker._closing.set()
    tracker._deadline = time.monotonic() - 1
    tracker._failed(ConnectionError("refused"))
    assert tracker.drain_warnings()[-1].endswith("wait to be sent (kept in the spill file)")
    tracker._closing.clear()
    tracker.close(timeout_s=5)


def test_a_run_that_sent_everything_leaves_nothing_in_the_spill_folder(fake: FakeStore, spill_dir: Path,
                                                                      tmp_path: Path) -> None:
    """Every job left an empty `<key>.artifacts/` folder and a `<key>.jsonl.lock` there for ever."""
    from tracking_fakes import log_steps

    tracker = Tracker(URI, spill_dir=spill_dir)
    run = tracker.open_run(experiment="e", run_key="k", run_name="job")
    (tmp_path / "plot.png").write_text("plot")
    run.log_artifact(tmp_path / "plot.png", "plan")
    log_steps(run, range(5))
    run.finish("FINISHED")
    report = tracker.close(timeout_s=5)
    assert report.spill_file is None and fake.run("k").steps() == list(range(5))
    assert sorted(p.name for p in spill_dir.iterdir()) == []


def test_an_operation_after_close_leaves_no_open_spill_file_behind(fake: FakeStore, spill_dir: Path) -> None:
    """A log after close reopened the spill writer and never closed it: its shared lock on the file
    lasted the process, so the next run of the job in that process (a notebook, a `submit` of many
    jobs) sent the late line but could not remove the sent file, which was left in the spill folder."""
    from tracking_fakes import log_steps

    first = Tracker(URI, spill_dir=spill_dir)
    run = first.open_run(experiment="e", run_key="k", run_name="job")
    log_steps(run, range(5))
    first.close(timeout_s=5)
    run.set_tags({"late": "yes"})  # after close: written to the spill file, never lost
    again = Tracker(URI, spill_dir=spill_dir)
    rerun = again.open_run(experiment="e", run_key="k", run_name="job")
    log_steps(rerun, range(5, 10))
    report = again.close(timeout_s=5)
    assert report.spill_file is None and fake.run("k").tags["late"] == "yes"
    assert fake.run("k").steps() == list(range(10))
    assert sorted(p.name for p in spill_dir.iterdir()) == []
