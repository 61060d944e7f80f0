"""What the driver's recorder writes to the MLflow run across driver sessions, on a fake run (no
Ray, no MLflow). (The controller's transitions are in test_controller*.py.)"""

from __future__ import annotations

from driver_fakes import FakeRun, group

from orchestrator.driver.policies import GroupKind
from orchestrator.driver.recorder import Recorder


def test_every_gap_of_a_run_with_several_outages_is_kept() -> None:
    """Two drivers killed while their workers trained on: each rerun found steps without metrics,
    and the second one's `metrics.gap` tag replaced the first's, which the run no longer said."""
    run, counts, said = FakeRun(), {}, []
    for floor, resumed in ((125, 200), (260, 300)):  # each rerun: the run's last step, the checkpoint
        run.resumed, run.resume_floor = True, floor
        recorder = Recorder(run, status=said.append, global_batch=32, counts=counts,
                            save_counts=lambda saved: counts.update(saved))
        recorder.group_started(group(resumed, resumed=resumed), GroupKind.FIRST)
    assert {k: v for k, v in run.tags.items() if k.startswith("metrics.gap")} == {
        "metrics.gap.1": "steps 126-200 were trained by an earlier driver that stopped before sending their metrics; "
                         "this run has none for them",
        "metrics.gap.2": "steps 261-300 were trained by an earlier driver that stopped before sending their metrics; "
                         "this run has none for them"}
    assert [s for s in said if "trained by an earlier driver" in s] == [
        f"resumed from step {resumed}: steps {floor + 1}-{resumed} were trained by an earlier driver that stopped "
        "before sending their metrics; this run has none for them" for floor, resumed in ((125, 200), (260, 300))]


def test_steps_that_log_every_never_logs_are_no_gap() -> None:
    """training.log_every 10, checkpoint at 25, the run's last step 20: steps 21-25 were never to be
    logged, so no gap is said; resumed from 35, step 30 is missing, and that is said."""
    said: list[str] = []
    for resumed, gap in ((25, False), (35, True)):
        run = FakeRun()
        run.resumed, run.resume_floor = True, 20
        Recorder(run, status=said.append, global_batch=32, log_every=10).group_started(
            group(resumed, resumed=resumed), GroupKind.FIRST)
        assert ("metrics.gap.1" in run.tags) is gap, resumed
    assert [s for s in said if "earlier driver" in s] == [
        "resumed from step 35: steps 21-35 were trained by an earlier driver that stopped before sending their "
        "metrics; this run has none for them"]
    assert "resumed from step 25, the newest checkpoint" in said
