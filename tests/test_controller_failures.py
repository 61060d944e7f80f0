"""Worker failures as the controller records them in the MLflow run, with fakes (no Ray, no
MLflow): milliseconds. (test_controller.py holds the other transitions.)"""

from __future__ import annotations

from driver_fakes import FakeFit, World, group, steps

from orchestrator.config import validate
from orchestrator.driver.controller import JobController
from orchestrator.driver.ports import FitOutcome
from trainers.events import WorkerFailed

BASE = {"name": "job", "model": {"name": "mlp"}, "training": {"max_steps": 40, "global_batch_size": 32},
        "data": {"path": "data", "features": {"column": "x", "dtype": "float32"}}}


def test_a_worker_killed_before_the_first_group_said_it_started_is_recorded_as_a_restart() -> None:
    """A rerun's worker SIGKILLed while its group loaded the data: Ray Train restarted the group,
    but the driver took the next group for its first one: no restart.1 tag, no `restarts` counter,
    the cause dropped (only "worker failure before its first step" on the console)."""
    fit = FakeFit([[WorkerFailed(step=0, cause="rank 0: WorkerHealthCheckFailedError: A worker health check failed.")],
                   [group(30, 1, resumed=30)], [steps(31, 40)]], FitOutcome({"step": 40}))
    world = World(validate(BASE), [fit], total_steps=40)
    world.run.resumed, world.run.resume_floor = True, 20  # an earlier driver was killed after sending step 20
    controller = JobController(world.job, world.ports())
    result = controller.run()
    assert world.run.tags["restart.1"] == ("rank 0: WorkerHealthCheckFailedError: A worker health check failed.; "
                                           "resumed from step 30 on 1 worker x local batch 32 x accumulation 1")
    assert result.restarts == 1 and world.run.steps_of("restarts") == [30]
    assert world.run.steps_of("recovery_s") == [31]
    # the rerun's gap is still said when its first group is a restart
    assert world.run.tags["metrics.gap.1"].startswith("steps 21-30 were trained by an earlier driver")
    assert "worker failure before its first step: rank 0: WorkerHealthCheckFailedError: A worker health check " \
           "failed." in world.ui.statuses
