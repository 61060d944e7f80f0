"""Predict one placement, or search every uniform placement for an objective."""

from __future__ import annotations

import math
from dataclasses import dataclass
import numpy as np

from orchestrator.errors import UserError, shown
from orchestrator.planner.base import MAX_BATCH, MAX_COUNT, MAX_DEADLINE_S, MAX_INTEGER, check_arguments
from orchestrator.planner.explain import assumptions, below, duration, explanation, past, plural, usd, warnings
from orchestrator.planner.model import PerformanceModel, Rows, evaluate, placement_of, predictions
from orchestrator.planner.results import Candidate, Placement, Plan, Prediction
from orchestrator.planner.types import ClusterSpec, Profile
from trainers.batching import split_global_batch

OBJECTIVES = ("max_throughput", "min_cost", "max_goodput")
# min_cost: candidates within this fraction of the cheapest count as equally cheap, and the
# fastest of them wins (1 GPU at 100 % and 8 GPUs at 99.5 % efficiency cost the same).
COST_TIE_TOLERANCE = 0.01


def placements(cluster: ClusterSpec, *, max_gpus: int | None = None) -> list[Placement]:
    """Every uniform placement of the cluster: nodes 1..N x GPUs per node 1..G."""
    limit = cluster.gpus if max_gpus is None else max_gpus
    return [placement_of(n, g) for n in range(1, cluster.nodes + 1) for g in range(1, cluster.gpus_per_node + 1)
            if n * g <= limit]


def placement_for(cluster: ClusterSpec, workers: int) -> Placement:
    """The uniform placement of `workers` on the fewest nodes of `cluster` (for ``workers: N``)."""
    if workers <= 0 or workers > cluster.gpus:
        raise UserError(f"resources.workers: must be between 1 and the cluster's {plural(cluster.gpus, cluster.unit)}, "
                        f"got {workers}")
    for nodes in range(math.ceil(workers / cluster.gpus_per_node), cluster.nodes + 1):
        if workers % nodes == 0 and workers // nodes <= cluster.gpus_per_node:
            return Placement(nodes, workers // nodes)
    raise UserError(f"resources.workers: {workers} workers cannot be spread evenly over "
                    f"{cluster.nodes} nodes of {plural(cluster.gpus_per_node, cluster.unit)}")


def predict(profile: Profile, cluster: ClusterSpec, *, nodes: int, gpus_per_node: int, local_batch: int,
            accumulation: int = 1, total_samples: int | None = None, reference_batch: int | None = None) -> Prediction:
    """Predict one placement.

    A local batch above the profile's max_local_batch is split into accumulation (the prediction
    says so: fits_memory=False, and its own local_batch and accumulation). reference_batch, B0 of
    the statistical efficiency, defaults to max_local_batch; total_samples gives time and cost.
    """
    check_arguments("predict", integers={"nodes": nodes, "gpus_per_node": gpus_per_node, "local_batch": local_batch,
                                         "accumulation": accumulation, "total_samples": total_samples,
                                         "reference_batch": reference_batch},
                    at_most={"nodes": MAX_COUNT, "gpus_per_node": MAX_COUNT},
                    required=("nodes", "gpus_per_node", "local_batch", "accumulation"))
    if nodes * gpus_per_node * local_batch * accumulation > MAX_INTEGER:  # the global batch, exact in float64
        raise UserError(f"predict.local_batch: the global batch (nodes x gpus_per_node x local_batch x accumulation) "
                        f"must be <= 2**53, got {nodes} x {gpus_per_node} x {local_batch} x {accumulation}")
    profile, cluster = Profile.coerce(profile, "predict.profile"), ClusterSpec.coerce(cluster, "predict.cluster")
    split = split_global_batch(local_batch, workers=1, max_local_batch=profile.max_local_batch)
    rows = Rows.of([(nodes, gpus_per_node, split.local_batch, accumulation * split.accumulation)])
    model = PerformanceModel(profile, cluster)
    columns = evaluate(model, rows, reference_batch=np.array([reference_batch or profile.max_local_batch]),
                       total_samples=total_samples)
    return predictions(columns, rows, [0], fits=[split.accumulation == 1])[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class Goal:
    objective: str
    min_efficiency: float
    global_batch: int | None
    total_samples: int | None
    deadline_s: float | None
    budget: float | None

    def score(self, c: dict[str, np.ndarray], gpus: np.ndarray) -> np.ndarray:
        """Higher is better."""
        if self.objective == "max_throughput":
            return c["throughput"]
        if self.objective == "max_goodput":
            return c["goodput"]
        return -gpus / c["goodput"]  # GPU-seconds per reference sample: cost without a price

    def allowed(self, c: dict[str, np.ndarray]) -> np.ndarray:
        ok = np.ones_like(c["throughput"], dtype=bool)
        if self.objective == "max_throughput":
            ok &= c["efficiency_low"] >= self.min_efficiency  # the interval's pessimistic end
        if self.deadline_s is not None:
            ok &= c["time_to_finish_s"] <= self.deadline_s
        if self.budget is not None:
            ok &= c["cost"] <= self.budget
        return ok

    def reason(self, p: Prediction) -> str | None:
        """Why `p` breaks a constraint, or None (its figure never reads the same as the limit)."""
        if self.objective == "max_throughput" and p.efficiency_low < self.min_efficiency:
            return (f"pessimistic efficiency {below(p.efficiency_low, self.min_efficiency)} < {self.min_efficiency:g} "
                    f"(predicted {p.efficiency:.3f})")
        if self.deadline_s is not None and p.time_to_finish_s > self.deadline_s:
            took = past(p.time_to_finish_s, self.deadline_s, duration)
            return f"finishes in {took} > deadline {duration(self.deadline_s)}"
        if self.budget is not None and p.cost > self.budget:
            return f"costs {past(p.cost, self.budget, usd)} > budget {usd(self.budget)}"
        return None

    def scalar(self, p: Prediction) -> float:
        """`score` of one prediction."""
        if self.objective == "max_throughput":
            return p.throughput
        if self.objective == "max_goodput":
            return p.goodput
        return -p.gpus / p.goodput


def check_goal(goal: Goal, cluster: ClusterSpec, max_gpus: int | None) -> None:
    if goal.objective not in OBJECTIVES:
        raise UserError(f"objective: must be one of {', '.join(OBJECTIVES)}, got {shown(goal.objective)}")
    check_arguments("plan", integers={"global_batch": goal.global_batch, "total_samples": goal.total_samples,
                                      "max_gpus": max_gpus},
                    numbers={"min_efficiency": goal.min_efficiency, "deadline_s": goal.deadline_s,
                             "budget": goal.budget}, at_most={"min_efficiency": 1.0, "deadline_s": MAX_DEADLINE_S},
                    required=("min_efficiency",))
    if (goal.deadline_s is not None or goal.budget is not None) and goal.total_samples is None:
        raise UserError("plan.total_samples: required with a deadline or budget (from epochs or max_steps)")
    if goal.budget is not None and cluster.gpu_hour_cost is None:
        raise UserError("cluster.gpu_hour_cost: required with a budget")


def _rows(model: PerformanceModel, candidates: list[Placement], global_batch: int | None,
          accumulation: int | None = None) -> tuple[Rows, np.ndarray]:
    """Rows to evaluate and the index of each row's placement. With a global batch, the one split
    that keeps it exact (none where it does not divide over the GPUs: rounding would change the
    batch the user tuned); without, each profiled local batch that fits, no accumulation
    (accumulating only to grow the batch buys throughput with statistical efficiency). A fixed
    `accumulation` (training.grad_accumulation) is the split the loop trains: held at every
    placement, which is left out where the GPUs x it do not divide the batch or its local batch is
    past the profile's max_local_batch."""
    nodes = np.array([p.nodes for p in candidates], dtype=float)
    per_node = np.array([p.gpus_per_node for p in candidates], dtype=float)
    if global_batch is None:
        options = np.array(model.batch_options, dtype=float)
        owner = np.repeat(np.arange(len(candidates)), len(options))
        micro, accum = np.tile(options, len(candidates)), np.full(len(owner), float(accumulation or 1))
    else:
        # A fixed accumulation must divide the batch too: 64 over 32 GPUs x 4 trained 1 x 4, global 128.
        owner = np.flatnonzero(global_batch % (nodes * per_node * (accumulation or 1)) == 0)
        splits = [split_global_batch(global_batch, workers=candidates[i].gpus, accumulation=accumulation,
                                     max_local_batch=model.profile.max_local_batch) for i in owner]
        if accumulation is not None:
            fit = [k for k, s in enumerate(splits) if s.local_batch <= model.profile.max_local_batch]
            owner, splits = owner[fit], [splits[k] for k in fit]
        micro = np.array([s.local_batch for s in splits], dtype=float)
        accum = np.array([s.accumulation for s in splits], dtype=float)
    return Rows(nodes[owner], per_node[owner], micro, accum), owner


def _best_rows(goal: Goal, columns: dict[str, np.ndarray], rows: Rows, owner: np.ndarray) -> list[int]:
    """The best row of each placement: allowed first, then the highest score."""
    order = np.lexsort((goal.score(columns, rows.gpus), goal.allowed(columns), owner))
    last = np.r_[owner[order][1:] != owner[order][:-1], True]
    return [int(i) for i in order[last]]


def choose(goal: Goal, eligible: list[Candidate]) -> Candidate:
    # Ties go to fewer GPUs, then fewer nodes: the same result for less hardware.
    def key(c: Candidate) -> tuple[float, int, int]:
        return (goal.scalar(c.prediction), -c.prediction.gpus, -c.prediction.nodes)

    if goal.objective != "min_cost":
        return max(eligible, key=key)
    # Scores are negative GPU-seconds per sample: within the tolerance means >= best * (1 + tol).
    cheapest = max(goal.scalar(c.prediction) for c in eligible)
    near = [c for c in eligible if goal.scalar(c.prediction) >= cheapest * (1 + COST_TIE_TOLERANCE)]
    return max(near, key=lambda c: (c.prediction.goodput, -c.prediction.gpus))


def plan(profile: Profile, cluster: ClusterSpec, *, objective: str = "max_throughput", min_efficiency: float = 0.8,
         global_batch: int | None = None, total_samples: int | None = None, deadline_s: float | None = None,
         budget: float | None = None, max_gpus: int | None = None, accumulation: int | None = None) -> Plan:
    """Choose placement, local batch and accumulation over every uniform placement of `cluster`.

    max_throughput: the most samples/s whose scaling efficiency, at the pessimistic end of its
    interval, is >= min_efficiency (the only objective min_efficiency applies to).
    min_cost: the fewest GPU-hours per sample (USD with a price), fastest among near-ties.
    max_goodput: the most samples/s x statistical efficiency.
    deadline_s and budget (both need total_samples, the samples to train at the reference batch)
    constrain every objective; max_gpus caps the GPU count. With global_batch, every candidate
    keeps it exactly (GPU counts it does not divide are left out); without, each placement tries
    every profiled local batch that fits, without accumulation. `accumulation` (a job's fixed
    training.grad_accumulation) holds that many micro-batches per step at every placement, as the
    loop trains them. The candidate table holds the best split at each placement, with the reason
    it could not be chosen, if any.
    """
    profile, cluster = Profile.coerce(profile, "plan.profile"), ClusterSpec.coerce(cluster, "plan.cluster")
    goal = Goal(objective=objective, min_efficiency=min_efficiency, global_batch=global_batch,
                total_samples=total_samples, deadline_s=deadline_s, budget=budget)
    check_goal(goal, cluster, max_gpus)
    if accumulation is not None and (isinstance(accumulation, bool) or not isinstance(accumulation, int)
                                     or not 1 <= accumulation <= MAX_BATCH):  # past it: no int64 row
        raise UserError(f"plan.accumulation: must be an integer 1 to 2**31 or None, got {shown(accumulation)}")
    model = PerformanceModel(profile, cluster)
    rows, owner = _rows(model, placements(cluster, max_gpus=max_gpus), global_batch, accumulation)
    if not len(owner):
        fixed = (f" into {accumulation} micro-batches of at most max_local_batch {profile.max_local_batch}"
                 if accumulation is not None else "")
        raise UserError(f"plan.global_batch: {global_batch} does not divide over any {cluster.unit} count up to "
                        f"{max_gpus or cluster.gpus}{fixed}")
    columns = evaluate(model, rows, reference_batch=np.array([global_batch or profile.max_local_batch]),
                       total_samples=total_samples)
    best = _best_rows(goal, columns, rows, owner)
    candidates = [Candidate(prediction=p, reason=goal.reason(p))
                  for p in predictions(columns, rows, best)]
    eligible = [c for c in candidates if c.eligible]
    if not eligible:
        raise UserError(_infeasible(goal, candidates, cluster.unit))
    choice = choose(goal, eligible)
    told = warnings(profile, cluster)
    gpu = "cpu" if cluster.is_cpu else cluster.gpu  # also a CPU cluster known by its links: Plan.unit reads it
    return Plan(model=profile.model, device=profile.device, gpu=gpu, objective=objective,
                explanation=explanation(goal, choice, candidates, model, told), warnings=told,
                assumptions=assumptions(goal, model), min_efficiency=min_efficiency, global_batch=global_batch,
                total_samples=total_samples, deadline_s=deadline_s, budget=budget, choice=choice.prediction,
                candidates=tuple(candidates))


def _infeasible(goal: Goal, candidates: list[Candidate], unit: str) -> str:
    """Which constraint leaves no placement, with the nearest miss."""
    predictions = [c.prediction for c in candidates]
    floor = goal.objective == "max_throughput"
    efficient = [p for p in predictions if p.efficiency_low >= goal.min_efficiency] if floor else predictions
    if not efficient:
        best = max(predictions, key=lambda p: p.efficiency_low)
        return (f"min_efficiency: no placement keeps pessimistic efficiency >= {goal.min_efficiency:.3g}; the "
                f"best ({plural(best.gpus, unit)}) has {best.efficiency_low:.3f} (predicted {best.efficiency:.3f})")
    floor_says = f" at pessimistic efficiency >= {goal.min_efficiency:.3g} (min_efficiency)"

    def nearest(key: str, limit: float) -> tuple[Prediction, str]:
        """The best placement by `key`; said with the floor where only the floor keeps it past `limit`."""
        overall = min(predictions, key=lambda p: getattr(p, key) or math.inf)
        if getattr(overall, key) > limit:
            return overall, ""
        return min(efficient, key=lambda p: getattr(p, key) or math.inf), floor_says

    if goal.deadline_s is not None:
        fastest, within = nearest("time_to_finish_s", goal.deadline_s)
        if fastest.time_to_finish_s > goal.deadline_s:
            return (f"deadline: no placement{within} finishes within {duration(goal.deadline_s)}; the fastest "
                    f"({plural(fastest.gpus, unit)}) needs {duration(fastest.time_to_finish_s)}")
    if goal.budget is not None:
        cheapest, within = nearest("cost", goal.budget)
        if cheapest.cost > goal.budget:
            return (f"budget: no placement{within} fits within {usd(goal.budget)}; the cheapest "
                    f"({plural(cheapest.gpus, unit)}) costs {usd(cheapest.cost)}")
    within = floor_says if len(efficient) < len(predictions) else ""
    return f"plan: no placement{within} meets the deadline and the budget together; relax one of them"
