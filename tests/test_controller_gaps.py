"""A rerun's steps without metrics (`metrics.gap.<n>`) when MLflow answers late or never saw the
earlier driver's run, with fakes (no Ray, no MLflow). (test_controller.py holds the gap said when
the run is resolved at the group's start.)"""

from __future__ import annotations

from driver_fakes import FakeFit, World, group, steps

from orchestrator.config import validate
from orchestrator.driver.controller import JobController
from orchestrator.driver.ports import FitOutcome
from trainers.events import GroupEnded

BASE = {"name": "job", "model": {"name": "mlp"}, "training": {"max_steps": 210, "global_batch_size": 32},
        "data": {"path": "data", "features": {"column": "x", "dtype": "float32"}}}
GAP = "steps 1-200 were trained by an earlier driver that stopped before sending their metrics; this run has none for them"


def rerun(fit: FakeFit, **answer: object) -> World:
    """A rerun resumed from the checkpoint at 200 while MLflow is down; `answer` is what the run
    resolves to once the fit has one batch left."""
    def mlflow_answers(world: World) -> None:
        if world.current and len(world.current.batches) == 1:
            world.run.resumed, world.run.resume_floor = answer["resumed"], answer["floor"]

    world = World(validate(BASE), [fit], total_steps=210, on_poll=mlflow_answers)
    world.run.resumed, world.run.resume_floor = None, None
    JobController(world.job, world.ports()).run()
    return world


def test_a_run_mlflow_never_saw_says_every_step_before_the_checkpoint_has_no_metrics() -> None:
    """The killed driver's records never reached MLflow (its queue died with it, or they wait in a
    spill file elsewhere): the rerun's open created the run, which holds nothing below step 200.
    A run resolved as new (or one without a single training step) fell through: no gap was said."""
    for resumed in (False, True):  # created now, or found holding no training step
        fit = FakeFit([[group(200, resumed=200)], [steps(201, 205)], [steps(206, 210)]], FitOutcome({"step": 210}))
        world = rerun(fit, resumed=resumed, floor=None)
        assert world.run.tags["metrics.gap.1"] == GAP
        assert [s for s in world.ui.statuses if "earlier driver" in s] == [f"resumed from step 200: {GAP}"]


def test_the_gap_is_said_when_mlflow_answers_after_the_last_steps_were_drained() -> None:
    """The run was resolved at a poll that drained no steps (the group's end): the gap waited for
    steps that never came."""
    fit = FakeFit([[group(200, resumed=200)], [steps(201, 210)], [GroupEnded(step=210, reason="finished")]],
                  FitOutcome({"step": 210}))
    world = rerun(fit, resumed=True, floor=125)
    assert world.run.tags["metrics.gap.1"].startswith("steps 126-200 were trained by an earlier driver")
