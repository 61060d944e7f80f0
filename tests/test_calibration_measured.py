"""Calibration on real measurements (a reduced bench_calibration): three models trained with DDP
over gloo across two nodes of the session's Ray cluster; the network calibrated on two of them
must predict the third model's steps better than the uncalibrated priors do. Two gradient sizes
tell the per-message latency from the bandwidth; one alone cannot, and the fit then leans on
the priors for the split.

Both predictions take the held-out steps' own compute (their steps without gradient sync,
measured in turn with the synced ones): calibration fits the network, and on 2 shared cores the
workers' compute drifts far from the one-worker profile from run to run (2-4x here), which
would decide the comparison instead of the network (bench_calibration.py shows both)."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import calibration_runs as runs
from benchmarks.bench_calibration import SPEC, given_compute
from orchestrator.planner import Placement, calibrate

pytestmark = pytest.mark.slow

# Three sizes of one MLP: enough gradient (1.6-5.3 MB) that the all-reduce shows, little compute.
SMALL = runs.Workload("mlp_small", "mlp", {"in_features": 256, "hidden": 512, "depth": 2}, (256,), 32)
HELD = runs.Workload("mlp_medium", "mlp", {"in_features": 256, "hidden": 768, "depth": 2}, (256,), 32)
LARGE = runs.Workload("mlp_large", "mlp", {"in_features": 256, "hidden": 1024, "depth": 2}, (256,), 32)
# The session cluster's two nodes with one logical GPU each: one worker per node.
ACROSS = Placement(2, 1)


def test_calibrated_on_two_models_predicts_a_third_better_than_the_priors(ray_cluster: Any) -> None:
    workloads = [SMALL, HELD, LARGE]
    medians = runs.measure(ACROSS, workloads, resources={"GPU": 1}, warmup=5, steps=48)
    profiles = {w.name: runs.profile(w, (w.batch,)) for w in workloads}
    observed = runs.observations(profiles, ACROSS, medians, workloads)
    train = [o for o in observed if o.profile.model != HELD.name]
    held = [o for o in observed if o.profile.model == HELD.name]
    cluster = calibrate(SPEC, train)
    assert cluster.calibration.observations == 2
    assert not cluster.calibration.kept_input, (medians, cluster.calibration)
    assert "inter_GBps" in cluster.calibration.fitted, cluster.calibration

    def error(c: Any) -> float:
        return sum(abs(given_compute(o, c) / o.step_time_s - 1) for o in held) / len(held)

    calibrated, priors = error(cluster), error(SPEC)
    print(f"\nheld-out mean |error|: calibrated {calibrated:.1%}, priors {priors:.1%}; measured {medians}")
    assert calibrated < priors, (medians, cluster.calibration)
