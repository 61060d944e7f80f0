"""Calibration: fit a cluster's network to what the cluster was measured doing.

From step times of real jobs (`calibrate`, any number of models and placements) or from
all-reduce timings (`calibrate_allreduce`, what `orchestrator probe-network` measures), fit the
few physical parameters of network.py: the achieved intra-node bus bandwidth, the inter-node
bandwidth, a common scale of the latencies, the overlap with backward, and the ranks' step-time
jitter (the wait for the slowest rank, network.py: stragglers). The loss is robust
(fit.py: Huber on log(predicted / observed)). A parameter the observations cannot identify (no
multi-node step: the inter-node bandwidth) keeps its prior and is reported as not fitted; a fit
that does not beat the given figures on the same observations (loss; mean, median and 90th
percentile error) is not returned (`_better`: part of the way to it, else the input's figures, and the
section says so). The residuals give the prediction interval: when the
observations cover two models or more, each model is predicted by a fit made without it, so the
interval says how well the calibration carries to a model it has not seen.
"""

from __future__ import annotations

import math
import time
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from orchestrator.errors import UserError, shown
from orchestrator.planner.base import MAX_RESIDUAL, as_list, utc_time
from orchestrator.planner.fit import LOG_RANGE, Space, data_loss, minimize, polish, sensitive
from orchestrator.planner.model import PerformanceModel, effective_network
from orchestrator.planner.network import (
    Buckets,
    Network,
    expected_max_normal,
    exposed_s,
    ring_latency,
    ring_links,
    ring_volume,
)
from orchestrator.planner.types import AllReduceSample, Calibration, ClusterSpec, Observation, Residuals
from trainers.batching import split_global_batch

PARAMETERS = ("intra_GBps", "inter_GBps", "latency", "overlap", "jitter")
# The priors' widths (one standard deviation; log factors for bandwidths and latency): achieved
# bandwidth may lie an order of magnitude below the priors (the 5-15x measured on PCIe/Ethernet
# clusters); NCCL's hop latencies hold within a few times on a healthy fabric; the overlap is
# anyone's guess between none and full; a rank's step-time jitter (CV) starts at none and a few
# per cent is common, half the step is the most it may take. Judgements, docs/planner.md.
BANDWIDTH_SIGMA, LATENCY_SIGMA, OVERLAP_SIGMA = math.log(10), math.log(3), 0.5
JITTER_MAX, JITTER_SIGMA = 0.5, 0.1
SPACES = [Space(-LOG_RANGE, LOG_RANGE, math.log(100), BANDWIDTH_SIGMA)] * 2 + [
    Space(-LOG_RANGE, LOG_RANGE, math.log(100), LATENCY_SIGMA), Space(0.0, 1.0, 0.5, OVERLAP_SIGMA),
    Space(0.0, JITTER_MAX, JITTER_MAX / 2, JITTER_SIGMA)]
MOVES = [(-LOG_RANGE, LOG_RANGE)] * 3 + [(0.0, 1.0), (0.0, JITTER_MAX)]
# A parameter is fitted only when moving it to either end of its range (x/1000; overlap 0 or 1)
# moves the prediction of at least MIN_SENSITIVE observations by SENSITIVITY or more: otherwise
# no value it could take shows in these observations.
SENSITIVITY = 0.02
MIN_SENSITIVE = 1
SLOWER = [0.0, math.log(10), math.log(100), math.log(1000)]  # bandwidth factors at which to look
CV_FOLDS = 5  # cross-model residuals: each group of models predicted by a fit without it
# A fit's search sees at most this many rows (evenly strided); the main fit is then polished on
# all of them, the cross-model fits are not (residuals need the held-out models' errors, not the
# last digit of each fold's fit). Keeps 10,000 observations within seconds.
FIT_MAX_ROWS = 2000
# "No worse" allows this much relative error either way: rounding, not a loss of accuracy.
NO_WORSE_TOLERANCE = 1e-9
# A fit that lowers the loss but raises the mean, median or 90th percentile error on its own observations
# (a few outliers moved it) is taken part of the way from the given figures, the largest share no
# worse on all three; none: the given figures are kept.
SHRINK_TOWARDS_GIVEN = (1.0, 0.75, 0.5, 0.25)


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _scaled(start: Network, theta: np.ndarray) -> Network:
    """The network at parameters theta (rows: candidates; log factors on bandwidths and latency,
    then the overlap), as columns that broadcast against the observations."""
    t = np.atleast_2d(theta)
    latency = np.exp(t[:, 2:3])
    return Network(intra_Bps=start.intra_Bps * np.exp(t[:, 0:1]), inter_Bps=start.inter_Bps * np.exp(t[:, 1:2]),
                   base_s=start.base_s * latency, intra_hop_s=start.intra_hop_s * latency,
                   inter_hop_s=start.inter_hop_s * latency, overlap=t[:, 3:4], jitter=t[:, 4:5])


@dataclass(frozen=True, slots=True)
class Problem:
    """Observations as arrays: all-reduce times (`steps` False) or step times (`steps` True)."""

    nodes: np.ndarray
    gpus_per_node: np.ndarray
    size: np.ndarray  # bytes per all-reduce (per full DDP bucket for steps)
    observed: np.ndarray
    models: np.ndarray  # model name per row ("" for all-reduce samples)
    steps: bool
    buckets: np.ndarray | None = None  # DDP buckets per step
    last_size: np.ndarray | None = None  # the last bucket's bytes
    compute: np.ndarray | None = None
    backward: np.ndarray | None = None
    data: np.ndarray | None = None
    table: np.ndarray | None = None  # measured all-reduce of a full bucket, NaN where the formula applies
    last_table: np.ndarray | None = None  # the same for the last bucket

    def predictor(self, start: Network) -> Any:
        # the parts that do not move with the parameters, once: ring volume per crossed link
        # (network.ring_bus: the slowest crossed link sets the pace) and latency at the start
        crosses_intra, crosses_inter = ring_links(self.nodes, self.gpus_per_node)
        latency = ring_latency(self.nodes, self.gpus_per_node, start)
        slowest = expected_max_normal(self.nodes * self.gpus_per_node)  # of P ranks, in standard deviations

        def one(size: np.ndarray, table: np.ndarray | None) -> Any:
            volume = ring_volume(size, self.nodes, self.gpus_per_node)
            intra_volume, inter_volume = volume * crosses_intra, volume * crosses_inter

            def seconds(t: np.ndarray) -> np.ndarray:
                per = np.maximum(intra_volume * (np.exp(-t[:, 0:1]) / start.intra_Bps),
                                 inter_volume * (np.exp(-t[:, 1:2]) / start.inter_Bps)) + latency * np.exp(t[:, 2:3])
                return per if table is None else np.where(np.isnan(table), per, table)
            return seconds

        if not self.steps:
            return lambda theta: one(self.size, None)(np.atleast_2d(theta))
        full, last = one(self.size, self.table), one(self.last_size, self.last_table)
        buckets = Buckets(count=self.buckets, full_bytes=self.size, last_bytes=self.last_size)

        def predict(theta: np.ndarray) -> np.ndarray:
            t = np.atleast_2d(theta)
            compute = self.compute * (1.0 + t[:, 4:5] * slowest)  # network.straggler_factor, precomputed
            return np.maximum(compute + exposed_s(full(t), last(t), buckets, self.backward, t[:, 3:4]), self.data)
        return predict

    def subset(self, mask: np.ndarray) -> Problem:
        return replace(self, **{f: getattr(self, f)[mask] for f in self.__dataclass_fields__
                                if isinstance(getattr(self, f), np.ndarray)})

    def __len__(self) -> int:
        return len(self.observed)


def _profile_key(o: Observation) -> tuple[Any, ...]:
    p = o.profile
    return (p.model, p.device, p.grad_bytes, p.max_local_batch, p.data_samples_per_s,
            tuple((s.local_batch, s.step_time_s, s.optimizer_s, s.fwd_bwd_s) for s in p.samples),
            tuple((s.gpus_per_node, s.local_batch, s.step_time_s) for s in p.node_samples))


def step_problem(cluster: ClusterSpec, observations: Sequence[Observation], *, as_predicted: bool = False) -> Problem:
    """The multi-GPU observations (one GPU has no all-reduce to learn from) as arrays.
    `as_predicted`: every observation, as `predict` sees it (the profile's compute, not the one
    measured without sync): what a calibration is judged by, since that is how it will be used."""
    groups: dict[tuple[Any, ...], list[Observation]] = {}
    for o in observations:
        if as_predicted or (o.nodes * o.gpus_per_node > 1 and o.profile.grad_bytes):
            groups.setdefault(_profile_key(o), []).append(o)
    parts = [_group_arrays(cluster, members, as_predicted) for members in groups.values()]
    fields = ("nodes", "gpus_per_node", "size", "observed", "models", "buckets", "last_size", "compute", "backward",
              "data", "table", "last_table")
    if not parts:
        return Problem(**{f: np.array([]) for f in fields}, steps=True)
    return Problem(**{f: np.concatenate([p[f] for p in parts]) for f in fields}, steps=True)


def _group_arrays(cluster: ClusterSpec, members: list[Observation], as_predicted: bool) -> dict[str, np.ndarray]:
    model = PerformanceModel(members[0].profile, cluster)
    splits = [split_global_batch(o.local_batch, workers=1, max_local_batch=model.profile.max_local_batch)
              for o in members]
    nodes = np.array([o.nodes for o in members], dtype=float)
    per_node = np.array([o.gpus_per_node for o in members], dtype=float)
    micro = np.array([s.local_batch for s in splits], dtype=float)
    accum = np.array([o.accumulation * s.accumulation for o, s in zip(members, splits)], dtype=float)
    measured = np.array([np.nan if o.compute_step_time_s is None or as_predicted else o.compute_step_time_s
                         for o in members])
    compute, backward, data = model.compute_terms(per_node, micro, accum, measured)
    n = len(members)
    full, last = float(model.buckets.full_bytes), float(model.buckets.last_bytes)
    tables = [model.table_per_bucket(nodes, per_node, size) for size in (full, last)]
    if not model.profile.grad_bytes:  # nothing to all-reduce: no latency either (PerformanceModel.per_bucket)
        tables = [np.zeros(n), np.zeros(n)]
    return {"nodes": nodes, "gpus_per_node": per_node, "size": np.full(n, full), "last_size": np.full(n, last),
            "observed": np.array([o.step_time_s for o in members]), "models": np.array([model.profile.model] * n),
            "buckets": np.full(n, float(model.buckets.count)), "compute": compute, "backward": backward, "data": data,
            "table": tables[0], "last_table": tables[1]}


def allreduce_problem(samples: Iterable[AllReduceSample]) -> Problem:
    rows = [s for s in samples if s.nodes * s.gpus_per_node > 1]
    return Problem(nodes=np.array([s.nodes for s in rows], dtype=float),
                   gpus_per_node=np.array([s.gpus_per_node for s in rows], dtype=float),
                   size=np.array([s.bytes for s in rows], dtype=float),
                   observed=np.array([s.seconds for s in rows]), models=np.array([""] * len(rows)), steps=False)


# ---------------------------------------------------------------------------------------------
# The fit


def _identifiable(problem: Problem, predict: Any, start: np.ndarray, allowed: Sequence[int],
                  unit: str = "GPU") -> tuple[list[int], dict[str, str]]:
    """The parameters these observations can tell (module doc), and why the others cannot.

    Each network level is told only by observations that exercise it (the intra-node links by
    steps inside one node, the NIC by steps across nodes); a parameter must also show: moved to
    either end of its range, it must change at least MIN_SENSITIVE predictions by SENSITIVITY,
    at the priors or with the network slower (overlap only shows where communication is as
    long as backward). How far a weakly told parameter moves is the prior's business (fit.py)."""
    level = {0: (problem.nodes == 1) & (problem.gpus_per_node > 1), 1: problem.nodes > 1}
    free, why = [], {}
    for i, name in enumerate(PARAMETERS):
        if i not in allowed:
            why[name] = ("all-reduce timings alone say nothing about the overlap with backward or about "
                         "stragglers")
        elif not level.get(i, problem.nodes > 0).any() or not _shows(predict, start, i, level.get(i)):
            why[name] = _why_not(problem, name, unit)
        else:
            free.append(i)
    return free, why


def _shows(predict: Any, start: np.ndarray, index: int, rows: np.ndarray | None) -> bool:
    for slower in SLOWER:
        base = start.copy()
        base[:2] -= slower
        moved = sensitive(predict, base, index, MOVES[index], threshold=SENSITIVITY)
        if (moved if rows is None else moved & rows).sum() >= MIN_SENSITIVE:
            return True
    return False


def _why_not(problem: Problem, name: str, unit: str) -> str:
    """Why parameter `name` was not fitted; `unit`: what the cluster counts (ClusterSpec.unit)."""
    single = (problem.nodes == 1) & (problem.gpus_per_node > 1)
    if name == "intra_GBps" and not single.any():
        return f"no observation inside one node with 2 or more {unit}s"
    if name == "inter_GBps" and not (problem.nodes > 1).any():
        return "no multi-node observation"
    if not len(problem):
        return f"no multi-{unit} observation"
    return (f"fewer than {MIN_SENSITIVE} observations change by {SENSITIVITY:.0%} at either end of its range "
            f"(it does not show in these steps)")


def _strided(problem: Problem, most: int) -> Problem:
    """At most `most` rows, evenly strided through them ordered by model, placement and step time:
    a sample of every part of the data, the same whatever order the observations came in."""
    if len(problem) <= most:
        return problem
    order = np.lexsort((problem.observed, problem.gpus_per_node, problem.nodes, problem.models))
    return problem.subset(np.sort(order[:: -(-len(problem) // most)]))


def _fit(problem: Problem, start_net: Network, start: np.ndarray, free: list[int],
         judge: Problem | None = None) -> tuple[np.ndarray, bool]:
    """(parameters, kept_input): the fit, or the start when the fit is no better on `judge`
    (default: `problem`; step_problem's as_predicted). Many observations: the search runs on
    FIT_MAX_ROWS of them, then is polished on all."""
    predict = problem.predictor(start_net)
    theta = start
    if free:
        sample = _strided(problem, FIT_MAX_ROWS)
        theta = minimize(sample.predictor(start_net), sample.observed, start, SPACES, free)
        if sample is not problem:
            theta = polish(predict, problem.observed, start, SPACES, free, theta)
    judge = judge or problem
    judged = predict if judge is problem else judge.predictor(start_net)
    given = judged(start)[0]
    for share in SHRINK_TOWARDS_GIVEN:  # the fit, else the nearest part of the way to it that is no worse
        candidate = start + share * (theta - start)
        if _better(judged(candidate)[0], given, judge.observed):
            return candidate, False
    return start, True


def _better(fitted: np.ndarray, given: np.ndarray, observed: np.ndarray) -> bool:
    """Does the fit beat the figures given on these observations: a lower loss, and no worse a
    mean, median or 90th percentile of the relative error (what a user checks a calibration by)?"""
    if not data_loss(fitted, observed) < data_loss(given, observed):
        return False
    summaries = [np.append(np.quantile(e, [0.5, 0.9]), e.mean()) for e in
                 (np.abs(p / observed - 1) for p in (fitted, given))]
    return bool(np.all(summaries[0] <= summaries[1] + NO_WORSE_TOLERANCE))


def _residuals(problem: Problem, start_net: Network, start: np.ndarray, free: list[int],
               theta: np.ndarray) -> Residuals | None:
    if not len(problem):
        return None
    models = sorted(set(problem.models.tolist()))
    if problem.steps and len(models) >= 2:
        folds = [models[i::min(CV_FOLDS, len(models))] for i in range(min(CV_FOLDS, len(models)))]
        parts = []
        for fold in folds:
            held = np.isin(problem.models, fold)
            fitted, _ = _fit(_strided(problem.subset(~held), FIT_MAX_ROWS), start_net, start, free)
            test = problem.subset(held)
            parts.append(np.log(test.observed / test.predictor(start_net)(fitted)[0]))
        r, method = np.concatenate(parts), "cross-model"
    else:
        r = np.log(problem.observed / problem.predictor(start_net)(theta)[0])
        method = "in-sample" if problem.steps else "all-reduce"
    low, median, high = np.quantile(r, [0.1, 0.5, 0.9])
    worst = max(-low, high)
    if worst > MAX_RESIDUAL:  # data no calibration explains: say so rather than store an interval of x1e9
        where, what, check = (("observations", "step times", "each observation's step_time_s and its profile")
                              if problem.steps else ("samples", "all-reduce times", "the samples' bytes and seconds"))
        raise UserError(f"calibrate.{where}: the observed {what} are {math.exp(min(worst, 700)):.3g} times off "
                        f"the model's (beyond the x/{math.exp(MAX_RESIDUAL):g} a calibration may hold): check {check}")
    return Residuals(low=float(low), median=float(median), high=float(high), n=len(r), method=method)


def network_fields(network: Network) -> dict[str, float]:
    """A calibration section's figures for `network` (GB/s, microseconds; of one candidate)."""
    def one(value: Any) -> float:
        return float(np.ravel(value)[0])

    return {"intra_GBps": one(network.intra_Bps) / 1e9, "inter_GBps": one(network.inter_Bps) / 1e9,
            "base_latency_us": one(network.base_s) * 1e6, "latency_us": one(network.intra_hop_s) * 1e6,
            "inter_latency_us": one(network.inter_hop_s) * 1e6, "overlap": one(network.overlap),
            "jitter": one(network.jitter)}


def _calibrated(cluster: ClusterSpec, problem: Problem, *, allowed: Sequence[int], source: str,
                measured_at: str | None, total: int, models: list[str], placements: list[str],
                judge: Problem | None = None) -> ClusterSpec:
    start_net = effective_network(cluster)
    start = np.array([0.0, 0.0, 0.0, float(start_net.overlap), float(start_net.jitter)])
    predict = problem.predictor(start_net)
    free, why = _identifiable(problem, predict, start, allowed, cluster.unit)
    # Nothing to fit (one-GPU steps only, or nothing that shows) is no fit that lost to the input.
    theta, kept = _fit(problem, start_net, start, free, judge) if free else (start, False)
    if kept:
        why.update({PARAMETERS[i]: "the fit did not beat the figures given on these observations" for i in free})
        free = []
    figures = network_fields(_scaled(start_net, theta))
    fields = dict(source=source, measured_at=measured_at or now_utc(), **figures,
                  fitted=tuple(PARAMETERS[i] for i in free), not_fitted=why, observations=total, models=tuple(models),
                  placements=tuple(placements), residuals=_residuals(problem, start_net, start, free, theta),
                  kept_input=kept)
    try:  # read like a file's section: a figure past the bounds is one line, not a traceback
        section = Calibration.from_dict(fields, "calibrate.calibration")
    except UserError as exc:  # only a fit that started from a calibration near a bound gets there
        raise UserError(f"{exc}; the fit moves a figure up to x/1000 from the calibration it starts from: "
                        "calibrate the cluster without its calibration section") from None
    return cluster.replace(calibration=section)


def _check_stamp(source: Any, measured_at: Any) -> None:
    """`source` and `measured_at` as the section will hold them, before any fitting."""
    sources = typing.get_args(Calibration.model_fields["source"].annotation)
    if source not in sources or not isinstance(source, str):
        raise UserError(f"calibrate.source: must be one of {', '.join(sources)}, got {shown(source)}")
    if measured_at is not None:
        try:
            if not isinstance(measured_at, str):
                raise ValueError(f"must be an ISO 8601 time such as 2026-12-01T09:00:00Z, got {shown(measured_at)}")
            utc_time(measured_at)
        except ValueError as exc:
            raise UserError(f"calibrate.measured_at: {exc}") from None


def calibrate(cluster: ClusterSpec, observations: Iterable[Observation], *, source: str = "jobs",
              measured_at: str | None = None) -> ClusterSpec:
    """`cluster` with a calibration section fitted to the observed step times (module doc)."""
    _check_stamp(source, measured_at)
    cluster = ClusterSpec.coerce(cluster, "calibrate.cluster")
    listed = as_list(observations, "calibrate.observations")
    items = [Observation.coerce(o, f"calibrate.observations[{i}]") for i, o in enumerate(listed)]
    if not items:
        raise UserError("calibrate.observations: must be a non-empty list, got []")
    return _calibrated(cluster, step_problem(cluster, items), allowed=range(5), source=source,
                       measured_at=measured_at, total=len(items), models=sorted({o.profile.model for o in items}),
                       placements=sorted({f"{o.nodes}x{o.gpus_per_node}" for o in items}),
                       judge=step_problem(cluster, items, as_predicted=True))


def calibrate_allreduce(cluster: ClusterSpec, samples: Iterable[AllReduceSample], *, source: str = "probe-network",
                        measured_at: str | None = None) -> ClusterSpec:
    """`cluster` with a calibration section fitted to measured all-reduce times."""
    _check_stamp(source, measured_at)
    cluster = ClusterSpec.coerce(cluster, "calibrate.cluster")
    listed = as_list(samples, "calibrate.samples")
    items = [AllReduceSample.coerce(s, f"calibrate.samples[{i}]") for i, s in enumerate(listed)]
    if not items:
        raise UserError("calibrate.samples: must be a non-empty list, got []")
    return _calibrated(cluster, allreduce_problem(items), allowed=range(3), source=source, measured_at=measured_at,
                       total=len(items), models=[], placements=sorted({f"{s.nodes}x{s.gpus_per_node}" for s in items}))

