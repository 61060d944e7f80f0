"""The driver's view of a running job, recorded in its MLflow run.

Rank 0 pushes events to the progress actor, every rank registers its process and node, and the
Ray Train controller forwards worker failures to it (`FailureForwarder`); the driver polls it and
hands each snapshot to a `JobMonitor`, which

- counts worker groups: one that starts after the first is a restart, with the cause forwarded
  before it (or a resize the driver asked for) and the step it resumed from: the ``restarts`` /
  ``resizes`` metrics and a ``restart.<n>`` / ``resize.<n>`` tag each;
- logs each group's worker count, local batch and accumulation (``elastic/*``), and reports a
  checkpoint that failed verification and was passed over;
- compares the observed step time with the prediction at the actual placement (``plan/*``), refits
  the network term from it and, for an elastic job, decides whether to resize (``replan.<n>`` tags
  and ``replan/decisions.json``). The monitor decides; `launcher.run_job` acts.

Driver-side metrics are logged only at steps beyond the last one logged for their key, so a
restart that resumes from an earlier step never logs a step twice; the exceptions are the
``restarts`` and ``resizes`` counters, logged at the step resumed from (two restarts from one
checkpoint give two points at its step, the count going up).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray.train

from orchestrator import constants
from orchestrator.config import WorkerRange
from orchestrator.planner import ClusterSpec, Placement, Refit, ResizeDecision, decide_resize, predict, refit_network

log = logging.getLogger(__name__)

StatusCallback = Callable[[str], None]
# The actor the loop, the controller callback and the driver share, by run: tools find it by name.
PROGRESS_NAMESPACE = "orchestrator"


def progress_actor_name(run_id: str) -> str:
    return f"progress-{run_id}"


class FailureForwarder(ray.train.UserCallback):
    """Runs in the Ray Train controller when a worker group fails, before the controller restarts
    it: tells the driver why (the restarted rank 0 only knows where it resumed from), and has the
    autoscaling coordinator look at the nodes now, so an elastic restart after a lost node sizes on
    the nodes that are left."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        from orchestrator.autoscale import refresh_cluster_view

        causes = [f"rank {rank}: {describe_error(exc)}" for rank, exc in sorted(worker_exceptions.items())]
        self.progress.record_failure.remote("; ".join(causes))
        try:
            refresh_cluster_view()
        except Exception:  # an optimisation: the coordinator's next tick does it anyway
            log.warning("could not refresh the autoscaling coordinator's view of the cluster", exc_info=True)


def describe_error(exc: BaseException) -> str:
    """The exception's type and first line, short enough for an MLflow tag."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}"[:300]


@dataclass
class Group:
    """One worker group, from its start event."""

    workers: int
    local_batch: int
    accumulation: int
    start_step: int
    placement: Placement | None = None  # known once every rank has registered
    replanned: bool = False


class JobMonitor:
    def __init__(self, launch: Any, *, on_status: StatusCallback | None = None) -> None:
        self.launch, self.run, self.job = launch, launch.run, launch.job
        self._on_status = on_status
        self._seen = 0
        self._cause: str | None = None
        self._resize_pending: str | None = None  # reason of a resize the driver asked for
        self._logged: dict[str, int] = {}
        tags = self.run.client.get_run(self.run.run_id).data.tags
        self._counts = Counter(k.split(".")[0] for k in tags if k.split(".")[0] in ("restart", "resize", "replan",
                                                                                     "worker_group"))
        self.group: Group | None = None
        self.groups_started = 0
        self.refit: Refit | None = None
        self.decisions: list[dict[str, Any]] = []
        self.resize_to: int | None = None  # set when a resize is decided, until the driver acts
        self._resize_reason = ""
        self._failed_at: float | None = None
        self._seen_index = 0
        self._recovering: tuple[int, float] | None = None  # (start event's index, failure time)

    @property
    def restarts(self) -> int:
        return self._counts["restart"]

    @property
    def resizes(self) -> int:
        return self._counts["resize"]

    # -- polling ---------------------------------------------------------------------------

    def observe(self, step: int, info: dict[str, Any], events: list, workers: dict[int, dict[str, Any]]) -> None:
        for index in range(self._seen, len(events)):
            self._seen_index = index
            self._event(*events[index])
        self._seen = len(events)
        self._recovered(events)
        self._locate(workers)
        self._compare(step, info)

    def resize_started(self, step: int) -> None:
        """The driver stopped the fit at `step` for a resize; the next group start is that resize."""
        self._resize_pending = f"{self._resize_reason} (stopped at step {step})"
        self.resize_to = None

    def status(self, message: str, *, warning: bool = False) -> None:
        (log.warning if warning else log.info)("%s", message)
        if self._on_status is not None:
            self._on_status(message)

    # -- events ----------------------------------------------------------------------------

    def _recovered(self, events: list) -> None:
        """Once a restarted group reports its first step: seconds since the failure was reported."""
        if self._recovering is None:
            return
        index, failed_at = self._recovering
        step, start = events[index]
        if "first_step_at" in start:
            self._recovering = None
            seconds = start["first_step_at"] - failed_at
            self.log_metrics({"recovery_s": seconds}, step=step)
            self.status(f"training again {seconds:.1f} s after the failure was reported")

    def _event(self, step: int, event: dict[str, Any]) -> None:
        if event.get("event") == "failure":
            self._cause, self._failed_at = event["cause"], event.get("at")
            self.status(f"worker failure at step {step}: {event['cause']}", warning=True)
        elif "workers" in event:
            self._group_started(step, event)

    def _group_started(self, step: int, event: dict[str, Any]) -> None:
        self.groups_started += 1
        group = Group(event["workers"], event["local_batch"], event["accumulation"], step)
        resumed = event.get("resumed_from")
        where = f"resumed from step {resumed}" if resumed is not None else "from step 0 (no checkpoint yet)"
        shape = (f"{group.workers} worker{'s' if group.workers != 1 else ''} x local batch {group.local_batch} "
                 f"x accumulation {group.accumulation}")
        if self._resize_pending is not None:
            self._record("resize", step, f"{self._resize_pending}; {where} on {shape}")
            self._resize_pending = None
        elif self.groups_started > 1:
            cause = self._cause or "the worker group stopped (no cause reported)"
            self._record("restart", step, f"{cause}; {where} on {shape}")
            if self._failed_at is not None:
                self._recovering = (self._seen_index, self._failed_at)
        self._cause, self._failed_at = None, None
        self._counts["worker_group"] += 1
        self.run.set_tags({f"worker_group.{self._counts['worker_group']}": f"{shape}, {where}"})
        self.log_metrics({"elastic/workers": group.workers, "elastic/local_batch": group.local_batch,
                          "elastic/accumulation": group.accumulation}, step=step)
        effective = group.workers * group.local_batch * group.accumulation
        if effective != self.job.training.global_batch_size:
            self.status(f"global batch {effective} on {group.workers} workers (configured "
                        f"{self.job.training.global_batch_size} does not divide evenly)", warning=True)
        for skipped in event.get("skipped") or []:
            self.status(f"checkpoint failed verification and was passed over: {skipped}; {where}", warning=True)
            self.run.set_tags({"checkpoint.fallback": f"{skipped}; {where}"})
        self.group = group

    def _record(self, kind: str, step: int, text: str) -> None:
        self._counts[kind] += 1
        n = self._counts[kind]
        self.run.set_tags({f"{kind}.{n}": text})
        # A counter, at the step resumed from: two restarts from one checkpoint share that step.
        self.run.log_metrics({f"{kind}s": n}, step=step)
        self.status(f"{kind} {n}: {text}", warning=kind == "restart")

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        """Log driver-side metrics, each only at a step beyond the last one logged for it."""
        fresh = {k: v for k, v in metrics.items() if step > self._last_logged(k)}
        if fresh:
            self.run.log_metrics(fresh, step=step)
            self._logged.update(dict.fromkeys(fresh, step))

    def _last_logged(self, key: str) -> int:
        if key not in self._logged:
            last = self.run.last_step(key)  # a rerun continues the run's history
            self._logged[key] = -1 if last is None else last
        return self._logged[key]

    # -- observed vs predicted, refit, resize ----------------------------------------------

    def _locate(self, workers: dict[int, dict[str, Any]]) -> None:
        group = self.group
        if group is None or group.placement is not None or len(workers) < group.workers:
            return
        nodes = len({w["node_id"] for rank, w in workers.items() if rank < group.workers})
        # The model knows uniform placements; an uneven spread is taken as all inter-node.
        group.placement = (Placement(nodes, group.workers // nodes) if group.workers % nodes == 0
                           else Placement(group.workers, 1))

    def _compare(self, step: int, info: dict[str, Any]) -> None:
        sizing, group = self.launch.sizing, self.group
        observed = info.get("observed_step_time_s")
        if (observed is None or group is None or group.placement is None or sizing.profile is None
                or sizing.cluster is None or info.get("observed_steps", 0) < constants.REPLAN_MIN_STEPS):
            return
        global_batch = self.job.training.global_batch_size
        predicted = predict(sizing.profile, sizing.cluster, nodes=group.placement.nodes,
                            gpus_per_node=group.placement.gpus_per_node,
                            local_batch=max(global_batch // group.workers, 1), reference_batch=global_batch)
        if step >= self._last_logged("plan/observed_step_time_s") + constants.REPLAN_MIN_STEPS:
            self.log_metrics({"plan/observed_step_time_s": observed, "plan/predicted_step_time_s": predicted.step_time_s,
                              "plan/observed_over_predicted": observed / predicted.step_time_s}, step=step)
        if not group.replanned:
            group.replanned = True
            self._replan(step, observed, predicted.step_time_s)

    def _replan(self, step: int, observed: float, predicted: float) -> None:
        sizing, group = self.launch.sizing, self.group
        assert group is not None and group.placement is not None and sizing.profile is not None
        refit = refit_network(sizing.profile, sizing.cluster, placement=group.placement,
                              local_batch=group.local_batch, accumulation=group.accumulation,
                              observed_step_s=observed)
        if refit.comm_s > 0:  # one worker says nothing about the network: keep the last refit
            self.refit = refit
        cluster = self.refit.cluster if self.refit else sizing.cluster
        decision = self._decide(step, cluster, group.placement)
        reason = decision if isinstance(decision, str) else decision.reason
        scale = self.refit.scale if self.refit else 1.0
        text = (f"step {step}, {group.workers} workers ({group.placement}): observed {observed * 1e3:.2f} ms/step "
                f"vs predicted {predicted * 1e3:.2f} ms; network refit x{scale:.3g}; {reason}")
        self._counts["replan"] += 1
        self.run.set_tags({f"replan.{self._counts['replan']}": text[:5000]})
        self.log_metrics({"plan/refit_network_scale": scale}, step=step)
        self.decisions.append({"step": step, "workers": group.workers, "placement": str(group.placement),
                               "observed_step_s": observed, "predicted_step_s": predicted,
                               "refit": refit.to_dict(),
                               "decision": {"reason": reason} if isinstance(decision, str) else decision.to_dict()})
        self.run.log_dict(self.decisions, "replan/decisions.json")
        self.status(f"re-plan: {text}")
        if isinstance(decision, ResizeDecision) and decision.resize:
            self.resize_to, self._resize_reason = decision.workers, decision.reason

    def _decide(self, step: int, cluster: ClusterSpec, current: Placement) -> ResizeDecision | str:
        bounds = self.bounds
        r = self.job.resources
        keep = f"keep {current.gpus} worker{'s' if current.gpus != 1 else ''}"
        if bounds is None:
            return f"{keep}: the worker count is fixed"
        if not r.replan:
            return f"{keep}: resources.replan is off"
        if self.resizes >= constants.MAX_RESIZES:
            return f"{keep}: already resized {self.resizes} times (ORCH_MAX_RESIZES)"
        from orchestrator.autoscale import slots_available

        ceiling = min(bounds[1], max(slots_available(use_gpu=self.launch.use_gpu, cpus_per_worker=r.cpus_per_worker),
                                     current.gpus))
        global_batch = self.job.training.global_batch_size
        return decide_resize(
            self.launch.sizing.profile, cluster, current=current, min_workers=bounds[0], max_workers=ceiling,
            global_batch=global_batch, remaining_samples=max(self.launch.total_steps - step, 0) * global_batch,
            objective=r.objective, min_efficiency=r.min_efficiency, margin=constants.REPLAN_MARGIN,
            restart_cost_s=constants.RESIZE_COST_S,
        )

    @property
    def bounds(self) -> tuple[int, int] | None:
        """The worker range the job may run in: the configured one, else the elastic launch's."""
        workers, configured = self.launch.workers, self.job.resources.workers
        if isinstance(workers, int):
            return None  # fixed, or --workers N on the command line
        return (configured.min, configured.max) if isinstance(configured, WorkerRange) else workers

    def workers_after_resize(self) -> tuple[int, int]:
        assert self.resize_to is not None and self.bounds is not None
        return self.bounds[0], self.resize_to
