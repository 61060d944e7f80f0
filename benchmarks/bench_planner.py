"""Planner benchmark: planning a 1,024-GPU cluster over every placement, and the DLE error.

Run as ``python benchmarks/bench_planner.py`` (prints JSON) or call ``run()``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the validation helpers live with their test

from benchmarks.harness import Row, SectionResult, Stat  # noqa: E402
from orchestrator.planner import ClusterSpec, Profile, placements, plan  # noqa: E402
from tests.test_planner_validation import DLE_CSV, dle_error_summary  # noqa: E402

REPEATS = 7
PLAN_CASES: dict[str, dict[str, Any]] = {
    "plan_1024_gpus_s": {},
    "plan_1024_gpus_global_batch_s": {"global_batch": 8192},
    "plan_1024_gpus_max_goodput_s": {"objective": "max_goodput"},
}
CASE_LABELS = {
    "plan_1024_gpus_s": "max_throughput",
    "plan_1024_gpus_global_batch_s": "global batch 8,192",
    "plan_1024_gpus_max_goodput_s": "max_goodput",
}
# The planner issue: planning 1,024 GPUs over all placements "in well under a second".
PLAN_GOAL_S = 1.0


def _profile() -> Profile:
    # A ResNet-50-like job: 25.6M fp32 gradients, a doubling ladder of local batches.
    return Profile.from_dict({
        "version": 1, "model": "resnet50-like", "device": "A100", "param_count": 25_600_000,
        "grad_bytes": 102_400_000, "max_local_batch": 256, "gradient_noise_scale": 4096.0,
        "data_samples_per_s": 4000.0,
        "samples": [{"local_batch": b, "step_time_s": 0.012 + 0.00029 * b, "optimizer_s": 0.003}
                    for b in (16, 32, 64, 128, 256)],
    })


def _time_plan(profile: Profile, cluster: ClusterSpec, **kwargs: Any) -> list[float]:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        plan(profile, cluster, total_samples=100_000_000, **kwargs)
        times.append(time.perf_counter() - start)
    return times


def run() -> dict[str, Any]:
    profile = _profile()
    cluster = ClusterSpec(nodes=128, gpus_per_node=8, gpu="A100", intra_node_GBps=300,
                          inter_node_GBps=25, gpu_hour_cost=4.1)
    result: dict[str, Any] = {"plan_1024_gpus_placements": len(placements(cluster))}
    for key, kwargs in PLAN_CASES.items():
        times = _time_plan(profile, cluster, **kwargs)
        result[key] = statistics.median(times)
        result[f"{key}_range"] = [min(times), max(times)]
    if DLE_CSV.is_file():
        dle = dle_error_summary()
        result.update({f"dle_{k}": v for k, v in dle.items()})
    return result


def summarize(result: dict[str, Any]) -> SectionResult:
    """Table rows for `make bench` (benchmarks/run.py)."""
    rows = []
    for key, label in CASE_LABELS.items():
        lo, hi = result[f"{key}_range"]
        seconds = Stat(result[key], lo, hi, REPEATS)
        rows.append(Row(section="planner", measure=f"plan 1,024 GPUs, {result['plan_1024_gpus_placements']} "
                        f"placements, {label}", unit="s", ours=seconds, goal=f"< {PLAN_GOAL_S:g}",
                        met=seconds.median < PLAN_GOAL_S))
    if "dle_rows" in result:
        for key, label in (("dle_median_abs_error_pct", "median"), ("dle_worst_abs_error_pct", "worst")):
            rows.append(Row(section="planner", measure=f"DLE tables: {label} abs error of predicted throughput",
                            unit="%", ours=Stat(result[key], result[key], result[key], result["dle_rows"]),
                            note="untuned model; n = table rows"))
    return SectionResult(rows=rows, details=result)


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
