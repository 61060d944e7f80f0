"""Profile a job on ONE worker (the driver half): cache, schedule, assemble the `Profile`.

What is measured, and how, is the worker half (`trainers.profiling`): the job's own training
step at a ladder of local batches, the gradient noise scale, the data pipeline's rate. Here that
runs as one Ray task on one GPU (or CPU slot), and, when the cluster has several per node, once
more as `g` tasks packed on one node stepping at once without gradient sync: the per-node
contention the planner multiplies compute by. Profiles are cached by (config digest, device,
GPUs per node).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from orchestrator import constants
from orchestrator.config import JobConfig
from orchestrator.files import user_cache_dir, write_text
from orchestrator.planner import PROFILE_VERSION, Profile
from orchestrator.storage import is_remote

log = logging.getLogger(__name__)

# Steps each of a node's workers times beside the others (after its warm-up).
NODE_STEPS = 20


def cache_path(job: JobConfig, device_key: str, gpus_per_node: int = 1) -> Path:
    """Beside the job's checkpoints when they are local, else in this user's cache (a URI is no
    local folder: `Path("s3://b/runs")` would make one named `s3:` in the working directory)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_key).strip("-").lower()
    per_node = f"-x{gpus_per_node}" if gpus_per_node > 1 else ""
    name = f"{job.digest()}-{slug}{per_node}.json"
    storage = job.checkpoint.storage_path
    if is_remote(storage):
        return user_cache_dir("profiles", name)
    return Path(storage.removeprefix("file://"), "profiles", name)


def device_key(use_gpu: bool) -> str:
    """What the profile's device will be, known before profiling (for the cache)."""
    import ray

    if not use_gpu:
        return "cpu"
    types = sorted(k.split(":", 1)[1] for k in ray.cluster_resources() if k.startswith("accelerator_type:"))
    return "gpu-" + "-".join(types) if types else "gpu"


def profile_job(job: JobConfig, *, use_gpu: bool, gpus_per_node: int = 1, refresh: bool = False
                ) -> tuple[Profile, bool]:
    """The job's profile, from the cache or measured on the cluster; returns (profile, cached)."""
    path = cache_path(job, device_key(use_gpu), gpus_per_node)
    if path.is_file() and not refresh:
        return Profile.load(path), True
    raw = _measure_one(job, use_gpu=use_gpu)
    # At the largest timed rung (max_local_batch may be past it, only checked to fit): the node's
    # contention is its step time over that rung's, so both must be measured.
    timed = raw["samples"][-1]["local_batch"]
    node_samples = [s for g in _node_counts(gpus_per_node)
                    if (s := _measure_node(job, use_gpu=use_gpu, gpus=g, local_batch=timed))]
    if node_samples:
        raw["node_samples"] = node_samples
    profile = Profile.from_dict({"version": PROFILE_VERSION, **raw})
    tmp = write_text(path.with_suffix(".tmp"), json.dumps(profile.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)  # whole or not at all: another job may read the cache now
    return profile, False


def _node_counts(gpus_per_node: int) -> list[int]:
    """GPUs per node to measure contention at: the full node, and half of a large one."""
    return sorted({g for g in (gpus_per_node, gpus_per_node // 2) if g > 1})


def _worker_config(job: JobConfig) -> dict[str, Any]:
    return job.localized().worker_config().model_dump(mode="json")


def _measure_one(job: JobConfig, *, use_gpu: bool) -> dict[str, Any]:
    import ray

    from trainers.profiling import measure

    task = ray.remote(num_cpus=job.resources.cpus_per_worker, num_gpus=1 if use_gpu else 0)(measure)
    return ray.get(task.remote(_worker_config(job), budget_s=constants.PROFILE_BUDGET_S,
                               data_s=constants.PROFILE_DATA_S))


class Barrier:
    """Releases a node's workers together once every one has warmed up (an async Ray actor)."""

    def __init__(self, parties: int) -> None:
        self._left, self._all = parties, asyncio.Event()

    async def wait(self) -> None:
        self._left -= 1
        if self._left <= 0:
            self._all.set()
        await self._all.wait()


def _measure_node(job: JobConfig, *, use_gpu: bool, gpus: int, local_batch: int) -> dict[str, Any] | None:
    """`gpus` workers packed on one node, stepping at once: their median step time, or None when
    the cluster cannot place them on one node now (the planner then assumes no contention)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from trainers.profiling import overlapping_median, time_steps

    bundle = {"CPU": job.resources.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    pg = placement_group([bundle] * gpus, strategy="STRICT_PACK")
    try:
        if not pg.wait(timeout_seconds=constants.PROFILE_NODE_WAIT_S):
            log.warning("profile: %d workers do not fit on one node now; per-node contention not measured", gpus)
            return None
        barrier = ray.remote(num_cpus=0)(Barrier).remote(gpus)
        task = ray.remote(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0))(time_steps)
        refs = [task.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
                .remote(_worker_config(job), local_batch=local_batch, steps=NODE_STEPS, barrier=barrier,
                        wait_s=constants.PROFILE_NODE_WAIT_S) for i in range(gpus)]
        median = overlapping_median(ray.get(refs))
    finally:
        remove_placement_group(pg)
    if median is None:
        log.warning("profile: the %d workers of one node did not step at the same time; per-node contention "
                    "not measured", gpus)
        return None
    return {"gpus_per_node": gpus, "local_batch": local_batch, "step_time_s": median}
