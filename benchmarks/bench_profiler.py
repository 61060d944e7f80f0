"""Profiler cost: seconds of device time to profile each default config (cache bypassed).

``orchestrator.profiler.profile_job`` runs the job's ladder of local batches on one Ray worker.
The device time is what the profiler itself measures (``meta.profile_seconds``: model, ladder,
noise scale, data rate); the wall time adds starting the Ray task. One run per config: profiling
is the measurement, and it is the longest one here. Goal (profiler issue): at most 30 s of device
time per default config on a GPU; this machine's CPU figures are reported as they are.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

from benchmarks.harness import Row, SectionResult, Stat, Workspace
from benchmarks.workloads import Workload

SECTION = "profiler"
GPU_GOAL_S = 30.0


def profile_cost(job: Any, *, use_gpu: bool) -> tuple[Any, float]:
    """(Profile, wall seconds) of profiling `job` afresh."""
    from orchestrator.profiler import profile_job

    accepted = inspect.signature(profile_job).parameters
    kwargs = {k: v for k, v in (("use_gpu", use_gpu), ("refresh", True)) if k in accepted}
    started = time.perf_counter()
    result = profile_job(job, **kwargs)
    wall = time.perf_counter() - started
    return (result[0] if isinstance(result, tuple) else result), wall


def missing() -> str | None:
    """Why the benchmark cannot run, or None."""
    try:
        import orchestrator.profiler as profiler
    except ImportError as exc:
        return f"orchestrator/profiler.py not importable yet ({exc}); profiler cost not measured"
    if not hasattr(profiler, "profile_job"):
        return "orchestrator.profiler has no profile_job yet; profiler cost not measured"
    return None


def measure(ws: Workspace, workloads: list[Workload], *, use_gpu: bool = False) -> SectionResult:
    why = missing()
    if why:
        return SectionResult(skipped=why)
    result = SectionResult()
    for workload in workloads:
        workload.prepare(ws)
        job = workload.job(ws, run_name=f"profile-{workload.name}")
        profile, wall = profile_cost(job, use_gpu=use_gpu)
        device_s = float(profile.meta.get("profile_seconds", wall))
        result.rows.append(Row(
            section=SECTION, measure=f"{workload.name}: device seconds to profile", unit="s",
            ours=Stat.of([device_s]), goal=f"<= {GPU_GOAL_S:g} on a GPU",
            note=(f"{profile.device}; max local batch {profile.max_local_batch}; "
                  f"wall {wall:.1f} s with the Ray task start"),
        ))
        result.details[workload.name] = {"wall_s": wall, "profile": profile.to_dict()}
    return result
