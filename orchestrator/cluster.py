"""The cluster the planner plans for: from a YAML file, from the live Ray cluster, or measured.

A `ClusterSpec` (defined in `orchestrator.planner`, which stays free of Ray) holds the node and GPU
counts, the line rates and link kinds, and the network's calibration: `probe-network` measures
all-reduce at a few placements and fits the planner's network model to it. On a CPU-only cluster every
worker slot (``cpus_per_worker`` CPUs) counts as one "GPU", so the same planner decides how many
CPU workers to run.

Ray and torch are imported inside the functions that need them: reading a cluster file (the
``orchestrator plan --cluster`` path) should not pay for either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from orchestrator import constants
from orchestrator.errors import UserError
from orchestrator.node_facts import node_facts, with_detected_links
from orchestrator.planner import (
    AllReduceSample,
    ClusterSpec,
    Placement,
    calibrate_allreduce,
    load_cluster,
    save_cluster,
)

log = logging.getLogger(__name__)

# Figures for a discovered cluster whose network nobody described: conservative guesses (PCIe
# Gen3 x16 between GPUs, 10 GbE between nodes, gloo over TCP loopback between CPU workers). Pass
# a cluster file's figures as `defaults`, or run `orchestrator probe-network`, to do better.
GPU_DEFAULTS: dict[str, Any] = {"intra_node_GBps": 16.0, "inter_node_GBps": 1.25}
CPU_DEFAULTS: dict[str, Any] = {"gpu": "cpu", "intra_node_GBps": 2.0, "inter_node_GBps": 1.25}
# The largest message `probe-network --max-mib` takes: 40x DDP's 25 MiB bucket, a tensor every
# worker allocates twice; beyond it a typo asks each GPU (or CPU worker) for gigabytes.
MAX_PROBE_MIB = 1024


def probe_sizes(max_bytes: int) -> list[int]:
    """Message sizes to probe up to `max_bytes`: 1 KiB upwards in 4x steps, ending at `max_bytes`
    itself (so `--max-mib 256` probes 256 MiB, and `--max-mib 3` 3 MiB)."""
    sizes = [1024]
    while sizes[-1] * 4 <= max_bytes:
        sizes.append(sizes[-1] * 4)
    return sizes if sizes[-1] == max_bytes or max_bytes < 1024 else [*sizes, max_bytes]


def spec_from_nodes(
    nodes: list[dict[str, Any]],
    defaults: dict[str, Any] | None = None,
    *,
    use_gpu: bool | None = None,
    cpus_per_worker: float = 1.0,
) -> ClusterSpec:
    """A ClusterSpec from `ray.nodes()` records (pure, for tests).

    Counts alive nodes with at least one slot: GPUs, or on a CPU-only cluster (or use_gpu=False)
    floor(CPU / cpus_per_worker) worker slots. Nodes may differ; the planner needs a uniform
    shape, so this picks the (nodes, slots per node) that holds the most slots, fewer nodes on a
    tie (8 + 4 GPUs -> 1 x 8, not 2 x 4). `defaults` supplies everything but the counts.
    """
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    if use_gpu is None:
        use_gpu = any(r.get("GPU", 0) >= 1 for r in alive)
    if use_gpu:
        slots = [int(r.get("GPU", 0)) for r in alive]
    else:
        slots = [int(r.get("CPU", 0) // cpus_per_worker) for r in alive]
    slots = [s for s in slots if s > 0]
    if not slots:
        kind = "GPUs" if use_gpu else f"CPU slots of {cpus_per_worker:g} CPUs"
        raise UserError(f"ray cluster: no alive node offers {kind}")
    shape = max(
        ((sum(1 for s in slots if s >= per), per) for per in set(slots)),
        key=lambda nodes_per: (nodes_per[0] * nodes_per[1], -nodes_per[0]),
    )
    raw = {**(GPU_DEFAULTS if use_gpu else CPU_DEFAULTS), **(defaults or {})}
    raw.update(nodes=shape[0], gpus_per_node=shape[1])
    if use_gpu and "gpu" not in (defaults or {}):
        raw["gpu"] = _accelerator(alive)
    return ClusterSpec.from_dict({k: v for k, v in raw.items() if v is not None})


def _accelerator(resources: list[dict[str, float]]) -> str | None:
    # Ray advertises the GPU model as a resource named "accelerator_type:A100".
    names = {k.split(":", 1)[1] for r in resources for k in r if k.startswith("accelerator_type:")}
    return ",".join(sorted(names)) or None


def discover_cluster(
    defaults: dict[str, Any] | None = None,
    *,
    use_gpu: bool | None = None,
    cpus_per_worker: float = 1.0,
) -> ClusterSpec:
    """The live Ray cluster's shape (Ray must be initialized), with `defaults` for the network."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("discover_cluster needs a connected Ray: call ray.init() first")
    return spec_from_nodes(ray.nodes(), defaults, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker)


# ---------------------------------------------------------------------------------------------
# probe-network: measure all-reduce on the live cluster and fit the network model to it


def probe_placements(cluster: ClusterSpec) -> list[Placement]:
    """What a probe measures, as the cluster allows: one node with all its GPUs (the intra-node
    links), 2 nodes x 1 GPU (the NIC alone), 2 nodes x all GPUs (the NIC shared by a node)."""
    g = cluster.gpus_per_node
    todo = [Placement(1, g)] if g > 1 else []
    if cluster.nodes > 1:
        todo += [Placement(2, 1)] + ([Placement(2, g)] if g > 1 else [])
    return todo


def probe_network(
    address: str | None,
    sizes: list[int],
    out: Path | None,
    *,
    use_gpu: bool | None = None,
    cpus_per_worker: float = 1.0,
    placements: list[Placement] | None = None,
    repeats: int = 5,
    warmup: int = 2,
    timeout_s: float = constants.PROBE_TIMEOUT_S,
) -> ClusterSpec:
    """Measure all-reduce across the live cluster's workers, fit the network model, write `out`.

    One worker per GPU (NCCL) or CPU slot (gloo) runs torch.distributed all-reduces of each size
    in `sizes` (bytes) at each placement (default: `probe_placements`); the median over `repeats`
    of the slowest rank is recorded per size. What the nodes tell (GPU peer access, NIC speed,
    InfiniBand devices, addresses) sets the link kinds and the NIC line rate the file does not
    give; the samples are fitted (`calibrate_allreduce`), and the file holds the fit, its
    residuals, when it was measured, what was detected and assumed, and the samples as evidence.
    Figures already in `out` are kept where nothing was measured (`out` None: nothing is read or
    written). Connects to `address` unless Ray is up (None: a new embedded Ray on 127.0.0.1).
    """
    # The file's figures are read before Ray (and torch) are: a broken file is one line at once.
    existing = load_cluster(out).to_dict() if out is not None and Path(out).is_file() else None
    import ray

    from orchestrator.ray_session import connect_ray

    if not sizes or any(s <= 0 for s in sizes):
        raise UserError(f"sizes: must be a non-empty list of positive byte counts, got {sizes}")
    started = not ray.is_initialized()
    if started:
        connect_ray(address)
    try:
        gpu = _has_gpus() if use_gpu is None else use_gpu
        cluster = discover_cluster(existing, use_gpu=gpu, cpus_per_worker=cpus_per_worker)
        facts = node_facts(gpu=gpu, timeout_s=timeout_s)
        cluster, said = with_detected_links(cluster, facts, given=existing or {})
        measured: list[AllReduceSample] = []
        for placement in placements or probe_placements(cluster):
            if placement.gpus > 1:
                measured += _measure(placement, sizes, gpu=gpu, cpus_per_worker=cpus_per_worker,
                                     repeats=repeats, warmup=warmup, timeout_s=timeout_s)
        if not measured:
            raise UserError(f"probe-network: the cluster has one worker slot ({cluster.nodes} x "
                            f"{cluster.gpus_per_node}): there is no all-reduce to measure")
        fitted = calibrate_allreduce(cluster.replace(calibration=None), measured)
        spec = fitted.replace(allreduce_samples=tuple(measured),
                              calibration=fitted.calibration.replace(note="; ".join(said)))
        if out is not None:
            save_cluster(spec, out)
        return spec
    finally:
        if started:
            ray.shutdown()


def _has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def _measure(
    placement: Placement,
    sizes: list[int],
    *,
    gpu: bool,
    cpus_per_worker: float,
    repeats: int,
    warmup: int,
    timeout_s: float,
) -> list[AllReduceSample]:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    g = placement.gpus_per_node
    bundle = {"CPU": g * cpus_per_worker, **({"GPU": g} if gpu else {})}
    pg = placement_group([bundle] * placement.nodes,
                         strategy="STRICT_SPREAD" if placement.nodes > 1 else "PACK")
    if not pg.wait(timeout_seconds=timeout_s):
        remove_placement_group(pg)
        raise UserError(f"probe-network: the cluster cannot place {placement} workers "
                        f"({bundle} per node) within {timeout_s:g} s")
    worker_cls = ray.remote(_AllReduceWorker)
    workers = [
        worker_cls.options(
            num_cpus=cpus_per_worker, num_gpus=1 if gpu else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i // g),
        ).remote()
        for i in range(placement.gpus)
    ]
    try:
        hosts = ray.get([w.host.remote() for w in workers], timeout=timeout_s)
        # One machine: meet at a file, so nothing listens on a network interface.
        meet = (f"file://{tempfile.gettempdir()}/orchestrator-probe-{uuid.uuid4().hex}"
                if all(h.startswith("127.") for h in hosts) else ray.get(workers[0].tcp_address.remote()))
        ray.get([w.setup.remote(meet, rank, placement.gpus) for rank, w in enumerate(workers)], timeout=timeout_s)
        seconds = ray.get([w.run.remote(sizes, repeats, warmup) for w in workers], timeout=timeout_s)[0]
    finally:
        for w in workers:
            ray.kill(w)
        remove_placement_group(pg)
    return [AllReduceSample(bytes=size, nodes=placement.nodes, gpus_per_node=g, seconds=float(f"{s:.4g}"))
            for size, s in zip(sizes, seconds)]


class _AllReduceWorker:
    """One rank of the probe (a Ray actor): times torch.distributed all-reduces."""

    def host(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def tcp_address(self) -> str:
        """A rendezvous on this node's cluster address (multi-host clusters only)."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return f"tcp://{host}:{s.getsockname()[1]}"

    def setup(self, meet: str, rank: int, world: int) -> None:
        import os

        import torch
        import torch.distributed as dist

        if meet.startswith("file://"):
            # gloo picks the interface of the host name, which may not reach 127.0.0.1 peers.
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        # A logical GPU without CUDA (tests, CPU-only hosts) is measured with gloo on the CPU.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # Ray shows each actor its one GPU as device 0; saying so spares NCCL a guess (and a hang).
        pinned = {"device_id": torch.device("cuda", 0)} if self.device == "cuda" else {}
        dist.init_process_group("nccl" if self.device == "cuda" else "gloo", init_method=meet, rank=rank,
                                world_size=world, **pinned)
        dist.barrier()  # connections open lazily: keep that out of the first size's timings

    def run(self, sizes: list[int], repeats: int, warmup: int) -> list[float]:
        import torch
        import torch.distributed as dist

        medians = []
        for size in sizes:
            x = torch.ones(max(1, size // 4), dtype=torch.float32, device=self.device)
            times = []
            for i in range(warmup + repeats):
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(x)
                if self.device == "cuda":
                    torch.cuda.synchronize()
                elapsed = torch.tensor([time.perf_counter() - start], device=self.device)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step waits for the slowest
                if i >= warmup:
                    times.append(float(elapsed))
            medians.append(statistics.median(times))
        dist.destroy_process_group()
        return medians


# ---------------------------------------------------------------------------------------------
# A live cluster's calibration, measured once and cached by the cluster's fingerprint


# 4 KiB .. 16 MiB in 16x steps: enough to separate latency from bandwidth, quick to measure.
QUICK_PROBE_SIZES = [4 * 1024, 64 * 1024, 1024 * 1024, 16 * 1024 * 1024]


def cluster_fingerprint(nodes: list[dict[str, Any]]) -> str:
    """A short stable id of a Ray cluster's hardware (pure): alive node count, GPU types, node
    addresses and resources. Another node, another GPU type or another host: another id."""
    alive = sorted((n.get("NodeManagerAddress", ""), int(n.get("Resources", {}).get("GPU", 0)),
                    int(n.get("Resources", {}).get("CPU", 0))) for n in nodes if n.get("Alive"))
    gpus = sorted({k for n in nodes if n.get("Alive") for k in n.get("Resources", {}) if k.startswith("accelerator_type:")})
    blob = json.dumps({"nodes": alive, "gpus": gpus})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def calibrated_live_cluster(cache_dir: str | Path, *, use_gpu: bool | None = None, cpus_per_worker: float = 1.0,
                            sizes: list[int] | None = None) -> ClusterSpec:
    """The connected Ray cluster's calibrated spec: from `cache_dir` when this cluster (by its
    fingerprint) was probed before, else probed now (`probe_network`, quick sizes) and cached.
    Its shape is always the live one at `cpus_per_worker` (a probe at another worker size measured
    the same network); one worker slot has no all-reduce to measure: its uncalibrated spec."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("calibrated_live_cluster needs a connected Ray: call ray.init() first")
    gpu = _has_gpus() if use_gpu is None else use_gpu
    live = discover_cluster(use_gpu=gpu, cpus_per_worker=cpus_per_worker)
    if live.gpus == 1:
        return live
    path = Path(cache_dir) / f"cluster-{cluster_fingerprint(ray.nodes())}-{'gpu' if gpu else 'cpu'}.yaml"
    cached = _cached_probe(path, live)
    if cached is not None:
        return cached.replace(nodes=live.nodes, gpus_per_node=live.gpus_per_node)
    # Measured afresh: a cache entry's figures are no user's word to keep, as a cluster file's are.
    spec = probe_network(None, sizes or QUICK_PROBE_SIZES, None, use_gpu=gpu, cpus_per_worker=cpus_per_worker,
                         repeats=3, warmup=1)
    try:
        save_cluster(spec, path, follow_links=False)  # a link planted here points at what it would clobber
    except UserError as exc:  # the job has its calibration; the next one probes again
        log.warning("the network probe is not cached: %s", exc)
    return spec


def _cached_probe(path: Path, live: ClusterSpec) -> ClusterSpec | None:
    """The calibrated spec cached at `path` for the `live` cluster; None when there is none, or
    (said in a warning) when it cannot be read or was measured on other GPUs (a file copied or
    planted under this fingerprint): a damaged cache is probed again, never the end of a job."""
    if not os.path.lexists(path):
        return None
    try:  # this user's own file only (a shared cache folder), never through a link
        cached = load_cluster(path, own_only=True)
    except UserError as exc:
        log.warning("probing the network again: the cached calibration is unusable: %s", exc)
        return None
    if cached.gpu != live.gpu:
        log.warning("probing the network again: %s: the cached calibration is of gpu %r, this cluster's is %r",
                    path, cached.gpu, live.gpu)
        return None
    return cached if cached.calibration is not None else None


def worker_slots(nodes: list[dict[str, Any]], *, use_gpu: bool, cpus_per_worker: float = 1.0) -> int:
    """How many training workers the alive nodes of `ray.nodes()` records can host (pure).

    A worker needs `cpus_per_worker` CPUs, and one GPU when `use_gpu`; unlike `spec_from_nodes`,
    nodes of any shape count, as Ray Train places workers wherever they fit.
    """
    total = 0
    for node in nodes:
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        slots = int(resources.get("CPU", 0) // cpus_per_worker)
        if use_gpu:
            slots = min(slots, int(resources.get("GPU", 0)))
        total += slots
    return total
