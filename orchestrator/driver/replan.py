"""Observed against predicted, online re-planning and the observations a job leaves for
calibration: what the driver asks the planner while a worker group trains (planner calls only;
the controller acts on the result)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator import constants
from orchestrator.driver.policies import Keep, ReplanDecision, Resize, replan_guard
from orchestrator.driver.recorder import Group
from orchestrator.driver.sizing import Sizing
from orchestrator.planner import ClusterSpec, Prediction, decide_resize, predict, refit_network


@dataclass(frozen=True, slots=True)
class Replan:
    """One re-planning: the decision and what it was based on (for the run's records)."""

    decision: ReplanDecision
    cluster: ClusterSpec  # the refit network (the sizing's when nothing was learned)
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


def replan(sizing: Sizing, group: Group, *, cluster: ClusterSpec, step: int, total_steps: int, global_batch: int,
           objective: str, min_efficiency: float, bounds: tuple[int, int] | None, replan_enabled: bool,
           resizes: int, slots: int) -> Replan:
    """Refit the network from the group's observed step time, then decide whether to resize."""
    assert sizing.profile is not None and group.placement is not None and group.observed_step_time_s is not None
    observed = group.observed_step_time_s
    refit = refit_network(sizing.profile, cluster, placement=group.placement, local_batch=group.local_batch,
                          accumulation=group.accumulation, observed_step_s=observed)
    learned = refit.cluster if refit.comm_s > 0 else cluster  # one worker says nothing about the network
    decision = replan_guard(elastic=bounds is not None, replan_enabled=replan_enabled, resizes=resizes,
                            max_resizes=constants.MAX_RESIZES, current=group.workers)
    if decision is None:
        assert bounds is not None
        ceiling = min(bounds[1], max(slots, group.workers))
        resize = decide_resize(
            sizing.profile, learned, current=group.placement, min_workers=bounds[0], max_workers=ceiling,
            global_batch=global_batch, remaining_samples=max(total_steps - step, 0) * global_batch,
            objective=objective, min_efficiency=min_efficiency, margin=constants.REPLAN_MARGIN,
            restart_cost_s=constants.RESIZE_COST_S)
        decision = Resize(resize.workers, resize.reason) if resize.resize else Keep(resize.reason)
        details: dict[str, Any] = resize.to_dict()
    else:
        details = {"reason": decision.reason}
    predicted = refit.predicted.step_time_s
    text = (f"step {step}, {group.workers} workers ({group.placement}): observed {observed * 1e3:.2f} ms/step vs "
            f"predicted {predicted * 1e3:.2f} ms; network refit x{refit.scale:.3g}; {decision.reason}")
    record = {"step": step, "workers": group.workers, "placement": str(group.placement), "observed_step_s": observed,
              "predicted_step_s": predicted, "refit": refit.to_dict(), "decision": details}
    return Replan(decision, learned, record, text)


def observation(sizing: Sizing, group: Group, *, run_id: str | None) -> dict[str, Any] | None:
    """What this group's steps say about the cluster, for `orchestrator calibrate`: the profile,
    the placement and batch split, the median step after warm-up and the compute-only step (its
    forward and backward without gradient sync, plus the profile's optimizer time)."""
    if (sizing.profile is None or group.placement is None or group.observed_step_time_s is None
            or group.observed_steps < constants.REPLAN_MIN_STEPS):
        return None
    compute = None
    if group.compute_step_time_s is not None:
        optimizer = min((s.optimizer_s for s in sizing.profile.samples if s.optimizer_s is not None), default=0.0)
        compute = group.compute_step_time_s + optimizer
    return {"profile": sizing.profile.to_dict(), "nodes": group.placement.nodes,
            "gpus_per_node": group.placement.gpus_per_node, "local_batch": group.local_batch,
            "accumulation": group.accumulation, "step_time_s": group.observed_step_time_s,
            **({"compute_step_time_s": compute} if compute is not None else {}),
            "source": "job", **({"run_id": run_id} if run_id else {})}

