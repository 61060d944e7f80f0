"""The performance model: a profile and a cluster turned into step times at any placement.

compute   t(b): the profiled step time at local batch b, interpolated piecewise-linearly between
          profiled batch sizes. Below the smallest, a least-squares line through the ladder,
          clamped between proportional scaling and the smallest sample's time; above the largest,
          proportional scaling (the device is assumed saturated). The optimizer share t_opt
          (``optimizer_s``, else step - ``fwd_bwd_s``, else 0) runs once per optimizer step; the
          rest, t_fb, is forward+backward, of which ``BACKWARD_FRACTION`` is backward.
contention with g GPUs per node stepping at once, compute is multiplied by the profile's
          measured node factor step_time(g) / step_time(1) at the nearest measured batch
          (interpolated in g, flat beyond the measured range; 1 without node samples).
network   network.py: a ring all-reduce per DDP bucket (k = ceil(gradient bytes /
          ``DDP_BUCKET_BYTES``): k-1 full buckets and the rest in the last), the buckets queued
          behind backward; the figures come from the cluster's calibration, else the priors of its
          link kinds (priors.py). Measured all-reduce samples for the very placement replace the
          formula at each bucket's size (network.AllReduceTable).
step      max(A x t_fb + t_opt + exposed all-reduce, data), A the accumulation; data: one worker
          loading A x b samples at ``data_samples_per_s`` (prefetching hides it otherwise).
interval  (~80 %) with a calibration: its residual quantiles; without: the network time at 1/w
          and w times (w: the widest crossed link's prior width), compute within
          ``COMPUTE_SPREAD``. Scaling efficiency's ends move with the network only.
efficiency throughput / (GPUs x one GPU's throughput on the same global batch, with
          accumulation where it does not fit; a row's own micro-batch where that is faster).
stat. eff McCandlish et al. 2018: reaching a given loss at global batch B takes
          E(B) = E_min (1 + B / B_noise) samples, so relative to a reference batch B0 the
          statistical efficiency is (B_noise + B0) / (B_noise + B); goodput = throughput x that.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.planner.base import MAX_BYTES, MAX_COUNT, check_arguments
from orchestrator.planner.network import AllReduceTable, Buckets, Network, allreduce_s, exposed_s, straggler_factor
from orchestrator.planner.priors import LinkKinds, link_kinds, prior_network, prior_width
from orchestrator.planner.results import Placement, Prediction
from orchestrator.planner.types import ClusterSpec, Profile, ProfileSample, Residuals
from trainers.batching import split_global_batch

# Backward costs about twice the forward (two matmuls per forward one), so 2/3 of fwd+bwd.
BACKWARD_FRACTION = 2.0 / 3.0
# PyTorch DDP's default bucket_cap_mb: each bucket is one all-reduce with its own latency.
DDP_BUCKET_BYTES = 25 * 2**20
# The profile's median step time is taken as known within this share either way: the run-to-run
# spread of step-time medians on a shared machine (README, benchmarks: about +-5 % per ratio).
COMPUTE_SPREAD = 0.05
# A network calibrated on all-reduces alone (probe-network) has not seen them run beside backward:
# its measured spread is widened by this factor either way for the overlap it could not observe
# (a judgement).
PROBE_STEP_WIDTH = 1.25
# Fewer residuals than this make no 80 % interval (its 10th and 90th percentiles would be one or
# two observations): the prediction keeps the priors' widths around the calibrated figures.
MIN_RESIDUALS = 10


def effective_network(cluster: ClusterSpec, kinds: LinkKinds | None = None) -> Network:
    """The figures the model uses: the calibration's when there is one, else the priors'."""
    cal = cluster.calibration
    if cal is None:
        return prior_network(cluster, kinds or link_kinds(cluster))
    return Network(intra_Bps=cal.intra_GBps * 1e9, inter_Bps=cal.inter_GBps * 1e9, base_s=cal.base_latency_us * 1e-6,
                   intra_hop_s=cal.latency_us * 1e-6, inter_hop_s=cal.inter_latency_us * 1e-6, overlap=cal.overlap,
                   jitter=cal.jitter)


def ring_allreduce_s(cluster: ClusterSpec, *, nodes: int, gpus_per_node: int, nbytes: float, messages: int = 1) -> float:
    """Seconds to all-reduce `nbytes` split into `messages` all-reduces, from the cluster's figures."""
    # checked as predict's arguments are: messages=0 was a ZeroDivisionError, nbytes=nan a nan
    check_arguments("ring_allreduce_s", integers={"nodes": nodes, "gpus_per_node": gpus_per_node, "messages": messages},
                    numbers={"nbytes": nbytes}, at_most={"nodes": MAX_COUNT, "gpus_per_node": MAX_COUNT, "nbytes": MAX_BYTES},
                    required=("nodes", "gpus_per_node", "nbytes", "messages"))
    cluster = ClusterSpec.coerce(cluster, "ring_allreduce_s.cluster")
    return messages * float(allreduce_s(nbytes / messages, nodes, gpus_per_node, effective_network(cluster)))


class ComputeCurve:
    """Seconds as a function of batch size, fitted over the profiled ladder (module doc)."""

    def __init__(self, ladder: Sequence[ProfileSample]) -> None:
        self.xs = np.array([s.local_batch for s in ladder], dtype=float)
        self.ys = np.array([s.step_time_s for s in ladder], dtype=float)
        if len(self.xs) < 2:
            self.slope = self.ys[0] / self.xs[0]
        else:
            dx = self.xs - self.xs.mean()
            self.slope = float((dx * (self.ys - self.ys.mean())).sum() / (dx**2).sum())

    def __call__(self, batch: Any) -> np.ndarray:
        x = np.asarray(batch, dtype=float)
        x0, y0, xn, yn = self.xs[0], self.ys[0], self.xs[-1], self.ys[-1]
        below = np.minimum(y0, np.maximum(y0 * x / x0, y0 + self.slope * (x - x0)))
        return np.where(x >= xn, yn * x / xn, np.where(x <= x0, below, np.interp(x, self.xs, self.ys)))


def optimizer_share(ladder: Sequence[ProfileSample]) -> float:
    """The per-step time that neither scales with the batch nor overlaps communication: measured
    optimizer time, else step minus forward+backward, else 0. It does not depend on the batch, so
    the median over the ladder rejects a noisy rung."""
    if all(s.optimizer_s is not None for s in ladder):
        rest = [s.optimizer_s for s in ladder]
    elif all(s.fwd_bwd_s is not None for s in ladder):
        rest = [max(s.step_time_s - s.fwd_bwd_s, 0.0) for s in ladder]
    else:
        return 0.0
    return sorted(rest)[len(rest) // 2]


class Contention:
    """Compute factor with g GPUs of one node stepping at once (module doc), from node samples."""

    def __init__(self, profile: Profile, curve: ComputeCurve) -> None:
        by_batch: dict[int, dict[int, float]] = {}
        for s in profile.node_samples:
            by_batch.setdefault(s.local_batch, {})[s.gpus_per_node] = s.step_time_s
        self.batches = np.array(sorted(by_batch), dtype=float)
        self.curves = []
        for batch in sorted(by_batch):
            times = by_batch[batch]
            alone = times.get(1) or float(curve(batch))
            gs = sorted({1, *times})
            # Sharing a node can only slow a GPU down: a factor below 1 is measurement noise.
            self.curves.append((np.array(gs, dtype=float), np.array([max(times.get(g, alone) / alone, 1.0) for g in gs])))

    def __call__(self, gpus_per_node: Any, batch: Any) -> np.ndarray:
        g = np.asarray(gpus_per_node, dtype=float)
        b = np.broadcast_to(np.asarray(batch, dtype=float), g.shape)
        if not self.curves:
            return np.ones_like(g)
        nearest = np.abs(np.log(b)[..., None] - np.log(self.batches)).argmin(axis=-1)
        out = np.ones_like(g)
        for i, (gs, factors) in enumerate(self.curves):
            mask = nearest == i
            out[mask] = np.interp(g[mask], gs, factors)
        return out


def one_gpu_split(global_batch: np.ndarray, max_local_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """`trainers.batching.split_global_batch` on one worker, for many batches at once: the
    smallest accumulation that divides the batch into micro-batches that fit."""
    batch = np.asarray(global_batch, dtype=np.int64)
    accum = np.maximum(-(-batch // max_local_batch), 1)
    todo = batch % accum != 0
    for _ in range(64):  # a divisor is near for the batches a plan meets; the rest is done one by one
        if not todo.any():
            break
        accum = np.where(todo, accum + 1, accum)
        todo = batch % accum != 0
    for i in np.flatnonzero(todo):
        s = split_global_batch(int(batch[i]), workers=1, max_local_batch=max_local_batch)
        accum[i] = s.accumulation
    return batch // accum, accum


@dataclass(frozen=True, slots=True)
class Steps:
    """Arrays over rows (placement x batch split) of one evaluation."""

    step: np.ndarray
    compute: np.ndarray
    comm: np.ndarray
    exposed: np.ndarray
    data: np.ndarray
    backward: np.ndarray


class PerformanceModel:
    """The profile and cluster turned into fast callables; built once per predict/plan call."""

    def __init__(self, profile: Profile, cluster: ClusterSpec) -> None:
        self.profile, self.cluster = profile, cluster
        ladder = sorted(profile.samples, key=lambda s: s.local_batch)
        self.curve = ComputeCurve(ladder)
        self.optimizer_s = optimizer_share(ladder)
        self.contention = Contention(profile, self.curve)
        self.kinds = link_kinds(cluster)
        self.network = effective_network(cluster, self.kinds)
        self.buckets = Buckets.of(profile.grad_bytes, DDP_BUCKET_BYTES)
        grouped: dict[tuple[int, int], list[tuple[int, float]]] = {}
        for s in cluster.allreduce_samples:
            grouped.setdefault((s.nodes, s.gpus_per_node), []).append((s.bytes, s.seconds))
        self.tables = {k: AllReduceTable(v) for k, v in grouped.items()}
        self.batch_options = sorted({s.local_batch for s in profile.samples if s.local_batch <= profile.max_local_batch}
                                    | {profile.max_local_batch})

    # -- pieces -----------------------------------------------------------------------------

    def fwd_bwd(self, batch: Any) -> np.ndarray:
        return np.maximum(self.curve(batch) - self.optimizer_s, 0.0)

    def table_per_bucket(self, nodes: Any, gpus_per_node: Any, nbytes: float) -> np.ndarray:
        """One all-reduce of `nbytes` measured where the cluster has samples for the placement, else NaN."""
        nodes, gpus_per_node = np.broadcast_arrays(np.asarray(nodes, dtype=float), np.asarray(gpus_per_node, dtype=float))
        out = np.full(nodes.shape, np.nan)
        for (n, g), table in self.tables.items():
            out[(nodes == n) & (gpus_per_node == g) & (nodes * gpus_per_node > 1)] = table(nbytes)
        return out

    def per_bucket(self, nodes: Any, gpus_per_node: Any) -> tuple[np.ndarray, np.ndarray]:
        """(a full bucket's, the last bucket's) all-reduce at each row's placement (measured
        tables where they exist)."""
        shape = np.broadcast(nodes, gpus_per_node).shape
        if not self.profile.grad_bytes:
            return np.zeros(shape), np.zeros(shape)
        out = []
        for nbytes in (float(self.buckets.full_bytes), float(self.buckets.last_bytes)):
            formula = allreduce_s(nbytes, nodes, gpus_per_node, self.network)
            table = self.table_per_bucket(nodes, gpus_per_node, nbytes)
            out.append(np.broadcast_to(np.where(np.isnan(table), formula, table), shape))
        return out[0], out[1]

    def compute_terms(self, gpus_per_node: Any, micro: Any, accum: Any,
                      compute_s: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(compute, backward, data) seconds per step at each row; `compute_s` (measured without
        gradient sync, NaN where not) replaces the profile's compute."""
        micro, accum = np.asarray(micro, dtype=float), np.asarray(accum, dtype=float)
        factor = self.contention(gpus_per_node, micro)
        t_fb = self.fwd_bwd(micro) * factor
        compute = accum * t_fb + self.optimizer_s * factor
        if compute_s is not None:
            measured = np.asarray(compute_s, dtype=float)
            known = ~np.isnan(measured)
            compute = np.where(known, measured, compute)
            t_fb = np.where(known, np.maximum(measured - self.optimizer_s * factor, 0.0) / accum, t_fb)
        rate = self.profile.data_samples_per_s
        data = micro * accum / rate if rate else np.zeros_like(compute)
        return compute, BACKWARD_FRACTION * t_fb, data

    def steps(self, nodes: Any, gpus_per_node: Any, micro: Any, accum: Any, *, comm_factor: Any = 1.0,
              compute_s: Any = None) -> Steps:
        """Step times at each row, the network time scaled by `comm_factor`."""
        compute, backward, data = self.compute_terms(gpus_per_node, micro, accum, compute_s)
        if self.network.jitter:
            compute = compute * straggler_factor(nodes, gpus_per_node, self.network.jitter)
        full, last = (t * comm_factor for t in self.per_bucket(nodes, gpus_per_node))
        exposed = exposed_s(full, last, self.buckets, backward, self.network.overlap)
        return Steps(step=np.maximum(compute + exposed, data), compute=compute, comm=self.buckets.total_s(full, last),
                     exposed=exposed, data=data, backward=backward)

    def single_rate(self, micro: Any, accum: Any) -> np.ndarray:
        """One GPU's samples/s at this micro-batch and accumulation."""
        micro, accum = np.asarray(micro, dtype=float), np.asarray(accum, dtype=float)
        ones = np.ones_like(micro)
        return micro * accum / self.steps(ones, ones, micro, accum).step

    def reference(self, global_batch: np.ndarray) -> np.ndarray:
        """One GPU training the very same global batch (with accumulation where it does not fit):
        the baseline of scaling efficiency, so one GPU's efficiency is 1."""
        unique, inverse = np.unique(global_batch, return_inverse=True)
        micro, accum = one_gpu_split(unique, self.profile.max_local_batch)
        return self.single_rate(micro, accum)[inverse]

    def interval_factors(self, nodes: np.ndarray, gpus_per_node: np.ndarray, *,
                         known: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) multipliers of the network time at each row: the prior width w of the
        widest crossed level whose bandwidth is not in `known` (a calibration's fitted figures)."""
        intra = 1.0 if "intra_GBps" in known else prior_width(self.kinds, nodes=1, gpus_per_node=2)
        inter = 1.0 if "inter_GBps" in known else prior_width(self.kinds, nodes=2, gpus_per_node=1)
        widths = np.maximum(np.where(gpus_per_node > 1, intra, 1.0), np.where(nodes > 1, inter, 1.0))
        return 1 / widths, widths

    @property
    def residuals(self) -> Residuals | None:
        """The calibration's residuals when there are enough to make an interval of (module doc)."""
        cal = self.cluster.calibration
        r = cal.residuals if cal is not None else None
        return r if r is not None and r.n >= MIN_RESIDUALS else None


@dataclass(frozen=True, slots=True)
class Rows:
    """The candidate rows to evaluate: one placement and batch split each."""

    nodes: np.ndarray
    gpus_per_node: np.ndarray
    micro: np.ndarray
    accum: np.ndarray

    @classmethod
    def of(cls, items: Sequence[tuple[int, int, int, int]]) -> Rows:
        columns = np.array(items, dtype=float).reshape(-1, 4).T
        return cls(*columns)

    @property
    def gpus(self) -> np.ndarray:
        return self.nodes * self.gpus_per_node


def evaluate(model: PerformanceModel, rows: Rows, *, reference_batch: np.ndarray,
             total_samples: int | None) -> dict[str, np.ndarray]:
    """Every Prediction field as an array over `rows` (placement kept as nodes, gpus_per_node)."""
    s = model.steps(rows.nodes, rows.gpus_per_node, rows.micro, rows.accum)
    low, high = _step_interval(model, rows, s)
    samples = rows.gpus * rows.micro * rows.accum
    reference = np.maximum(model.reference(samples), model.single_rate(rows.micro, rows.accum))
    linear = rows.gpus * reference
    noise = model.profile.gradient_noise_scale
    stat = np.ones_like(samples) if noise is None else (noise + reference_batch) / (noise + samples)
    throughput = samples / s.step
    out = {
        "step_time_s": s.step, "step_time_low_s": low[0], "step_time_high_s": high[0], "compute_s": s.compute,
        "comm_s": s.comm, "exposed_comm_s": s.exposed, "data_s": s.data, "throughput": throughput,
        "throughput_low": samples / high[0], "throughput_high": samples / low[0],
        "efficiency": throughput / linear, "efficiency_low": samples / high[1] / linear,
        "statistical_efficiency": stat, "goodput": throughput * stat,
    }
    # Residuals all below zero (a calibration that over-predicted) would promise more than linear
    # scaling: the optimistic end stops at 1, or at the prediction where that is higher.
    out["efficiency_high"] = np.minimum(samples / low[1] / linear, np.maximum(out["efficiency"], 1.0))
    if total_samples:
        out["time_to_finish_s"] = total_samples / out["goodput"]
        price = model.cluster.gpu_hour_cost
        if price is not None:
            out["cost"] = out["time_to_finish_s"] / 3600 * rows.gpus * price
    out["bound"] = np.where(s.data > s.compute + s.exposed, 2, np.where(s.comm > s.backward, 1, 0))
    return out


def _step_interval(model: PerformanceModel, rows: Rows, s: Steps) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """((step low, network-only step low), (step high, network-only step high)) per row."""
    alone = rows.gpus == 1
    residuals, cal = model.residuals, model.cluster.calibration

    def network_scaled(lo: Any, hi: Any) -> tuple[np.ndarray, np.ndarray]:
        return tuple(model.steps(rows.nodes, rows.gpus_per_node, rows.micro, rows.accum, comm_factor=f).step
                     for f in (lo, hi))

    if residuals is not None and residuals.method != "all-reduce":
        # Residuals of whole steps: they hold the compute's error too.
        net_low = s.step * np.where(alone, 1.0, math.exp(min(residuals.low, 0.0)))
        net_high = s.step * np.where(alone, 1.0, math.exp(max(residuals.high, 0.0)))
        spread: Any = np.where(alone, COMPUTE_SPREAD, 0.0)
    else:
        if residuals is not None:  # all-reduce residuals: the network itself, measured
            lo = math.exp(min(residuals.low, 0.0)) / PROBE_STEP_WIDTH
            hi = math.exp(max(residuals.high, 0.0)) * PROBE_STEP_WIDTH
        else:
            lo, hi = model.interval_factors(rows.nodes, rows.gpus_per_node)
        net_low, net_high = network_scaled(lo, hi)
        spread = COMPUTE_SPREAD
    if residuals is not None and cal is not None:  # a level the calibration did not fit keeps its prior's width
        lo, hi = model.interval_factors(rows.nodes, rows.gpus_per_node, known=cal.fitted)
        if (hi > 1).any():
            prior_low, prior_high = network_scaled(lo, hi)
            net_low, net_high = np.minimum(net_low, prior_low), np.maximum(net_high, prior_high)
    return (net_low * (1 - spread), net_low), (net_high * (1 + spread), net_high)


BOUNDS = ("compute", "communication", "data")


def predictions(columns: dict[str, np.ndarray], rows: Rows, indices: Sequence[int], *,
                fits: Sequence[bool] | None = None) -> list[Prediction]:
    """Prediction objects for the rows at `indices`."""
    picked = np.asarray(indices, dtype=int)
    values = {k: v[picked].tolist() for k, v in columns.items()}
    nodes, per_node = rows.nodes[picked].astype(int).tolist(), rows.gpus_per_node[picked].astype(int).tolist()
    micro, accum = rows.micro[picked].astype(int).tolist(), rows.accum[picked].astype(int).tolist()
    out = []
    for j in range(len(picked)):
        row = {k: v[j] for k, v in values.items()}
        row["bound"] = BOUNDS[int(row["bound"])]
        out.append(Prediction(placement=placement_of(nodes[j], per_node[j]), local_batch=micro[j],
                              accumulation=accum[j], fits_memory=True if fits is None else fits[j], **row))
    return out


@functools.lru_cache(maxsize=4096)
def placement_of(nodes: int, gpus_per_node: int) -> Placement:
    """Placements are immutable values: one object per shape serves every plan."""
    return Placement(nodes, gpus_per_node)
