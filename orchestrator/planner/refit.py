"""Online re-planning: learn from a running worker group's steps, then decide whether to resize."""

from __future__ import annotations

import math
import time
from typing import Any

from orchestrator.errors import UserError
from orchestrator.planner.base import Model, PositiveFloat, check_arguments
from orchestrator.planner.model import PerformanceModel, Rows, effective_network
from orchestrator.planner.network import Network
from orchestrator.planner.results import Placement, Prediction
from orchestrator.planner.search import Goal, choose, plan, predict
from orchestrator.planner.types import Calibration, ClusterSpec, Profile

# Bounds on the one-observation refit's scale of communication time (`refit_network`).
REFIT_SCALE_LIMITS = (1e-6, 1e6)


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def with_network(cluster: ClusterSpec, network: Network, **fields: Any) -> ClusterSpec:
    """`cluster` whose calibration section holds `network` (a new section, source `refit`, when the
    cluster had none); `fields` update the section."""
    figures = {"intra_GBps": network.intra_Bps / 1e9, "inter_GBps": network.inter_Bps / 1e9,
               "base_latency_us": network.base_s * 1e6, "latency_us": network.intra_hop_s * 1e6,
               "inter_latency_us": network.inter_hop_s * 1e6, "overlap": network.overlap}
    if cluster.calibration is None:
        section = Calibration(source="refit", measured_at=now_utc(), **figures, **fields)
    else:
        section = cluster.calibration.replace(**figures, **fields)
    return cluster.replace(calibration=section)


def scale_network(cluster: ClusterSpec, factor: float) -> ClusterSpec:
    """`cluster` with every communication time multiplied by `factor` (bandwidths divided,
    latency and measured all-reduce samples multiplied), so ring and table predictions alike
    scale by exactly that factor at every placement."""
    if not factor > 0:
        raise UserError(f"scale_network.factor: must be > 0, got {factor}")
    scaled = with_network(cluster, effective_network(cluster).scaled(factor),
                          note=f"communication x{factor:.3g} (scale_network)")
    return scaled.replace(allreduce_samples=tuple(s.replace(seconds=s.seconds * factor)
                                                  for s in cluster.allreduce_samples))


class Refit(Model):
    """The cluster's network figures scaled so that `predict` matches an observed step time."""

    where = "refit"
    cluster: ClusterSpec
    scale: PositiveFloat  # communication time, refit / before (1: nothing to learn, e.g. one worker)
    placement: Placement
    observed_step_s: PositiveFloat
    predicted: Prediction  # at the observed placement, before the refit
    comm_s: float  # the all-reduce time (before overlap) that explains the observation

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "placement": str(self.placement), "observed_step_s": self.observed_step_s,
                "predicted_step_s": self.predicted.step_time_s, "predicted_comm_s": self.predicted.comm_s,
                "refit_comm_s": self.comm_s}


def solve_comm_factor(model: PerformanceModel, rows: Rows, observed_s: float, limits: tuple[float, float],
                      compute_s: Any = None) -> float:
    """The factor on the network time at which the model's step equals `observed_s` (bisection in
    log space; the step never shrinks as the network slows), clamped to `limits`."""
    def step(factor: float) -> float:
        return float(model.steps(rows.nodes, rows.gpus_per_node, rows.micro, rows.accum, comm_factor=factor,
                                 compute_s=compute_s).step[0])

    low, high = (math.log(x) for x in limits)
    if step(math.exp(low)) >= observed_s:
        return limits[0]
    if step(math.exp(high)) <= observed_s:
        return limits[1]
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if step(math.exp(mid)) < observed_s else (low, mid)
    return math.exp((low + high) / 2)


def refit_network(profile: Profile, cluster: ClusterSpec, *, placement: Placement, local_batch: int,
                  accumulation: int = 1, observed_step_s: float) -> Refit:
    """Scale the network so that the model reproduces ONE observed step time at `placement`.

    Kept for callers of the first re-planner; it believes a single figure completely (limits
    ``REFIT_SCALE_LIMITS``). `refit` is the robust one: a median of many steps, noise-aware,
    bounded, compute apart from the network and intra-node apart from inter-node.
    """
    check_arguments("refit_network", numbers={"observed_step_s": observed_step_s})
    predicted = predict(profile, cluster, nodes=placement.nodes, gpus_per_node=placement.gpus_per_node,
                        local_batch=local_batch, accumulation=accumulation, reference_batch=profile.max_local_batch)
    if predicted.comm_s == 0:
        return Refit(cluster=cluster, scale=1.0, placement=placement, observed_step_s=observed_step_s,
                     predicted=predicted, comm_s=0.0)
    model = PerformanceModel(profile, cluster)
    rows = Rows.of([(placement.nodes, placement.gpus_per_node, predicted.local_batch, predicted.accumulation)])
    scale = solve_comm_factor(model, rows, observed_step_s, REFIT_SCALE_LIMITS)
    return Refit(cluster=scale_network(cluster, scale), scale=scale, placement=placement,
                 observed_step_s=observed_step_s, predicted=predicted, comm_s=predicted.comm_s * scale)


# ---------------------------------------------------------------------------------------------
# Resize decision


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
                  min_efficiency: float = 0.8, margin: float = 0.1, restart_cost_s: float = 0.0) -> ResizeDecision:
    """Re-plan on a (refit) cluster within [min_workers, max_workers] and decide whether moving
    from the `current` placement pays: the objective must improve by more than `margin`, and the
    time saved over `remaining_samples` (GPU-time for min_cost) must exceed a restart."""
    now = predict(profile, cluster, nodes=current.nodes, gpus_per_node=current.gpus_per_node,
                  local_batch=max(global_batch // current.gpus, 1), reference_batch=global_batch)
    goal = Goal(objective=objective, min_efficiency=min_efficiency, global_batch=global_batch,
                total_samples=None, deadline_s=None, budget=None)
    try:
        table = plan(profile, cluster, objective=objective, min_efficiency=min_efficiency,
                     global_batch=global_batch, max_gpus=max_workers).candidates
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

