"""Calibration on real measurements (a reduced bench_calibration): two models trained with DDP
over gloo across two nodes of the session's Ray cluster; a calibration on one model's steps must
predict the other model's steps better than the uncalibrated priors do."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import calibration_runs as runs
from benchmarks.bench_calibration import SPEC
from orchestrator.planner import Placement, calibrate, predict

pytestmark = pytest.mark.slow

# Two sizes of one MLP: enough gradient (1-5 MB) that the all-reduce shows, little compute.
SMALL = runs.Workload("mlp_small", "mlp", {"in_features": 256, "hidden": 512, "depth": 2}, (256,), 32)
LARGE = runs.Workload("mlp_large", "mlp", {"in_features": 256, "hidden": 1024, "depth": 2}, (256,), 32)
# The session cluster's two nodes with one logical GPU each: one worker per node.
ACROSS = Placement(2, 1)


def test_calibrated_on_one_model_predicts_another_better_than_the_priors(ray_cluster: Any) -> None:
    workloads = [SMALL, LARGE]
    medians = runs.measure(ACROSS, workloads, resources={"GPU": 1}, warmup=3, steps=12)
    profiles = {w.name: runs.profile(w, (w.batch,)) for w in workloads}
    observed = runs.observations(profiles, ACROSS, medians, workloads)
    train = [o for o in observed if o.profile.model == SMALL.name]
    held = [o for o in observed if o.profile.model == LARGE.name]
    cluster = calibrate(SPEC, train)
    assert cluster.calibration.observations == 1 and not cluster.calibration.kept_input

    def error(c: Any) -> float:
        predicted = [predict(o.profile, c, nodes=o.nodes, gpus_per_node=o.gpus_per_node,
                             local_batch=o.local_batch).step_time_s for o in held]
        return sum(abs(p / o.step_time_s - 1) for p, o in zip(predicted, held)) / len(held)

    calibrated, priors = error(cluster), error(SPEC)
    print(f"\nheld-out mean |error|: calibrated {calibrated:.1%}, priors {priors:.1%}")
    assert calibrated < priors
