"""Online refit: learn from a running worker group's steps what the profile and the cluster's
network really are at its placement.

`refit` is the robust one: the median of >= ``REFIT_MIN_STEPS`` steps after warm-up (fewer: no
refit); a difference from the prediction within the steps' own spread (or ``REFIT_MIN_CHANGE``)
is noise and changes nothing; compute is refit apart from the network, from steps measured
without gradient sync; only the network level the placement exercises moves (the node's NIC
across nodes, the intra-node links inside one), by at most ``REFIT_BOUNDS``, solved on the scaled
level itself so that the refit cluster predicts the observed step.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any, Literal

from orchestrator.errors import UserError, shown
from orchestrator.planner.base import Model, as_list, NonNegativeFloat, NonNegativeInt, PositiveFloat, check_arguments
from orchestrator.planner.calibrate import network_fields, now_utc
from orchestrator.planner.model import ComputeCurve, Contention, PerformanceModel, Rows
from orchestrator.planner.network import Network
from orchestrator.planner.results import Placement, Prediction
from orchestrator.planner.search import predict
from orchestrator.planner.types import Calibration, ClusterSpec, NodeSample, Profile

REFIT_MIN_STEPS = 20  # steps after warm-up whose median is trusted
REFIT_WARMUP_STEPS = 5  # first steps of a worker group left out (start-up, first connections, caches)
REFIT_BOUNDS = (0.1, 10.0)  # one refit moves compute or a network level by at most x/10
REFIT_MIN_CHANGE = 0.05  # differences below this (or 3 standard errors of the median, if larger) are noise
NOISE_SIGMAS = 3.0


def with_network(cluster: ClusterSpec, network: Network, **fields: Any) -> ClusterSpec:
    """`cluster` whose calibration section holds `network` (a new section, source `refit`, when the
    cluster had none); `fields` update the section."""
    figures = network_fields(network)
    if cluster.calibration is None:
        section = Calibration(source="refit", measured_at=now_utc(), **figures, **fields)
    else:
        section = cluster.calibration.replace(**figures, **fields)
    return cluster.replace(calibration=section)


def solve_factor(step: Any, observed_s: float, limits: tuple[float, float]) -> float:
    """The factor at which `step(factor)` equals `observed_s` (bisection in log space; the step
    never shrinks as the factor grows), clamped to `limits`."""
    low, high = (math.log(x) for x in limits)
    if step(math.exp(low)) >= observed_s:
        return limits[0]
    if step(math.exp(high)) <= observed_s:
        return limits[1]
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if step(math.exp(mid)) < observed_s else (low, mid)
    return math.exp((low + high) / 2)


Level = Literal["compute", "intra", "inter"]


class RefitResult(Model):
    """What a worker group's steps taught: the refit profile and cluster, what changed and why."""

    where = "refit"
    profile: Profile  # with a node sample for this placement's GPUs per node when compute changed
    cluster: ClusterSpec
    placement: Placement
    changed: tuple[Level, ...]  # empty: nothing learned
    scale: PositiveFloat  # the refit level's network factor: its bandwidth divided, its hop latency multiplied
    compute_scale: PositiveFloat  # this placement's compute time, after / before
    predicted: Prediction  # at the placement, before the refit
    observed_step_s: PositiveFloat | None = None  # median after warm-up
    observed_compute_s: PositiveFloat | None = None  # median of the steps without gradient sync
    noise: NonNegativeFloat = 0.0  # the relative standard error of the median step time
    steps: NonNegativeInt = 0  # steps the median was taken over
    reason: str  # one sentence
    refit_comm_s: NonNegativeFloat | None = None  # this placement's communication time after a network refit

    @property
    def comm_s(self) -> float:
        return self.predicted.comm_s if self.refit_comm_s is None else self.refit_comm_s

    def to_dict(self) -> dict[str, Any]:
        return {"changed": list(self.changed), "scale": self.scale, "compute_scale": self.compute_scale,
                "placement": str(self.placement), "observed_step_s": self.observed_step_s,
                "observed_compute_s": self.observed_compute_s, "predicted_step_s": self.predicted.step_time_s,
                "predicted_comm_s": self.predicted.comm_s, "refit_comm_s": self.comm_s, "noise": self.noise,
                "steps": self.steps, "reason": self.reason}


def _steady(times: Sequence[float] | None, warmup: int) -> tuple[int, float, float]:
    """(count, median, the median's relative standard error) of the steps after warm-up.

    The median's standard error is 1.2533 sigma / sqrt(n) for a normal spread, sigma estimated as
    the interquartile range / 1.349 (robust to stragglers): the noise of the figure the refit
    uses, not of a single step, so a long steady run tells a small difference apart."""
    kept = [t for t in (times or [])[warmup:] if t > 0 and math.isfinite(t)]
    if len(kept) < REFIT_MIN_STEPS:
        return len(kept), 0.0, 0.0
    q1, median, q3 = statistics.quantiles(kept, n=4)
    return len(kept), median, 1.2533 * (q3 - q1) / 1.349 / median / math.sqrt(len(kept))


def _times(values: Any, name: str) -> list[float] | None:
    """A list of seconds (None stays None). Zero, negative and non-finite entries are bad
    measurements that `_steady` passes over; anything but numbers is the caller's mistake."""
    if values is None:
        return None
    values = as_list(values, f"refit.{name}", "a list of seconds")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"refit.{name}[{i}]: must be a number (seconds), got {shown(v)}")
    return values


def refit(profile: Profile, cluster: ClusterSpec, *, placement: Placement, local_batch: int, accumulation: int = 1,
          step_times: Sequence[float], compute_step_times: Sequence[float] | None = None,
          warmup: int = REFIT_WARMUP_STEPS) -> RefitResult:
    """Refit compute and the network level `placement` exercises from a worker group's step times
    (seconds per optimizer step, in order), and the same steps without gradient sync if measured.
    The local batch is split into accumulation as `predict` does."""
    check_arguments("refit", integers={"local_batch": local_batch, "accumulation": accumulation},
                    required=("local_batch", "accumulation"))
    profile, cluster = Profile.coerce(profile, "refit.profile"), ClusterSpec.coerce(cluster, "refit.cluster")
    placement = Placement.coerce(placement, "refit.placement")
    step_times = _times(step_times, "step_times")
    compute_step_times = _times(compute_step_times, "compute_step_times")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UserError(f"refit.warmup: must be an integer >= 0, got {shown(warmup)}")
    where = dict(nodes=placement.nodes, gpus_per_node=placement.gpus_per_node, local_batch=local_batch,
                 accumulation=accumulation, reference_batch=profile.max_local_batch)
    before = predict(profile, cluster, **where)
    common = {"placement": placement, "predicted": before}
    count, median, noise = _steady(step_times, warmup)
    if not median:
        return RefitResult(profile=profile, cluster=cluster, changed=(), scale=1.0, compute_scale=1.0, steps=count,
                           reason=f"no refit: {count} steps after {warmup} warm-up steps, {REFIT_MIN_STEPS} needed",
                           **common)
    measured = dict(observed_step_s=median, noise=noise, steps=count, **common)
    profile2, compute_scale, compute_s, said = _refit_compute(profile, before, placement, compute_step_times)
    after = predict(profile2, cluster, **where)
    changed: list[Level] = ["compute"] if compute_scale != 1.0 else []
    tolerance = max(REFIT_MIN_CHANGE, NOISE_SIGMAS * noise)
    if placement.gpus == 1 or not after.comm_s:
        return RefitResult(profile=profile2, cluster=cluster, changed=tuple(changed), scale=1.0,
                           compute_scale=compute_scale, observed_compute_s=compute_s, **measured,
                           reason=f"{said}; one worker has no all-reduce: the network is unchanged")
    if abs(math.log(median / after.step_time_s)) <= tolerance:
        return RefitResult(profile=profile2, cluster=cluster, changed=tuple(changed), scale=1.0,
                           compute_scale=compute_scale, observed_compute_s=compute_s, **measured,
                           reason=f"{said}; observed {median * 1e3:.4g} ms/step is within {tolerance:.0%} (its noise) "
                                  f"of the predicted {after.step_time_s * 1e3:.4g} ms: the network is unchanged")
    cluster2, level, factor = _refit_network_level(profile2, cluster, after, median, compute_s)
    changed.append(level)
    bounded = " (bounded)" if factor in REFIT_BOUNDS else ""
    return RefitResult(profile=profile2, cluster=cluster2, changed=tuple(changed), scale=factor,
                       refit_comm_s=predict(profile2, cluster2, **where).comm_s,
                       compute_scale=compute_scale, observed_compute_s=compute_s, **measured,
                       reason=f"{said}; {level}-node network x{factor:.3g}{bounded}: observed {median * 1e3:.4g} ms/step "
                              f"at {placement} vs predicted {after.step_time_s * 1e3:.4g} ms")


def _refit_compute(profile: Profile, before: Prediction, placement: Placement,
                   compute_step_times: Sequence[float] | None) -> tuple[Profile, float, float | None, str]:
    """(profile, compute scale, observed compute, what was said) from the steps without sync.
    They come from the workers' probe, which warms up before it times (`trainers.loop`): none are
    left out (a caller's slow first few move a median of 20 little), so 20 probe times suffice."""
    count, observed, noise = _steady(compute_step_times, 0)
    if not observed:
        measured = f"{count} steps without gradient sync, {REFIT_MIN_STEPS} needed" if count else \
            "no steps without gradient sync measured"
        return profile, 1.0, None, f"compute as profiled ({measured})"
    ratio = observed / before.compute_s
    tolerance = max(REFIT_MIN_CHANGE, NOISE_SIGMAS * noise)
    if abs(math.log(ratio)) <= tolerance:
        return profile, 1.0, observed, f"compute as profiled (measured within {tolerance:.0%})"
    scale = min(max(ratio, REFIT_BOUNDS[0]), REFIT_BOUNDS[1])
    g, batch = placement.gpus_per_node, before.local_batch
    curve = ComputeCurve(sorted(profile.samples, key=lambda s: s.local_batch))
    if g == 1:  # the device itself is slower or faster than profiled: every rung alike
        return _device_scaled(profile, scale), scale, observed, f"compute x{scale:.3g} on every batch size"
    factor = float(Contention(profile, curve)(g, batch)) * scale
    # Contention divides a node sample by the one-GPU time at its batch: a measured 1-GPU node
    # sample there, else the ladder's. The new sample must be that time x the factor it means.
    alone = next((s.step_time_s for s in profile.node_samples if (s.gpus_per_node, s.local_batch) == (1, batch)),
                 float(curve(batch)))
    if factor < 1:  # faster beside g-1 others than profiled alone: sharing a node cannot do that, the device does
        device = _device_scaled(profile, factor)
        others = tuple(s for s in device.node_samples if (s.gpus_per_node, s.local_batch) != (g, batch))
        same = NodeSample(gpus_per_node=g, local_batch=batch, step_time_s=alone * factor)
        return (device.replace(node_samples=(*others, same)), scale, observed,
                f"compute x{scale:.3g} with {g} GPUs per node, faster than profiled alone: every batch size "
                f"x{factor:.3g}, no node contention")
    others = tuple(s for s in profile.node_samples if (s.gpus_per_node, s.local_batch) != (g, batch))
    sample = NodeSample(gpus_per_node=g, local_batch=batch, step_time_s=alone * factor)
    return (profile.replace(node_samples=(*others, sample)), scale, observed,
            f"compute x{scale:.3g} with {g} GPUs per node (node contention, from steps without sync)")


def _device_scaled(profile: Profile, factor: float) -> Profile:
    """`profile` on a device `factor` times as slow: every rung and node sample alike."""
    samples = tuple(s.replace(step_time_s=s.step_time_s * factor,
                              fwd_bwd_s=None if s.fwd_bwd_s is None else s.fwd_bwd_s * factor,
                              optimizer_s=None if s.optimizer_s is None else s.optimizer_s * factor)
                    for s in profile.samples)
    nodes = tuple(s.replace(step_time_s=s.step_time_s * factor) for s in profile.node_samples)
    return profile.replace(samples=samples, node_samples=nodes)


def _refit_network_level(profile: Profile, cluster: ClusterSpec, after: Prediction, observed: float,
                         compute_s: float | None) -> tuple[ClusterSpec, Level, float]:
    """Scale the level the placement's ring runs at (its bottleneck) to explain `observed`: the
    factor is solved on the level-scaled network itself (scaling one level moves the step less than
    scaling all communication, as the other level's hops and the base latency stay), so the refit
    cluster predicts the observed step wherever `REFIT_BOUNDS` reach it."""
    net = PerformanceModel(profile, cluster).network
    # The ring runs at its slowest link; with one GPU per node there is no intra-node hop at all.
    level: Level = ("inter" if after.nodes > 1 and (after.gpus_per_node == 1 or net.inter_Bps <= net.intra_Bps)
                    else "intra")
    rows = Rows.of([(after.nodes, after.gpus_per_node, after.local_batch, after.accumulation)])

    def refit_cluster(factor: float) -> ClusterSpec:
        scaled = net.scaled(factor, intra=level == "intra", inter=level == "inter")
        samples = tuple(s.replace(seconds=s.seconds * factor) if (s.nodes, s.gpus_per_node) == (after.nodes, after.gpus_per_node)
                        else s for s in cluster.allreduce_samples)
        note = f"{level}-node network x{factor:.3g} (refit at {after.placement})"
        return with_network(cluster, scaled, note=note).replace(allreduce_samples=samples)

    def step(factor: float) -> float:
        model = PerformanceModel(profile, refit_cluster(factor))
        return float(model.steps(rows.nodes, rows.gpus_per_node, rows.micro, rows.accum, compute_s=compute_s).step[0])

    factor = solve_factor(step, observed, REFIT_BOUNDS)
    return refit_cluster(factor), level, factor
