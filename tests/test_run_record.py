"""What the driver records when it opens the job's run (`orchestrator/driver/run_record.py`), on the
tracker with an in-memory store (tracking_fakes.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from tracking_fakes import URI, FakeStore, fake, log_steps  # noqa: F401 (fixture: fake)

from orchestrator.driver.run_record import _log_sizing
from orchestrator.tracking import Tracker


def test_a_resumed_run_keeps_its_one_prediction_at_step_0(fake: FakeStore, tmp_path: Path) -> None:
    """A rerun that continues the run predicts again (profiled again: another figure); MLflow held
    two points at step 0 of plan/predicted_samples_per_s, a vertical jump at the chart's start."""
    for throughput in (5014.0, 4763.0):
        tracker = Tracker(URI, spill_dir=tmp_path)
        run = tracker.open_run(experiment="e", run_key="k", run_name="job")
        sizing = SimpleNamespace(profile=None, cluster=None, plan=None,
                                 prediction=SimpleNamespace(throughput=throughput, efficiency=0.3))
        _log_sizing(run, sizing)
        log_steps(run, range(1, 11) if throughput == 5014.0 else range(11, 21))
        tracker.close(timeout_s=5)
    got = fake.run("k")
    assert got.steps("plan/predicted_samples_per_s") == [0] and got.steps() == list(range(1, 21))
    assert [p[1] for p in got.points if p[0] == "plan/predicted_samples_per_s"] == [5014.0]
