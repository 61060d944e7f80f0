"""Sizing a job's Ray cluster from the planner's plan (plan.json as a dict) or, without one,
from the config's resources section; and the job's deadline."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.config import JobConfig, WorkerRange
from orchestrator.errors import UserError, shown

MEMORY_GI_PER_CPU = 4
MEMORY_GI_PER_GPU = 16
# A job killed at its deadline loses at most the work since its last checkpoint; the margin
# covers pod scheduling, image pulls and the autoscaler.
DEADLINE_FACTOR = 2.0
DEADLINE_MARGIN_S = 15 * 60
DEFAULT_DEADLINE_S = 24 * 3600  # without a plan or a resources.deadline_hours
# The planner's own bounds (orchestrator.planner: types.MAX_GPUS, base.MAX_DEADLINE_S; not imported,
# the manifests need no numpy): a plan beyond them was not written by `orchestrator plan`, and a
# deadline beyond a million hours is no schedule (and no integer activeDeadlineSeconds).
MAX_PLAN_GPUS = 65_536
MAX_DEADLINE_S = 3600 * 10**6
# RayJob's activeDeadlineSeconds is an int32 (the CRD's format, KubeRay's *int32): past it (68 years)
# the API server and the operator refuse the RayJob, so a longer deadline is that one.
MAX_ACTIVE_DEADLINE_S = 2**31 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerGroup:
    """The Ray worker pods of one job: `pods` alike, `workers` Ray Train workers over them."""

    pods: int
    workers: int
    gpus_per_pod: int  # 0: CPU workers
    cpus_per_pod: int
    memory_gi: int

    @property
    def gpu(self) -> bool:
        return self.gpus_per_pod > 0

    def __str__(self) -> str:
        per_pod = f"{self.gpus_per_pod} GPU" if self.gpu else f"{self.cpus_per_pod} CPU"
        return f"{self.workers} worker(s) on {self.pods} pod(s) of {per_pod}"


# ---------------------------------------------------------------------------------------------
# Sizing from the plan


def worker_group(config: JobConfig, plan: Mapping[str, Any] | None) -> WorkerGroup:
    """Pods from the plan's placement; without a plan, one pod per configured worker."""
    if plan is not None:
        on_cpu = str(plan.get("gpu") or "").strip().lower() == "cpu"  # planned on a `gpu: cpu` cluster
        if config.resources.use_gpu is on_cpu:  # true on a CPU plan, false on a GPU plan
            where = "CPU workers (its cluster says gpu: cpu)" if on_cpu else "GPUs"
            raise UserError(f"resources.use_gpu: {str(config.resources.use_gpu).lower()}, but the plan places the "
                            f"job on {where}")
        pods, per_node, workers = plan_placement(plan)
        gpus_per_pod = 0 if on_cpu else per_node
    else:
        workers = _configured_workers(config)
        pods, gpus_per_pod = workers, 1 if config.resources.use_gpu is True else 0
    cpus = math.ceil(config.resources.cpus_per_worker * math.ceil(workers / pods)) + 1
    return WorkerGroup(
        pods=pods, workers=workers, gpus_per_pod=gpus_per_pod, cpus_per_pod=cpus,
        memory_gi=MEMORY_GI_PER_CPU * cpus + MEMORY_GI_PER_GPU * gpus_per_pod,
    )


def _configured_workers(config: JobConfig) -> int:
    workers = config.resources.workers
    if isinstance(workers, WorkerRange):
        return workers.max
    return workers if isinstance(workers, int) else 1


def plan_placement(plan: Mapping[str, Any]) -> tuple[int, int, int]:
    """(nodes, GPUs per node, workers) of the plan's choice."""
    choice = plan.get("choice")
    if not isinstance(choice, Mapping):
        raise UserError("plan.choice: missing; expected the plan.json that `orchestrator plan` writes")
    nodes = _positive_int(choice, "nodes")
    gpus_per_node = _positive_int(choice, "gpus_per_node")
    if nodes * gpus_per_node > MAX_PLAN_GPUS:
        raise UserError(f"plan.choice: {nodes:,} nodes x {gpus_per_node:,} GPUs is more than the {MAX_PLAN_GPUS:,} "
                        "GPUs the planner plans; expected the plan.json that `orchestrator plan` writes")
    workers = plan.get("workers", choice.get("gpus", nodes * gpus_per_node))
    if not isinstance(workers, int) or isinstance(workers, bool) or not 0 < workers <= nodes * gpus_per_node:
        raise UserError(f"plan.workers: must be between 1 and {nodes * gpus_per_node} "
                        f"(nodes x gpus_per_node), got {shown(workers)}")
    return nodes, gpus_per_node, workers


def _positive_int(section: Mapping[str, Any], key: str) -> int:
    value = section.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"plan.choice.{key}: must be a positive integer, got {shown(value)}")
    if value > MAX_PLAN_GPUS:  # before any product: 10**400 nodes is no placement to multiply out
        raise UserError(f"plan.choice.{key}: must be at most {MAX_PLAN_GPUS:,} (the GPUs the planner plans), "
                        f"got {shown(value)}")
    return value


def predicted_seconds(plan: Mapping[str, Any]) -> float | None:
    """The plan's predicted time to finish, when it has one; beyond MAX_DEADLINE_S, an error."""
    choice = plan.get("choice")
    for where, source in (("plan", plan), ("plan.choice", choice if isinstance(choice, Mapping) else {})):
        value = source.get("time_to_finish_s")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return _within_deadline(value, f"{where}.time_to_finish_s", "s")
    return None


def deadline_seconds(config: JobConfig, plan: Mapping[str, Any] | None) -> int:
    """activeDeadlineSeconds: the predicted (or the config's deadline) time, doubled, plus margin."""
    expected = predicted_seconds(plan) if plan is not None else None
    hours = config.resources.deadline_hours
    if expected is None and hours is not None:
        expected = _within_deadline(hours, "resources.deadline_hours", "h") * 3600
    if expected is None:
        return DEFAULT_DEADLINE_S
    return min(math.ceil(DEADLINE_FACTOR * expected + DEADLINE_MARGIN_S), MAX_ACTIVE_DEADLINE_S)


def _within_deadline(value: float, where: str, unit: str) -> float:
    most = MAX_DEADLINE_S / (3600 if unit == "h" else 1)
    if not value <= most:  # NaN too
        raise UserError(f"{where}: must be at most {most:,.0f} {unit} (a million hours), got {shown(value)}")
    return float(value)
