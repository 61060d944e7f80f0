"""What each node of a live Ray cluster tells about its links (address, NIC speed, RDMA devices,
GPU peer access), and the cluster description those facts complete (`with_detected_links`, pure).
`probe-network` and `ClusterSpec` from a live cluster say what was detected and what assumed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.planner import ClusterSpec


def with_detected_links(cluster: ClusterSpec, facts: list[dict[str, Any]], *,
                        given: dict[str, Any]) -> tuple[ClusterSpec, list[str]]:
    """`cluster` with what the nodes told (pure): link kinds and the NIC line rate where the file
    did not give them; and one phrase per fact, detected or assumed."""
    said, changes = [], {}
    loopback = all(str(f.get("address", "")).startswith("127.") for f in facts)
    peers = [f["peer_access"] for f in facts if f.get("peer_access") is not None]
    if cluster.is_cpu:
        changes["intra_link"] = "loopback"
        said.append("detected CPU workers: gloo over TCP loopback inside a node")
    elif peers and not all(peers):
        changes["intra_link"] = "pcie-host-staged"
        said.append("detected no GPU peer access: NCCL stages through host memory")
    elif peers:
        said.append("detected GPU peer access; link kind (nvlink or pcie) assumed from the line rate")
    nics = [f["nic_gbps"] for f in facts if f.get("nic_gbps")]
    if loopback:
        changes["inter_link"] = "loopback"
        said.append("detected every node on 127.0.0.1: between nodes is loopback")
    else:
        kinds = {f.get("rdma") for f in facts}
        changes["inter_link"] = kinds.pop() if len(kinds) == 1 and None not in kinds else "ethernet"
        said.append(f"detected inter-node link {changes['inter_link']}")
        if nics and "inter_node_GBps" not in given:
            changes["inter_node_GBps"] = min(nics) / 8
            said.append(f"detected NIC {min(nics):g} Gb/s (the slowest node's fastest interface)")
    changes = {k: v for k, v in changes.items() if k not in given}  # the file's word stands
    return cluster.replace(**changes), said


def node_facts(*, gpu: bool, timeout_s: float) -> list[dict[str, Any]]:
    """What each alive node tells about itself (`_facts`), from a task pinned to it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    tasks = []
    for node in ray.nodes():
        gpus = int(node.get("Resources", {}).get("GPU", 0)) if gpu else 0
        if not node.get("Alive") or (gpu and not gpus):
            continue
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        tasks.append(ray.remote(_facts).options(num_cpus=0, num_gpus=gpus, scheduling_strategy=strategy).remote())
    return ray.get(tasks, timeout=timeout_s)


def _facts() -> dict[str, Any]:
    """This node: its address, fastest NIC (Gb/s), RDMA devices, and GPU peer access."""
    import ray

    return {"address": ray.util.get_node_ip_address(), "nic_gbps": nic_speed_gbps(),
            "rdma": rdma_kind(), "peer_access": gpu_peer_access()}


def nic_speed_gbps(stats: dict[str, Any] | None = None) -> float | None:
    """The fastest up, non-loopback interface's speed in Gb/s (psutil reports Mb/s; 0 = unknown)."""
    import psutil

    stats = psutil.net_if_stats() if stats is None else stats
    speeds = [s.speed for name, s in stats.items() if s.isup and s.speed > 0 and not name.startswith("lo")]
    return max(speeds) / 1000 if speeds else None


def rdma_kind(root: Path = Path("/sys/class/infiniband")) -> str | None:
    """`infiniband` or `roce` when the node has an RDMA device (its port's link layer), else None."""
    layers = sorted(root.glob("*/ports/*/link_layer")) if root.is_dir() else []
    if not layers:
        return None
    return "roce" if layers[0].read_text().strip().lower() == "ethernet" else "infiniband"


def gpu_peer_access() -> bool | None:
    """Whether every pair of this process's visible GPUs can reach each other directly (None
    without two GPUs)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return None
    return all(torch.cuda.can_device_access_peer(i, j) for i in range(count) for j in range(count) if i != j)
