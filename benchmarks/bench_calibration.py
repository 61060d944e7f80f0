"""Calibration on real measurements: does a network fitted on some models predict another?

A `ray.cluster_utils.Cluster` of two CPU "nodes" (2 worker slots each) on this machine: workers
exchange gradients with gloo over TCP, a real and slow network. The shipped configs' models and
a few other sizes (`model.kwargs`) are profiled on one worker and trained at 1x2, 2x1 and 2x2
(calibration_runs.py). Then, for each model in turn, the cluster is calibrated on the OTHER
models' steps and predicts this one; the same rows spec-only (the uncalibrated priors), with a
naive ring at the line rate (no overlap) and with no communication at all, side by side.

    python benchmarks/bench_calibration.py [--out benchmarks/results/calibration.json] [--reanalyze]

--reanalyze repeats the analysis on the observations the last run stored (no measuring).

Takes 5-10 minutes here (2 cores). `bench_planner.py` shows the last result's rows in `make bench`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import calibration_runs as runs  # noqa: E402
from benchmarks.harness import RESULTS, LoadSampler, setup_environment  # noqa: E402
from orchestrator.planner import ClusterSpec, Observation, Placement, calibrate, predict  # noqa: E402
from orchestrator.planner.model import PerformanceModel  # noqa: E402
from trainers.batching import split_global_batch  # noqa: E402

RESULT_FILE = RESULTS / "calibration.json"
PLACEMENTS = [Placement(1, 2), Placement(2, 1), Placement(2, 2)]
# The shipped configs' models (configs/*.yaml) and other sizes of them.
WORKLOADS = [
    runs.Workload("digits_cnn", "cnn", {"in_channels": 1, "num_classes": 10, "width": 32}, (1, 8, 8), 64),
    runs.Workload("cnn_w96", "cnn", {"in_channels": 1, "num_classes": 10, "width": 96}, (1, 8, 8), 32),
    runs.Workload("synthetic_resnet", "resnet", {"in_channels": 3, "num_classes": 10, "width": 32, "depth": 2,
                                                 "stages": 3}, (3, 32, 32), 8),
    runs.Workload("resnet_w16", "resnet", {"in_channels": 3, "num_classes": 10, "width": 16, "depth": 1,
                                           "stages": 3}, (3, 32, 32), 16),
    runs.Workload("tiny_gpt", "gpt", {"vocab_size": 256, "context": 128, "n_layer": 4, "n_head": 4, "n_embd": 128},
                  (129,), 8, tokens=256),
    runs.Workload("gpt_256", "gpt", {"vocab_size": 256, "context": 64, "n_layer": 4, "n_head": 4, "n_embd": 256},
                  (65,), 4, tokens=256),
    runs.Workload("mlp_wide", "mlp", {"in_features": 256, "hidden": 1024, "depth": 2, "num_classes": 10}, (256,), 64),
]
# What a user would write for this machine before measuring: gloo between CPU workers over
# loopback, inside a node and between the cluster's "nodes" alike (cluster.py: CPU_DEFAULTS).
SPEC = ClusterSpec(nodes=2, gpus_per_node=2, gpu="cpu", intra_node_GBps=2.0, inter_node_GBps=1.25,
                   intra_link="loopback", inter_link="loopback")


def start_cluster() -> Any:
    """A head for the driver and the trainer's controller, and two worker nodes of 2 slots."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=2, resources={"slot": 2})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    return cluster


def collect(workloads: list[runs.Workload], placements: list[Placement]) -> list[Observation]:
    """Profiles and one trainer run per placement (Ray connected); observations of every model."""
    medians = {p: runs.measure(p, workloads) for p in placements}
    profiles = {w.name: runs.with_node_samples(runs.profile(w, (w.batch // 2, w.batch)), w, medians)
                for w in workloads}
    return [o for p in placements for o in runs.observations(profiles, p, medians[p], workloads)]


def _error(predicted: float, observed: float) -> float:
    return 100 * abs(predicted / observed - 1)


def _naive_ring(o: Observation, spec: ClusterSpec) -> float:
    ranks = o.nodes * o.gpus_per_node
    link = min(spec.intra_node_GBps, spec.inter_node_GBps) if o.nodes > 1 else spec.intra_node_GBps
    single = predict(o.profile, spec, nodes=1, gpus_per_node=1, local_batch=o.local_batch).step_time_s
    return single + 2 * (ranks - 1) / ranks * o.profile.grad_bytes / (link * 1e9)


def _no_comm(o: Observation, spec: ClusterSpec) -> float:
    return predict(o.profile, spec, nodes=1, gpus_per_node=1, local_batch=o.local_batch).step_time_s


def _spec_only(o: Observation, spec: ClusterSpec) -> float:
    return predict(o.profile, spec, nodes=o.nodes, gpus_per_node=o.gpus_per_node, local_batch=o.local_batch).step_time_s


def given_compute(o: Observation, cluster: ClusterSpec) -> float:
    """The model's step with the observation's own compute (its steps without sync): the
    network model alone, free of the compute contention of 4 workers on 2 cores."""
    model = PerformanceModel(o.profile, cluster)
    split = split_global_batch(o.local_batch, workers=1, max_local_batch=o.profile.max_local_batch)
    steps = model.steps(o.nodes, o.gpus_per_node, split.local_batch, o.accumulation * split.accumulation,
                        compute_s=o.compute_step_time_s)
    return float(steps.step)


PREDICTORS = {"spec-only (priors)": _spec_only, "naive ring at line rate, no overlap": _naive_ring,
              "no communication": _no_comm}


def leave_one_model_out(spec: ClusterSpec, observations: list[Observation]) -> dict[str, Any]:
    """Each model predicted by a calibration on the others; baselines on the same rows; and
    both given each step's measured compute (the network model alone)."""
    names = sorted({o.profile.model for o in observations})
    errors: dict[str, list[float]] = {}
    per_model = {}
    for name in names:
        held = [o for o in observations if o.profile.model == name]
        cluster = calibrate(spec, [o for o in observations if o.profile.model != name])
        rows = {"calibrated on the other models": [_spec_only(o, cluster) for o in held],
                **{label: [f(o, spec) for o in held] for label, f in PREDICTORS.items()},
                "given compute: calibrated on the other models": [given_compute(o, cluster) for o in held],
                "given compute: spec-only (priors)": [given_compute(o, spec) for o in held]}
        for label, predicted in rows.items():
            errors.setdefault(label, []).extend(_error(p, o.step_time_s) for p, o in zip(predicted, held))
        per_model[name] = {"fitted": list(cluster.calibration.fitted),
                           "calibrated_pct": [round(_error(p, o.step_time_s), 1) for p, o in
                                              zip(rows["calibrated on the other models"], held)]}
    by_placement = {str(p): _stats([_error(_spec_only(o, calibrate(spec, [x for x in observations if x.profile.model
                                                                            != o.profile.model])), o.step_time_s)
                                    for o in observations if (o.nodes, o.gpus_per_node) == (p.nodes, p.gpus_per_node)])
                    for p in PLACEMENTS}
    return {"summary": {label: _stats(e) for label, e in errors.items()}, "per_model": per_model,
            "calibrated_by_placement": by_placement}


def _stats(errors: list[float]) -> dict[str, float]:
    ordered = sorted(errors)
    return {"rows": len(ordered), "median_abs_error_pct": statistics.median(ordered),
            "p90_abs_error_pct": ordered[min(int(0.9 * len(ordered)), len(ordered) - 1)]}


def analyze(observed: list[Observation]) -> dict[str, Any]:
    result = leave_one_model_out(SPEC, observed)
    result.update(calibration_all_models=calibrate(SPEC, observed).calibration.to_dict(),
                  observations=[o.to_dict() for o in observed])
    return result


def run() -> dict[str, Any]:
    import ray

    setup_environment()
    started = time.perf_counter()
    cluster = start_cluster()
    try:
        with LoadSampler() as load:  # the machine is shared: the context every figure was measured in
            observed = collect(WORKLOADS, PLACEMENTS)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {**analyze(observed), "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": time.perf_counter() - started, "placements": [str(p) for p in PLACEMENTS],
            "models": [w.name for w in WORKLOADS], "load_average_1m": load.summary()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULT_FILE)
    parser.add_argument("--reanalyze", action="store_true", help="analyze the stored observations again")
    args = parser.parse_args(argv)
    if args.reanalyze:
        stored = json.loads(args.out.read_text())
        result = {**stored, **analyze([Observation.from_dict(o) for o in stored["observations"]])}
    else:
        result = run()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for label, s in result["summary"].items():
        print(f"{label:48s} median {s['median_abs_error_pct']:5.1f} %  p90 {s['p90_abs_error_pct']:5.1f} %  "
              f"({s['rows']} rows)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
