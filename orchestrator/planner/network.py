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
          "PyTorch Distributed", VLDB 2020, section 3.2.3). Bucket j is ready at j/k of backward;
          the buckets queue on one communication stream that progresses at `overlap` of its full
          rate while backward still runs. The last bucket is only ready when backward ends, so at
          least its all-reduce is exposed; when the queue falls behind, the rest is exposed too:
              exposed = k c - min((k-1) c, overlap x T_bwd x (k-1)/k)
          (c: one bucket's all-reduce, T_bwd: the backward pass). overlap = 1 is the most a
          separate stream allows; 0 is no overlap at all.
stragglers a synchronous step waits for the slowest rank: with each rank's compute varying
          independently by a coefficient of variation `jitter`, the expected slowest of P is
          1 + jitter x E[max of P standard normals] times the mean (order statistics; Blom's
          approximation of the expected maximum). 0 without a calibration: one profiled worker
          says nothing about how a cluster's ranks drift apart.
"""

from __future__ import annotations

import bisect
import math
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


def exposed_s(per_bucket: Array, buckets: Array, backward_s: Array, overlap: Array) -> Array:
    """Seconds of all-reduce left after backward (module doc: the bucket queue)."""
    hidden = np.minimum((buckets - 1) * per_bucket, overlap * backward_s * (buckets - 1) / buckets)
    return buckets * per_bucket - hidden


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
    """Measured all-reduce seconds by message size for one placement (raw probe samples)."""

    def __init__(self, sizes_seconds: Iterable[tuple[int, float]]) -> None:
        by_size: dict[int, list[float]] = {}
        for size, seconds in sizes_seconds:
            by_size.setdefault(size, []).append(seconds)
        self.bytes = sorted(by_size)
        self.log_bytes = [math.log(b) for b in self.bytes]
        medians = [sorted(by_size[b])[len(by_size[b]) // 2] for b in self.bytes]
        # A larger message is never faster; noise (often on the smallest, first-measured sizes)
        # says otherwise, so each size takes the least time seen at it or any larger size.
        self.seconds = [min(medians[i:]) for i in range(len(medians))]

    def __call__(self, nbytes: float) -> float:
        if nbytes <= self.bytes[0]:
            return self.seconds[0]
        if nbytes >= self.bytes[-1]:
            return self.seconds[-1] * nbytes / self.bytes[-1]
        x = math.log(nbytes)
        i = bisect.bisect_left(self.log_bytes, x)
        w = (x - self.log_bytes[i - 1]) / (self.log_bytes[i] - self.log_bytes[i - 1])
        return self.seconds[i - 1] + w * (self.seconds[i] - self.seconds[i - 1])
