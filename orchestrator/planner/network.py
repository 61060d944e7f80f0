"""The physics of DDP's gradient all-reduce: a ring over every rank, and its overlap with backward.

All functions take floats or numpy arrays alike (they broadcast), so `predict` of one placement,
`plan` over 1,024 placements and `calibrate` over 10,000 observations share one formula.

ring      an all-reduce of S bytes over P = N x g ranks moves 2(P-1)/P x S bytes over every link
          of the ring (nccl-tests doc/PERFORMANCE.md, "bus bandwidth"); the ring runs at its
          slowest link: a GPU's intra-node link (g > 1) and, across nodes, the node's NIC, which
          carries that whole volume for all g GPUs of the node (one ring crossing per node):
              t = 2(P-1)/P x S / min(B_intra, B_inter) + latency
latency   NCCL's own model (src/graph/tuning.cc, ring): a base cost per call plus one hop
          latency per ring step, 2(P-N) steps inside nodes and 2(N-1) across them.
overlap   DDP all-reduces k buckets, each as soon as backward has produced it (Li et al.,
          "PyTorch Distributed", VLDB 2020, section 3.2.3): k-1 full buckets of the cap C and a
          last one holding the rest, r = S - (k-1) C (the parameters nearest the input, whose
          gradients come last). A bucket is ready once backward has produced its bytes: full
          bucket j at j f of the window W = overlap x T_bwd (f = C/S), the last at W; the
          buckets queue on one communication stream that progresses at `overlap` of its full
          rate while backward still runs. The last bucket's all-reduce is exposed, and so is
          whatever of the queue before it runs past W:
              exposed = c_r + max(0, (k-1) c - W (1 - f), c - W r/S)
          (c, c_r: a full and the last bucket's all-reduce). With equal buckets (S = k C) this is
          k c - min((k-1) c, W (k-1)/k); a gradient one byte past a multiple of C exposes a full
          bucket and one byte more, never less. overlap = 1 is the most a separate stream
          allows; 0 is no overlap at all.
stragglers a synchronous step waits for the slowest rank: with each rank's compute varying
          independently by a coefficient of variation `jitter`, the expected slowest of P is
          1 + jitter x E[max of P standard normals] times the mean (order statistics; Blom's
          approximation of the expected maximum). 0 without a calibration: one profiled worker
          says nothing about how a cluster's ranks drift apart.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any

import numpy as np

_NORMAL = NormalDist()
Array = Any  # a float or a numpy array: every function here broadcasts


@dataclass(frozen=True, slots=True)
class Network:
    """The figures the formulas use: achieved bus bandwidths (bytes/s), latencies (s), overlap."""

    intra_Bps: float  # per GPU, inside a node
    inter_Bps: float  # per node, through its NIC(s)
    base_s: float  # per all-reduce call
    intra_hop_s: float  # per ring step between GPUs of one node
    inter_hop_s: float  # per ring step between nodes
    overlap: float  # share of full speed the all-reduce gets while backward runs
    jitter: float = 0.0  # one rank's step-time spread (coefficient of variation): stragglers

    def scaled(self, factor: float, *, intra: bool = True, inter: bool = True) -> Network:
        """Communication `factor` times slower (bandwidths divided, latencies multiplied), on the
        intra-node level, the inter-node level, or both."""
        latency = factor if intra and inter else 1.0
        return replace(
            self,
            intra_Bps=self.intra_Bps / factor if intra else self.intra_Bps,
            inter_Bps=self.inter_Bps / factor if inter else self.inter_Bps,
            base_s=self.base_s * latency,
            intra_hop_s=self.intra_hop_s * (factor if intra else 1.0),
            inter_hop_s=self.inter_hop_s * (factor if inter else 1.0),
        )


def allreduce_s(nbytes: Array, nodes: Array, gpus_per_node: Array, net: Network | Any) -> Array:
    """Seconds for one ring all-reduce of `nbytes` (0 on one rank). `net` may hold arrays."""
    bus = ring_bus(nodes, gpus_per_node, net.intra_Bps, net.inter_Bps)
    return ring_volume(nbytes, nodes, gpus_per_node) / bus + ring_latency(nodes, gpus_per_node, net)


def ring_volume(nbytes: Array, nodes: Array, gpus_per_node: Array) -> Array:
    """Bytes over every link of the ring: 2(P-1)/P x nbytes (0 on one rank)."""
    ranks = np.asarray(nodes, dtype=float) * np.asarray(gpus_per_node, dtype=float)
    return 2 * (ranks - 1) / np.maximum(ranks, 1.0) * nbytes


def ring_links(nodes: Array, gpus_per_node: Array) -> tuple[Array, Array]:
    """Which links the ring crosses: a GPU's intra-node link (g > 1), the node's NIC (N > 1)."""
    return np.asarray(gpus_per_node, dtype=float) > 1, np.asarray(nodes, dtype=float) > 1


def ring_bus(nodes: Array, gpus_per_node: Array, intra_Bps: Array, inter_Bps: Array) -> Array:
    """The ring's slowest crossed link (infinite on one rank, which moves nothing)."""
    intra, inter = ring_links(nodes, gpus_per_node)
    with np.errstate(divide="ignore"):
        return 1 / np.maximum(intra / intra_Bps, inter / inter_Bps)


def ring_latency(nodes: Array, gpus_per_node: Array, net: Network | Any) -> Array:
    """NCCL's ring latency: a base cost and 2(P-N) intra-node plus 2(N-1) inter-node hops."""
    nodes = np.asarray(nodes, dtype=float)
    ranks = nodes * np.asarray(gpus_per_node, dtype=float)
    latency = net.base_s + 2 * (ranks - nodes) * net.intra_hop_s + 2 * (nodes - 1) * net.inter_hop_s
    return np.where(ranks > 1, latency, 0.0)


@dataclass(frozen=True, slots=True)
class Buckets:
    """How DDP splits S gradient bytes (module doc: overlap): k-1 full buckets of `full_bytes`,
    then the last of `last_bytes`. Fields broadcast (one gradient size or an array of them)."""

    count: Array
    full_bytes: Array
    last_bytes: Array

    @classmethod
    def of(cls, grad_bytes: Array, cap: float) -> Buckets:
        size = np.asarray(grad_bytes, dtype=float)
        count = np.maximum(np.ceil(size / cap), 1.0)
        return cls(count=count, full_bytes=np.minimum(size, cap), last_bytes=size - (count - 1) * cap)

    @property
    def full_share(self) -> Array:
        """f: a full bucket's share of the gradient (1 with no full bucket before the last)."""
        return self._share(self.full_bytes)

    @property
    def last_share(self) -> Array:
        return self._share(self.last_bytes)

    def _share(self, part: Array) -> Array:
        total = (self.count - 1) * self.full_bytes + self.last_bytes
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.count > 1, part / total, 1.0)

    def total_s(self, full_s: Array, last_s: Array) -> Array:
        """Every bucket's all-reduce, one after another."""
        return (self.count - 1) * full_s + last_s


def exposed_s(full_s: Array, last_s: Array, buckets: Buckets, backward_s: Array, overlap: Array) -> Array:
    """Seconds of all-reduce left after backward (module doc: the bucket queue); `full_s` and
    `last_s` are one full and the last bucket's all-reduce."""
    window = overlap * backward_s
    earlier = buckets.count - 1
    full = np.where(earlier > 0, full_s, 0.0)
    behind = np.maximum(earlier * full - window * (1 - buckets.full_share), full - window * buckets.last_share)
    return last_s + np.maximum(behind, 0.0)


def straggler_factor(nodes: Array, gpus_per_node: Array, jitter: Array) -> Array:
    """1 + jitter x E[max of P standard normals] (Blom's approximation): a synchronous step waits
    for the slowest of P ranks whose compute varies independently by `jitter` (1 on one rank)."""
    ranks = np.asarray(nodes, dtype=float) * np.asarray(gpus_per_node, dtype=float)
    return 1.0 + jitter * expected_max_normal(ranks)


def expected_max_normal(n: Array) -> Array:
    """E[max of n standard normals] per element (0 for n <= 1), by Blom's approximation
    Phi^-1((n - 0.375) / (n + 0.25)): 0.59 at 2, 1.05 at 4, 1.43 at 8, 1.77 at 16 (exact: 0.56,
    1.03, 1.42, 1.77)."""
    n = np.asarray(n, dtype=float)
    unique, inverse = np.unique(n, return_inverse=True)
    values = np.array([0.0 if k <= 1 else _NORMAL.inv_cdf((k - 0.375) / (k + 0.25)) for k in unique.ravel()])
    return values[inverse].reshape(n.shape)


class AllReduceTable:
    """Measured all-reduce seconds by message size for one placement (raw probe samples),
    interpolated linearly in bytes between measured sizes: an all-reduce's time is a latency plus
    bytes over a bandwidth, which that reproduces exactly between any two sizes (interpolating in
    log(bytes) overstated a bandwidth-bound size between two 4x-apart samples by up to 25 %)."""

    def __init__(self, sizes_seconds: Iterable[tuple[int, float]]) -> None:
        by_size: dict[int, list[float]] = {}
        for size, seconds in sizes_seconds:
            by_size.setdefault(size, []).append(seconds)
        self.bytes = sorted(by_size)
        medians = [sorted(by_size[b])[len(by_size[b]) // 2] for b in self.bytes]
        # A larger message is never faster; noise (often on the smallest, first-measured sizes)
        # says otherwise, so each size takes the least time seen at it or any larger size.
        self.seconds = [min(medians[i:]) for i in range(len(medians))]

    def __call__(self, nbytes: float) -> float:
        if nbytes <= self.bytes[0]:
            return self.seconds[0]
        if nbytes >= self.bytes[-1]:
            return self.seconds[-1] * nbytes / self.bytes[-1]
        i = bisect.bisect_left(self.bytes, nbytes)
        w = (nbytes - self.bytes[i - 1]) / (self.bytes[i] - self.bytes[i - 1])
        return self.seconds[i - 1] + w * (self.seconds[i] - self.seconds[i - 1])
