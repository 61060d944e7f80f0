"""What the driver writes about a running job: worker events turned into MLflow records and
console lines. It keeps the counts (worker groups, restarts, resizes) and the current group; it
decides nothing (the controller asks the policies) and talks to MLflow only through the run log,
which never blocks.

Per-step metrics keep the step and time the worker measured them at. Every metric is logged
only at steps beyond the last one logged for its key, so a restart that resumes from an earlier
step (steps redone after a failure) never logs a step twice; the exceptions are the
``restarts`` and ``resizes`` counters, logged at the step resumed from, and system metrics,
sampled by time (several samples may fall on one step).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from orchestrator.driver.policies import GroupKind
from orchestrator.planner import Placement
from trainers.events import (
    CheckpointSaved,
    Evaluated,
    GroupStarted,
    StepsDone,
    SystemSample,
    WorkerFailed,
    WorkerWarning,
)

log = logging.getLogger(__name__)


class RunLog(Protocol):
    """The job's MLflow run as the driver writes it: every call returns at once."""

    resumed: bool | None  # None until the tracking server answers
    resume_floor: int | None  # the last training step a resumed run holds, once resolved

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], *, step: int, at_ms: int | None = None,
                    per_step: bool = False) -> None: ...
    def log_dict(self, data: Any, name: str) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...


@dataclass
class Group:
    """One worker group, from its start event."""

    workers: int
    local_batch: int
    accumulation: int
    kind: GroupKind
    compute_step_times: tuple[float, ...] = ()  # steps without gradient sync, timed at its start
    placement: Placement | None = None  # known once every rank has registered
    replanned_at: int = 0  # its observed steps at its last re-plan
    settled: bool = False  # its last refit learned nothing new: no more re-planning
    observed: bool = False  # its observation for calibration is taken
    observed_step_time_s: float | None = None
    observed_steps: int = 0
    step_times: tuple[float, ...] = ()
    resumed_from: int | None = None
    first_step_ms: int | None = None  # when its first step was measured

    @property
    def shape(self) -> str:
        return (f"{self.workers} worker{'s' if self.workers != 1 else ''} x local batch {self.local_batch} "
                f"x accumulation {self.accumulation}")


class Recorder:
    def __init__(self, run: RunLog, *, status: Callable[[str], None], global_batch: int,
                 counts: Mapping[str, int] | None = None,
                 save_counts: Callable[[dict[str, int]], None] | None = None, log_every: int = 1,
                 step: int = 0) -> None:
        self.run, self._status, self.global_batch = run, status, global_batch
        self.log_every = log_every  # training.log_every: the steps whose training metrics go to MLflow
        # Numbered over the whole run (a rerun continues them): restart.N, resize.N, worker_group.N,
        # metrics.gap.N.
        self.counts: Counter[str] = Counter(counts or {})
        self._save_counts = save_counts or (lambda counts: None)
        self.session: Counter[str] = Counter()  # the same, this driver's share
        self.group: Group | None = None
        self.groups: list[Group] = []
        self.failures: list[WorkerFailed] = []
        self.last_step = step  # where the job stands: its checkpoint's step until a group says where it resumed
        self._cause: str | None = None
        self._failed_at_ms: int | None = None
        self._recovering_since_ms: int | None = None
        self._logged: dict[str, int] = {}
        self._gap_from: int | None = None  # the step resumed from, while the run is not resolved yet
        self.last_metrics: dict[str, float] = {}

    @property
    def groups_started(self) -> int:
        return len(self.groups)

    @property
    def failure_pending(self) -> bool:
        """A worker failure was reported and no group has started since."""
        return self._failed_at_ms is not None or self._cause is not None

    @property
    def restarts(self) -> int:
        return self.counts["restart"]

    @property
    def resizes(self) -> int:
        return self.counts["resize"]

    def count(self, kind: str) -> int:
        self.counts[kind] += 1
        self.session[kind] += 1
        self._save_counts(dict(self.counts))
        return self.counts[kind]

    def status(self, message: str, *, warning: bool = False) -> None:
        # The UI shows every status line: logged at INFO, or the CLI's log handler said a warning twice.
        log.info("%s%s", "warning: " if warning else "", message)
        self._status(message)

    # -- events ------------------------------------------------------------------------------

    def run_known(self) -> None:
        """At every poll: a gap that waited for MLflow to answer is said once it has."""
        if self._gap_from is not None and self.run.resumed is not None:
            self._gap_before(self._gap_from)

    def steps(self, event: StepsDone) -> None:
        for point in event.points:  # steps redone after a failure keep their first record
            if point.step % self.log_every == 0:
                self._log_once(point.metrics, step=point.step, at_ms=point.at_ms, per_step=True)
        self.last_step = max(self.last_step, event.step)
        self.last_metrics = dict(event.points[-1].metrics) if event.points else self.last_metrics
        if self.group is not None:
            if self.group.first_step_ms is None and event.points:
                self.group.first_step_ms = event.points[0].at_ms
            self.group.observed_step_time_s = event.observed_step_time_s
            self.group.observed_steps = event.observed_steps
            self.group.step_times += event.step_times_s
        if self._recovering_since_ms is not None and event.points:
            seconds = (event.points[0].at_ms - self._recovering_since_ms) / 1000
            self._recovering_since_ms = None
            self.log_metrics({"recovery_s": seconds}, step=event.points[0].step)
            self.status(f"training again {seconds:.1f} s after the failure was reported")

    def fit_ended(self, metrics: Mapping[str, Any]) -> int:
        """The step the fit's own final report reached (Ray Train's last metrics): past `last_step`
        where the last drains went unanswered. Only this raises it beyond what was drained: a group
        that resumed from an older checkpoint moved it back on purpose (`group_started`)."""
        reached = int(metrics.get("step", 0))
        self.last_step = max(self.last_step, reached)
        return reached

    def evaluated(self, event: Evaluated) -> None:
        self._log_once(event.metrics, step=event.step, at_ms=event.at_ms, per_step=True)
        self.last_metrics.update(event.metrics)

    def _log_once(self, metrics: Mapping[str, float], *, step: int, at_ms: int | None = None,
                  per_step: bool = False) -> None:
        """Each metric only at a step beyond the last one logged for it."""
        fresh = {k: v for k, v in metrics.items() if step > self._logged.get(k, -1)}
        if fresh:
            self.run.log_metrics(fresh, step=step, at_ms=at_ms, per_step=per_step)
            self._logged.update(dict.fromkeys(fresh, step))

    def checkpoint(self, event: CheckpointSaved) -> None:
        self._log_once({"train/checkpoint_s": event.seconds}, step=event.step, at_ms=event.at_ms, per_step=True)

    def system(self, event: SystemSample) -> None:
        # MLflow's own system metrics of a node are named system/<node id>/<metric>.
        self.run.log_metrics({f"system/{event.node}/{k}": v for k, v in event.metrics.items()}, step=event.step,
                             at_ms=event.at_ms)

    def warning(self, event: WorkerWarning) -> None:
        self.status(f"rank 0 at step {event.step}: {event.message}", warning=True)

    def failed(self, event: WorkerFailed) -> None:
        self.failures.append(event)
        self._cause, self._failed_at_ms = event.cause, event.at_ms
        when = f"after step {event.step}" if self.groups else "before its first step"  # no group of this run trained
        self.status(f"worker failure {when}: {event.cause}", warning=True)

    def group_started(self, event: GroupStarted, kind: GroupKind, *, resize_reason: str | None = None) -> Group:
        group = Group(event.workers, event.local_batch, event.accumulation, kind, event.compute_step_times_s,
                      resumed_from=event.resumed_from)
        self.groups.append(group)
        # Where the job is now, whether or not it trains on; a restart from an older checkpoint is back
        # there (what the failed group trained past it is lost), as in the progress actor.
        self.last_step = event.step
        where = (f"resumed from step {event.resumed_from}" if event.resumed_from is not None
                 else "from step 0 (no checkpoint yet)")
        if kind is GroupKind.RESIZE:
            self._record("resize", event.step, f"{resize_reason}; {where} on {group.shape}")
        elif kind is GroupKind.RESTART:
            cause = self._cause or "the worker group stopped (no cause reported)"
            self._record("restart", event.step, f"{cause}; {where} on {group.shape}")
            self._recovering_since_ms = self._failed_at_ms
            if len(self.groups) == 1 and event.resumed_from is not None:  # a rerun's first group: its gap too
                self._gap_before(event.resumed_from)
        elif event.resumed_from is not None and not self._gap_before(event.resumed_from):
            self.status(f"resumed from step {event.resumed_from}, the newest checkpoint")  # else a rerun looked fresh
        self._cause = self._failed_at_ms = None
        self.run.set_tags({f"worker_group.{self.count('worker_group')}": f"{group.shape}, {where}"})
        self.log_metrics({"elastic/workers": group.workers, "elastic/local_batch": group.local_batch,
                          "elastic/accumulation": group.accumulation}, step=event.step)
        effective = group.workers * group.local_batch * group.accumulation
        if effective != self.global_batch:
            self.status(f"global batch {effective} on {group.workers} workers (configured {self.global_batch} "
                        "does not divide evenly)", warning=True)
        for skipped in event.skipped:
            self.status(f"checkpoint failed verification and was passed over: {skipped}; {where}", warning=True)
            self.run.set_tags({"checkpoint.fallback": f"{skipped}; {where}"})
        self.group = group
        return group

    def _gap_before(self, resumed_from: int) -> bool:
        """A run resumed from a checkpoint past its last logged step: an earlier driver stopped (a
        kill, a second Ctrl-C) while its workers trained on, so those steps' metrics never reached
        MLflow. Said on the console and as a tag, not left for the charts to hide; True if said.
        One tag per gap, numbered over the run like restart.N: a later outage keeps the earlier ones."""
        # Resumed while MLflow was down: the run (and what it holds) is known once it answers.
        self._gap_from = resumed_from if self.run.resumed is None else None
        if self._gap_from is not None:
            return False
        # No floor: the run holds no training step (created by this rerun: MLflow never saw the
        # earlier driver's records, which died with it or wait in a spill file elsewhere).
        floor = self.run.resume_floor or 0
        # Only every log_every-th step is logged: steps past the last such one were never to be.
        if floor >= resumed_from - resumed_from % self.log_every:
            return False
        text = (f"steps {floor + 1}-{resumed_from} were trained by an earlier driver that stopped before "
                "sending their metrics; this run has none for them")
        self.run.set_tags({f"metrics.gap.{self.count('metrics_gap')}": text})
        self.status(f"resumed from step {resumed_from}: {text}", warning=True)
        return True

    def _record(self, kind: str, step: int, text: str) -> None:
        n = self.count(kind)
        self.run.set_tags({f"{kind}.{n}": text})
        # A counter, at the step resumed from: two restarts from one checkpoint share that step.
        self.run.log_metrics({f"{kind}s": n}, step=step)
        self.status(f"{kind} {n}: {text}", warning=kind == "restart")

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        """Driver-side metrics, each only at a step beyond the last one logged for it here."""
        self._log_once(metrics, step=step)

    def locate(self, workers: Mapping[int, Mapping[str, Any]]) -> None:
        """The group's placement, once every rank has said which node it runs on."""
        group = self.group
        if group is None or group.placement is not None or len(workers) < group.workers:
            return
        nodes = len({w["node_id"] for rank, w in workers.items() if rank < group.workers})
        # The model knows uniform placements; an uneven spread is taken as all inter-node.
        group.placement = (Placement(nodes, group.workers // nodes) if group.workers % nodes == 0
                           else Placement(group.workers, 1))
