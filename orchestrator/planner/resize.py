"""Decide whether a running elastic job should resize, on the network and compute its steps showed."""

from __future__ import annotations

from typing import Any

from orchestrator.errors import UserError
from orchestrator.planner.base import Model
from orchestrator.planner.results import Placement, Prediction
from orchestrator.planner.search import Goal, choose, plan, predict
from orchestrator.planner.types import ClusterSpec, Profile
from trainers.batching import split_global_batch


class ResizeDecision(Model):
    """Keep the running worker count or resize to another, and why (one sentence)."""

    where = "resize_decision"
    workers: int  # the count to run from here on (the current one when keeping)
    current: Prediction  # at the running placement, on the refit cluster
    proposed: Prediction  # the refit plan's choice within the allowed range
    gain: float  # relative improvement of the objective, proposed over current
    saved_s: float  # seconds (GPU-seconds for min_cost) saved over the remaining samples, net of the restart
    reason: str

    @property
    def resize(self) -> bool:
        return self.workers != self.current.gpus

    def to_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "resize": self.resize, "current_workers": self.current.gpus,
                "proposed_workers": self.proposed.gpus, "current_step_time_s": self.current.step_time_s,
                "proposed_step_time_s": self.proposed.step_time_s, "gain": self.gain,
                "saved_s": self.saved_s, "reason": self.reason}


def decide_resize(profile: Profile, cluster: ClusterSpec, *, current: Placement, min_workers: int, max_workers: int,
                  global_batch: int, remaining_samples: int, objective: str = "max_throughput",
                  min_efficiency: float = 0.8, margin: float = 0.1, restart_cost_s: float = 0.0,
                  accumulation: int | None = None) -> ResizeDecision:
    """Re-plan on a (refit) cluster within [min_workers, max_workers] and decide whether moving
    from the `current` placement pays: the objective must improve by more than `margin`, and the
    time saved over `remaining_samples` (GPU-time for min_cost) must exceed a restart. A fixed
    `accumulation` (training.grad_accumulation) is held, as the loop trains it."""
    split = split_global_batch(global_batch, workers=current.gpus, accumulation=accumulation)
    now = predict(profile, cluster, nodes=current.nodes, gpus_per_node=current.gpus_per_node,
                  local_batch=split.local_batch, accumulation=split.accumulation, reference_batch=global_batch)
    goal = Goal(objective=objective, min_efficiency=min_efficiency, global_batch=global_batch,
                total_samples=None, deadline_s=None, budget=None)
    try:
        table = plan(profile, cluster, objective=objective, min_efficiency=min_efficiency,
                     global_batch=global_batch, max_gpus=max_workers, accumulation=accumulation).candidates
    except UserError as exc:
        return _keep(now, f"keep {_workers(current.gpus)}: the refit plan has no choice ({exc})")
    allowed = [c for c in table if c.eligible and min_workers <= c.prediction.gpus <= max_workers]
    if not allowed:
        return _keep(now, f"keep {_workers(current.gpus)}: no placement of {min_workers}-{max_workers} "
                          f"workers meets the objective on the refit network")
    new = choose(goal, allowed).prediction
    gain = (goal.scalar(new) - goal.scalar(now)) / abs(goal.scalar(now))
    saved = _remaining_cost(now, remaining_samples, objective) - _remaining_cost(new, remaining_samples, objective)
    saved -= restart_cost_s * (new.gpus if objective == "min_cost" else 1)
    if new.gpus == current.gpus:
        return _keep(now, f"keep {_workers(current.gpus)}: the refit plan chooses the same count", new)
    change = (f"{_workers(new.gpus)} would give {gain:+.0%} {objective} ({new.throughput:,.0f} vs "
              f"{now.throughput:,.0f} samples/s on the refit network)")
    keep = f"keep {_workers(current.gpus)}: {change}"
    if gain <= margin:
        return _keep(now, f"{keep}, within the {margin:.0%} margin", new, gain, saved)
    if saved <= 0:
        return _keep(now, f"{keep}, but over the remaining {remaining_samples:,} samples that does not "
                          f"repay a {restart_cost_s:g} s restart", new, gain, saved)
    unit = "GPU-s" if objective == "min_cost" else "s"
    return ResizeDecision(workers=new.gpus, current=now, proposed=new, gain=gain, saved_s=saved,
                          reason=f"resize {current.gpus} -> {_workers(new.gpus)}: {change}, saving "
                                 f"{saved:,.1f} {unit} net of a {restart_cost_s:g} s restart")


def _keep(now: Prediction, reason: str, proposed: Prediction | None = None, gain: float = 0.0,
          saved: float = 0.0) -> ResizeDecision:
    return ResizeDecision(workers=now.gpus, current=now, proposed=proposed or now, gain=gain, saved_s=saved,
                          reason=reason)


def _workers(n: int) -> str:
    return f"{n} worker{'s' if n != 1 else ''}"


def _remaining_cost(p: Prediction, samples: int, objective: str) -> float:
    """Seconds to train `samples` at this prediction (GPU-seconds for min_cost)."""
    rate = p.goodput if objective == "max_goodput" else p.throughput
    return samples / rate * (p.gpus if objective == "min_cost" else 1)

