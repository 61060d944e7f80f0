"""Observed against predicted, online re-planning and the observations a job leaves for
calibration: what the driver asks the planner while a worker group trains. `Replanner` keeps the
job's refit model and records; the controller acts on the resize it returns."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator import constants
from orchestrator.driver.policies import Keep, ReplanDecision, Resize, replan_guard, replan_ready
from orchestrator.config import JobConfig
from orchestrator.driver.ports import Identity, Run
from orchestrator.driver.recorder import Group, Recorder
from orchestrator.driver.sizing import Sizing, elastic_bounds, fixed_accumulation
from orchestrator.planner import REFIT_MIN_STEPS
from orchestrator.planner import ClusterSpec, Observation, Prediction, Profile, decide_resize, predict, refit
from orchestrator.planner.explain import plural
from orchestrator.planner.model import optimizer_share


@dataclass(frozen=True, slots=True)
class Replan:
    """One re-planning: the decision and what it was based on (for the run's records)."""

    decision: ReplanDecision
    profile: Profile  # compute as refit (the sizing's when nothing was learned)
    cluster: ClusterSpec  # the network as refit
    record: dict[str, Any]
    text: str


def predicted_at(sizing: Sizing, group: Group, global_batch: int) -> Prediction | None:
    """The prediction at the group's actual placement and batch split."""
    if sizing.profile is None or sizing.cluster is None or group.placement is None:
        return None
    return predict(sizing.profile, sizing.cluster, nodes=group.placement.nodes,
                   gpus_per_node=group.placement.gpus_per_node, local_batch=group.local_batch,
                   accumulation=group.accumulation, reference_batch=global_batch)


def comparison(observed: float, predicted: Prediction) -> dict[str, float]:
    """Observed and predicted step time under one metric prefix, so they share a chart and a scale."""
    metrics = {"plan/observed_step_time_s": observed, "plan/predicted_step_time_s": predicted.step_time_s,
               "plan/observed_over_predicted": observed / predicted.step_time_s}
    for end in ("low", "high"):
        value = getattr(predicted, f"step_time_{end}_s", None)
        if value is not None:
            metrics[f"plan/predicted_step_time_{end}_s"] = value
    return metrics


def compute_steps(profile: Profile, group: Group) -> list[float]:
    """The group's steps without gradient sync as whole-step compute, the planner's `compute_s`.
    The worker times only their forward and backward (an optimizer step there would train on
    the probe), so the profile's optimizer time is added: without it the refit took compute for
    faster than profiled and left the optimizer's time to the network."""
    optimizer = optimizer_share(profile.samples)
    return [t + optimizer for t in group.compute_step_times]


def replan(group: Group, *, profile: Profile, cluster: ClusterSpec, step: int, total_steps: int,
           global_batch: int, objective: str, min_efficiency: float, bounds: tuple[int, int] | None,
           replan_enabled: bool, resizes: int, slots: int, accumulation: int | None = None) -> Replan:
    """Refit compute and the network from the group's step times (the planner's robust `refit`:
    a median after warm-up, differences within the steps' spread ignored, bounded), then decide
    whether to resize (holding a fixed `accumulation`, training.grad_accumulation)."""
    assert group.placement is not None and group.observed_step_time_s is not None
    learned = refit(profile, cluster, placement=group.placement, local_batch=group.local_batch,
                    accumulation=group.accumulation, step_times=group.step_times,
                    compute_step_times=compute_steps(profile, group) or None)
    decision = replan_guard(elastic=bounds is not None, replan_enabled=replan_enabled, resizes=resizes,
                            max_resizes=constants.MAX_RESIZES, current=group.workers)
    if decision is None:
        assert bounds is not None
        ceiling = min(bounds[1], max(slots, group.workers))
        resize = decide_resize(
            learned.profile, learned.cluster, current=group.placement, min_workers=bounds[0], max_workers=ceiling,
            global_batch=global_batch, remaining_samples=max(total_steps - step, 0) * global_batch,
            objective=objective, min_efficiency=min_efficiency, margin=constants.REPLAN_MARGIN,
            restart_cost_s=constants.RESIZE_COST_S, accumulation=accumulation)
        decision = Resize(resize.workers, resize.reason) if resize.resize else Keep(resize.reason)
        details: dict[str, Any] = resize.to_dict()
    else:
        details = {"reason": decision.reason}
    observed, predicted = group.observed_step_time_s, learned.predicted.step_time_s
    text = (f"step {step}, {plural(group.workers, 'worker')} ({group.placement}): observed {observed * 1e3:.2f} "
            f"ms/step vs predicted {predicted * 1e3:.2f} ms; {learned.reason}; {decision.reason}")
    record = {"step": step, "workers": group.workers, "placement": str(group.placement), "observed_step_s": observed,
              "predicted_step_s": predicted, "refit": learned.to_dict(), "decision": details}
    return Replan(decision, learned.profile, learned.cluster, record, text)


def observation(sizing: Sizing, group: Group, *, run_id: str | None) -> dict[str, Any] | None:
    """What this group's steps say about the cluster, for `orchestrator calibrate`: the profile,
    the placement and batch split, the median step after warm-up and the compute-only step (its
    forward and backward without gradient sync, plus the profile's optimizer time)."""
    if (sizing.profile is None or group.placement is None or group.observed_step_time_s is None
            or group.observed_steps < constants.REPLAN_MIN_STEPS):
        return None
    compute = statistics.median(compute_steps(sizing.profile, group)) if group.compute_step_times else None
    return Observation(profile=sizing.profile, nodes=group.placement.nodes, gpus_per_node=group.placement.gpus_per_node,
                       local_batch=group.local_batch, accumulation=group.accumulation,
                       step_time_s=group.observed_step_time_s, compute_step_time_s=compute, source="job",
                       run_id=run_id).to_dict()


class Replanner:
    """A launched job's online model: each group's steps compared with the prediction (plan/
    metrics), the model refit and a resize decided (replan.N tags, replan/decisions.json), and one
    observation per group for `orchestrator calibrate`. The run's records so far are continued, so
    a rerun's artifacts hold the earlier drivers' rows and its own."""

    def __init__(self, job: JobConfig, sizing: Sizing, *, identity: Identity, run_log: Run,
                 slots: Callable[[], int], status: Callable[[str], None]) -> None:
        self.job, self.sizing, self.identity, self.run_log = job, sizing, identity, run_log
        self.slots, self.status = slots, status
        self.profile, self.cluster = sizing.profile, sizing.cluster  # as refit online
        self.replans: list[dict[str, Any]] = []
        self.observations: list[dict[str, Any]] = []
        self._compared_at = -1

    def check(self, rec: Recorder, total_steps: int) -> Resize | None:
        """Compare and, once the group has run enough steps, re-plan: the resize to make, if any."""
        group, sizing = rec.group, self.sizing
        if group is None or group.observed_step_time_s is None or group.observed_steps < constants.REPLAN_MIN_STEPS:
            return None
        predicted = predicted_at(sizing, group, self.job.training.global_batch_size)
        if predicted is None:
            return None
        if rec.last_step >= self._compared_at + constants.REPLAN_MIN_STEPS:
            self._compared_at = rec.last_step
            rec.log_metrics(comparison(group.observed_step_time_s, predicted), step=rec.last_step)
        if not replan_ready(observed_steps=group.observed_steps, min_steps=constants.REPLAN_MIN_STEPS,
                            last_at=group.replanned_at, settled=group.settled):
            return None
        group.replanned_at = group.observed_steps
        r = self.job.resources
        result = replan(group, profile=self.profile, cluster=self.cluster, step=rec.last_step,
                        total_steps=total_steps, global_batch=self.job.training.global_batch_size,
                        objective=r.objective, min_efficiency=r.min_efficiency,
                        bounds=elastic_bounds(self.job, sizing), replan_enabled=r.replan, resizes=rec.resizes,
                        slots=self.slots(), accumulation=fixed_accumulation(self.job))
        self.profile, self.cluster = result.profile, result.cluster
        refit = result.record["refit"]
        # Settled once a refit over enough steps learned nothing new (too few steps: try again later).
        group.settled = not refit.get("changed") and refit.get("steps", 0) >= REFIT_MIN_STEPS
        self.run_log.set_tags({f"replan.{rec.count('replan')}": result.text[:5000]})
        rec.log_metrics({"plan/refit_network_scale": refit["scale"],
                         "plan/refit_compute_scale": refit["compute_scale"]}, step=rec.last_step)
        self.replans.append(result.record)
        self.run_log.log_dict(self._records("replans", result.record), "replan/decisions.json")
        self.status(f"re-plan: {result.text}")
        return result.decision if isinstance(result.decision, Resize) else None

    def note_observation(self, group: Group | None) -> None:
        """The group's observation, once it has one (logged with the run's others as it ends)."""
        if group is None or group.observed:
            return
        found = observation(self.sizing, group, run_id=self.run_log.run_id)
        if found is not None:
            group.observed = True
            self.observations.append(found)
            self._records("observations", found)

    def _records(self, name: str, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The run's rows so far, this driver's `row` added."""
        rows = [*self.identity.state.records.get(name, []), row]
        self.identity.save_records(name, rows)
        return rows
