"""Shared fixtures: one multi-node Ray cluster per test session (head + nodes with logical GPUs)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before Ray is imported anywhere: every Ray process of a test (Cluster nodes, `ray start`) takes
# 127.0.0.1 as its node address and listens there only (orchestrator/ray_session.py says how); no
# token auth for local test clusters (tests of the embedded Ray and of a head turn it on), no usage
# stats, gloo over loopback, and short driver poll intervals.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("ORCH_PROGRESS_POLL_S", "0.2")
os.environ.setdefault("ORCH_TRACKING_FLUSH_S", "0.5")
# Ray Train's own defaults, shortened for test clusters (jobs keep Ray's defaults): its controller
# polls the worker group every 0.5 s instead of 2 s (a job's end and a failed worker are seen
# sooner), and its preemption watcher, one more actor in each job's serial start-up chain that
# reacts to node drains no test makes, is off. Together: a digits job ~20 % sooner here.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# The orchestrator's per-user cache (each cluster's probe and newest calibration, tracking spills)
# lives under $XDG_CACHE_HOME: one fresh folder per test session, so what a developer's own runs
# cached never changes what a test sees, and the tests never write into it.
_CACHE = tempfile.mkdtemp(prefix="orchestrator-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """A head (CPU only) and two worker nodes declaring one logical GPU each, on this machine.

    Ray sets CUDA_VISIBLE_DEVICES for GPU workers while torch has no CUDA: the trainer must fall
    back to the CPU and gloo, which is exactly what these tests exercise.
    """
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False},
    )
    nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    from orchestrator.ray_session import worker_env

    # The test process is the driver of in-process jobs: it joins with the job's worker environment,
    # as `orchestrator run --address` does.
    ray.init(address=cluster.address, runtime_env={"env_vars": worker_env()})
    cluster.gpu_nodes = nodes  # type: ignore[attr-defined]
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainers.data import prepare_dataset

    return prepare_dataset("digits", tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture()
def job_overrides(tmp_path: Path, digits_data: Path) -> list[str]:
    """Overrides that point a shipped config at per-test storage and MLflow store."""
    return [
        f"data.path={digits_data}",
        f"checkpoint.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
