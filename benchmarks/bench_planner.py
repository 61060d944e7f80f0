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

from orchestrator.planner import ClusterSpec, Profile, placements, plan  # noqa: E402
from tests.test_planner_validation import DLE_CSV, dle_error_summary  # noqa: E402

REPEATS = 7


def _profile() -> Profile:
    # A ResNet-50-like job: 25.6M fp32 gradients, a doubling ladder of local batches.
    return Profile.from_dict({
        "version": 1, "model": "resnet50-like", "device": "A100", "param_count": 25_600_000,
        "grad_bytes": 102_400_000, "max_local_batch": 256, "gradient_noise_scale": 4096.0,
        "data_samples_per_s": 4000.0,
        "samples": [{"local_batch": b, "step_time_s": 0.012 + 0.00029 * b, "optimizer_s": 0.003}
                    for b in (16, 32, 64, 128, 256)],
    })


def _time_plan(profile: Profile, cluster: ClusterSpec, **kwargs: Any) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        plan(profile, cluster, total_samples=100_000_000, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run() -> dict[str, Any]:
    profile = _profile()
    cluster = ClusterSpec(nodes=128, gpus_per_node=8, gpu="A100", intra_node_GBps=300,
                          inter_node_GBps=25, gpu_hour_cost=4.1)
    result: dict[str, Any] = {
        "plan_1024_gpus_placements": len(placements(cluster)),
        "plan_1024_gpus_s": _time_plan(profile, cluster),
        "plan_1024_gpus_global_batch_s": _time_plan(profile, cluster, global_batch=8192),
        "plan_1024_gpus_max_goodput_s": _time_plan(profile, cluster, objective="max_goodput"),
    }
    if DLE_CSV.is_file():
        dle = dle_error_summary()
        result.update({f"dle_{k}": v for k, v in dle.items()})
    return result


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
