"""How many workers a job runs on, and why: profile and plan (`workers: auto` or a range), or
predict a fixed count; and what to ask the autoscaler for. (Ray is imported by the functions that
ask the live cluster, so the controller that uses `Sizing` stays free of it.)"""

from __future__ import annotations

import os
from dataclasses import dataclass

from orchestrator.config import JobConfig, WorkerRange
from orchestrator.planner import ClusterSpec, Plan, Prediction, Profile
from trainers.batching import split_global_batch

Workers = int | tuple[int, int]


@dataclass
class Sizing:
    """How many workers, and why: the plan (workers: auto) or the prediction for a fixed count."""

    workers: Workers
    max_local_batch: int | None
    profile: Profile | None = None
    profile_cached: bool = False
    cluster: ClusterSpec | None = None
    plan: Plan | None = None
    prediction: Prediction | None = None

    @property
    def explanation(self) -> str:
        if self.plan is not None:
            return self.plan.explanation
        if self.prediction is not None:
            p, cal = self.prediction, self.cluster.calibration if self.cluster else None
            basis = f"Network calibrated from {cal.source}." if cal else "Network from uncalibrated priors."
            return (f"{p.gpus} workers as configured: predicted {p.step_time_s * 1e3:.1f} ms/step, "
                    f"{p.throughput:,.0f} samples/s, scaling efficiency {p.efficiency:.2f}. {basis}")
        return "workers as configured (profiling off)."

    @property
    def most(self) -> int:
        return most(self.workers)


def most(workers: Workers) -> int:
    return workers if isinstance(workers, int) else workers[1]


def describe(workers: Workers) -> str:
    return str(workers) if isinstance(workers, int) else f"{workers[0]}-{workers[1]} (elastic)"


def wants_gpu(job: JobConfig) -> bool:
    import ray

    if job.resources.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(job.resources.use_gpu)


def fixed_workers(job: JobConfig, workers: int | None) -> int | None:
    configured = job.resources.workers
    return workers or (configured if isinstance(configured, int) else None)


def fixed_accumulation(job: JobConfig) -> int | None:
    """training.grad_accumulation when the config fixes it (the loop then trains that split at any
    worker count), None for auto."""
    accumulation = job.training.grad_accumulation
    return None if accumulation == "auto" else accumulation


def elastic_bounds(job: JobConfig, sizing: Sizing) -> tuple[int, int] | None:
    """The worker range a launched job may run in: the configured one, else the elastic launch's
    (None for a fixed count)."""
    if isinstance(sizing.workers, int):
        return None
    configured = job.resources.workers
    return (configured.min, configured.max) if isinstance(configured, WorkerRange) else sizing.workers


def least_workers(job: JobConfig, workers: int | None) -> int:
    """The fewest workers the job can run on: a fixed count does not shrink."""
    fixed = fixed_workers(job, workers)
    configured = job.resources.workers
    return fixed or (configured.min if isinstance(configured, WorkerRange) else 1)


def autoscale_enabled(job: JobConfig) -> bool:
    """resources.autoscale: false never; true on any cluster Ray joins; auto where an autoscaler
    can add nodes. An embedded Ray has nothing to scale."""
    from orchestrator import autoscale
    from orchestrator.ray_session import embedded

    mode = job.resources.autoscale
    if mode is False or embedded():
        return False
    return mode is True or autoscale.autoscaler_present()


def sizes_before_autoscaling(job: JobConfig, workers: int | None) -> bool:
    """Whether the count to ask the autoscaler for comes from a plan: not for a fixed count, and
    not for a range without a cluster file (the live cluster may not have its nodes yet: ask for
    the range's maximum)."""
    r = job.resources
    return not fixed_workers(job, workers) and not (isinstance(r.workers, WorkerRange) and not r.cluster)


def live_cluster(job: JobConfig, *, use_gpu: bool) -> ClusterSpec:
    """The cluster file if the config names one, else the live Ray cluster, its network calibrated
    (`orchestrator probe-network` runs once per cluster fingerprint, cached for this user)."""
    import ray

    from orchestrator.calibrations import newest
    from orchestrator.cluster import calibrated_live_cluster, load_cluster
    from orchestrator.files import user_cache_dir
    from orchestrator.ray_session import embedded

    if job.resources.cluster:
        spec = load_cluster(job.resources.cluster)
    else:
        per_worker = job.resources.cpus_per_worker
        if embedded() and not use_gpu:
            # An embedded Ray declares extra logical CPUs for Ray Data; plan (and probe) the real cores.
            per_worker *= ray.cluster_resources().get("CPU", 1) / (os.cpu_count() or 1)
        spec = calibrated_live_cluster(user_cache_dir("clusters"), use_gpu=use_gpu, cpus_per_worker=per_worker)
    # A calibration `orchestrator calibrate` fitted later than the spec's own; its note says so in
    # the plan's explanation and the run's `plan.calibration` tag.
    return newest(spec)[0]


def size_job(job: JobConfig, *, workers: int | None, use_gpu: bool, total_samples: int,
             max_workers: int | None = None) -> Sizing:
    """Profile and plan (workers: auto or a range) or predict (a fixed count); `max_workers` caps
    the plan (the workers that arrived when the autoscaler delivered fewer)."""
    from orchestrator.planner import deadline_from_hours, placement_for, plan, predict
    from orchestrator.profiler import profile_job

    configured = job.resources.workers
    fixed = fixed_workers(job, workers)
    if fixed and not job.resources.profile:
        return Sizing(fixed, job.training.max_local_batch)
    if isinstance(configured, WorkerRange) and not job.resources.profile:
        top = min(configured.max, max_workers or configured.max)
        return Sizing((configured.min, max(configured.min, top)), job.training.max_local_batch)
    cluster = live_cluster(job, use_gpu=use_gpu)
    profile, cached = profile_job(job, use_gpu=use_gpu, gpus_per_node=cluster.gpus_per_node)
    if fixed:
        placement = placement_for(cluster, fixed)
        split = split_global_batch(job.training.global_batch_size, workers=fixed, max_local_batch=profile.max_local_batch,
                                   accumulation=fixed_accumulation(job))
        prediction = predict(profile, cluster, nodes=placement.nodes, gpus_per_node=placement.gpus_per_node,
                             local_batch=split.local_batch, accumulation=split.accumulation, total_samples=total_samples)
        return Sizing(fixed, profile.max_local_batch, profile, cached, cluster, prediction=prediction)
    r = job.resources
    deadline = deadline_from_hours(r.deadline_hours, "resources.deadline_hours")
    caps = [c for c in (configured.max if isinstance(configured, WorkerRange) else None, max_workers) if c]
    chosen = plan(profile, cluster, objective=r.objective, min_efficiency=r.min_efficiency,
                  global_batch=job.training.global_batch_size, total_samples=total_samples,
                  deadline_s=deadline, budget=r.budget, max_gpus=min(caps) if caps else None,
                  accumulation=fixed_accumulation(job))
    count: Workers = chosen.workers
    if isinstance(configured, WorkerRange):
        count = (configured.min, max(configured.min, chosen.workers))
    # The memory limit, not the chosen micro-batch: the loop splits the global batch again for
    # whatever worker count an elastic (re)start gets, and gives the plan's split at the plan's count.
    return Sizing(count, profile.max_local_batch, profile, cached, cluster, plan=chosen, prediction=chosen.choice)
