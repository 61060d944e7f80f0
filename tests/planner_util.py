"""Profiles and clusters for the planner's unit tests: a toy model on a 4 x 8 A100-like cluster."""

from __future__ import annotations

from typing import Any

from orchestrator.planner import ClusterSpec, Profile


def profile_dict(**overrides: Any) -> dict[str, Any]:
    data = {
        "version": 1,
        "model": "toy",
        "device": "A100",
        "param_count": 25_000_000,
        "grad_bytes": 100_000_000,
        "samples": [
            {"local_batch": 32, "step_time_s": 0.040, "optimizer_s": 0.004},
            {"local_batch": 64, "step_time_s": 0.070, "optimizer_s": 0.004},
            {"local_batch": 128, "step_time_s": 0.130, "optimizer_s": 0.004},
        ],
        "max_local_batch": 128,
    }
    data.update(overrides)
    return data


def make_profile(**overrides: Any) -> Profile:
    return Profile.from_dict(profile_dict(**overrides))


def make_cluster(**overrides: Any) -> ClusterSpec:
    data = {"nodes": 4, "gpus_per_node": 8, "intra_node_GBps": 300, "inter_node_GBps": 25,
            "gpu_hour_cost": 2.0}
    data.update(overrides)
    return ClusterSpec.from_dict(data)
