"""What an uncalibrated cluster's network is assumed to achieve: named priors per link kind, each
with its public source. None was fitted to a benchmark; `calibrate` replaces them with figures
fitted to a cluster's own measurements.

A cluster file gives line rates (`intra_node_GBps` per GPU, `inter_node_GBps` per node, one
direction) and, optionally, what the links are (`intra_link`, `inter_link`). The priors turn
those into achieved bus bandwidths (nccl-tests' busbw, doc/PERFORMANCE.md: the per-rank
bandwidth an all-reduce reaches, comparable to the hardware bottleneck's line rate).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.planner.network import Network

if TYPE_CHECKING:
    from orchestrator.planner.types import ClusterSpec

INTRA_LINKS = ("nvlink", "pcie", "pcie-host-staged", "loopback", "shared-memory")
INTER_LINKS = ("infiniband", "roce", "ethernet", "loopback", "none")
# Other spellings a cluster file (or an external check) may use.
LINK_SYNONYMS = {
    "nvswitch": "nvlink", "nvl": "nvlink", "pci": "pcie", "pcie-p2p": "pcie", "p2p": "pcie",
    "pcie-no-p2p": "pcie-host-staged", "pcie-nop2p": "pcie-host-staged", "host-staged": "pcie-host-staged",
    "pcie-host": "pcie-host-staged", "shm": "shared-memory", "ib": "infiniband", "eth": "ethernet",
    "tcp": "ethernet", "socket": "ethernet", "lo": "loopback",
}

# --- achievable bus bandwidth as a share of the line rate ----------------------------------------
LINK_SHARE = {
    # NCCL src/graph/topo.h models one NVLink2/3 link at 20 GB/s (SM70_NVLINK_BW, SM80_NVLINK_BW) of
    # its 25 GB/s per direction, and src/graph/tuning.cc caps an A100 node's ring busbw at 235 of 300.
    "nvlink": 0.80,
    # NCCL src/graph/topo.cc rates a PCIe link at width x speed / 80: 75 % of the line rate
    # (Gen3 x16: 12 of 16 GB/s, topo.h PCI_BW 12.0).
    "pcie": 0.75,
    # Without peer-to-peer (NCCL_P2P_DISABLE, consumer GPUs, some VMs) NCCL's SHM transport stages
    # every chunk in pinned host memory: the sender's copy in and the receiver's copy out both cross
    # the CPU's host bridge. NCCL rates a path through the CPU at its interconnect (topo.h
    # BDW_QPI_BW 6.0 GB/s, i.e. 0.375 of a Gen3 x16 link): half the PCIe figure.
    "pcie-host-staged": 0.375,
    # NCCL topo.h NET_BW 12.0 GB/s for a 100 Gb/s (12.5 GB/s) NIC.
    "infiniband": 0.96,
    "roce": 0.96,  # RDMA over the same line rate: the same NCCL figure
    # TCP/IPv4 over a 1500-byte MTU: 1448 payload bytes per 1538 bytes on the wire.
    "ethernet": 1448 / 1538,
    # No line rate to derate: the figure in the file is taken as what is achieved.
    "loopback": 1.0, "shared-memory": 1.0, "none": 1.0,
}
# NCCL's socket transport opens NCCL_SOCKET_NTHREADS x NCCL_NSOCKS_PERTHREAD TCP flows per
# connection, 1 x 1 by default outside AWS and GCP, and its docs (env.html) advise 4 x 4 = 16 to
# fill a generic 100 Gb/s link: a planning figure of 100/16 = 6.25 Gb/s per TCP flow.
TCP_FLOW_GBps = 100 / 16 / 8
# Ring channels crossing one node's NIC: NCCL doubles its channels only above 25 GB/s of
# intra-node bandwidth (src/graph/search.cc ncclTopoDupChannels); PCIe/Ethernet nodes log
# "Channel 00/02", "Channel 01/02" (e.g. NVIDIA/nccl#428): two connections, one flow each.
SOCKET_FLOWS_PER_NODE = 2

# --- latency: NCCL src/graph/tuning.cc, ring / Simple protocol (large messages), microseconds -----
BASE_LATENCY_US = 8.4  # baseLat, per all-reduce call
HOP_LATENCY_US = {"nvlink": 3.4, "pcie": 5.7, "pcie-host-staged": 5.7, "infiniband": 14.0, "roce": 14.0,
                  "ethernet": 14.0,
                  # gloo over TCP loopback, not NCCL: a send/recv pair of syscalls per ring step.
                  # A guess (this project's CPU default before calibration existed).
                  "loopback": 50.0, "shared-memory": 50.0, "none": 0.0}

# --- overlap of the all-reduce with backward (network.py: the bucket queue) ----------------------
# NCCL runs each bucket's all-reduce on its own CUDA stream as soon as the bucket is full (Li et
# al., VLDB 2020, section 3.2.3): it may use the whole of backward. gloo reduces on CPU threads
# that backward needs as well; half of the rate is a judgement, which `calibrate` fits.
OVERLAP = {"gpu": 1.0, "cpu": 0.5}

# --- width of the prediction interval without calibration ---------------------------------------
# The network time may be this many times off either way (an ~80 % interval, a judgement): narrow
# where NCCL's model is known to hold (NVLink, InfiniBand), wide where what is achieved depends on
# what a cluster file does not say (P2P support, NUMA, TCP tuning, CPU load).
PRIOR_WIDTH = {"nvlink": 1.25, "pcie": 1.5, "pcie-host-staged": 2.0, "infiniband": 1.3, "roce": 1.5,
               "ethernet": 2.5, "loopback": 2.0, "shared-memory": 2.0, "none": 1.0}

# --- inferring link kinds from line rates when a file does not name them ------------------------
NVLINK_ABOVE_GBps = 64.0  # a PCIe Gen5 x16 link's one-direction rate; NVLink2 starts at 150
ETHERNET_UP_TO_GBps = 12.5  # 100 Gb/s; HDR InfiniBand and faster fabrics are above


# Generations, speeds and widths named with a kind (`NVLink4`, `PCIe Gen4 x16`, `HDR`, `RoCEv2`,
# `100GbE`): the kind is what the priors need; a line rate comes from the GBps fields.
LINK_PATTERNS = (
    (re.compile(r"nv(link|switch)-?(v|gen)?(\d+(\.\d+)?)?"), "nvlink"),
    (re.compile(r"pci-?e?(-?(gen|g)?-?\d(\.\d)?)?(-?x\d+)?"), "pcie"),
    (re.compile(r"((ib|infiniband)-?)?([fehnx]dr|qdr)(-?(ib|infiniband))?(-?\d+)?"), "infiniband"),
    (re.compile(r"roce-?(v?\d)?"), "roce"),
    (re.compile(r"(\d+(\.\d+)?-?(g|gb|gbit|gig|gigabit)-?(e|eth|ethernet)|gig-?e|gbe|tcp[-/]?ip)"), "ethernet"),
)


def normalize_link(value: object) -> object:
    """`NVLink`, `pcie_host_staged`, `IB`, `PCIe Gen4`, `RoCEv2`, `100GbE` ... -> the canonical
    names (others pass through, to be refused naming the kinds known)."""
    if not isinstance(value, str):
        return value
    name = value.strip().lower().replace("_", "-").replace(" ", "-").replace("(", "").replace(")", "")
    if name in LINK_SYNONYMS:
        return LINK_SYNONYMS[name]
    return next((kind for pattern, kind in LINK_PATTERNS if pattern.fullmatch(name)), name)


@dataclass(frozen=True, slots=True)
class LinkKinds:
    intra: str
    inter: str
    assumed: tuple[str, ...]  # one sentence per kind inferred rather than given


def link_kinds(cluster: ClusterSpec) -> LinkKinds:
    """The cluster's link kinds: as given, else inferred from the line rates (and said so)."""
    assumed = []
    intra = cluster.intra_link
    if intra is None:
        if cluster.is_cpu:
            intra, why = "loopback", "CPU workers (gpu: cpu) exchange gradients through gloo over TCP"
        elif cluster.intra_node_GBps > NVLINK_ABOVE_GBps:
            intra, why = "nvlink", f"intra_node_GBps {cluster.intra_node_GBps:g} > {NVLINK_ABOVE_GBps:g} GB/s"
        else:
            intra, why = "pcie", f"intra_node_GBps {cluster.intra_node_GBps:g} <= {NVLINK_ABOVE_GBps:g} GB/s"
        assumed.append(f"intra-node link assumed {intra} ({why})")
    inter = cluster.inter_link
    if inter is None:
        fast = cluster.inter_node_GBps > ETHERNET_UP_TO_GBps
        inter = "infiniband" if fast else "ethernet"
        word = ">" if fast else "<="
        assumed.append(f"inter-node link assumed {inter} (inter_node_GBps {cluster.inter_node_GBps:g} "
                       f"{word} {ETHERNET_UP_TO_GBps:g} GB/s)")
    return LinkKinds(intra, inter, tuple(assumed))


def prior_network(cluster: ClusterSpec, kinds: LinkKinds) -> Network:
    """Achieved figures from line rates and link kinds (module doc); `link_efficiency` and
    `latency_us`, when the file gives them, replace the priors they stand for."""
    intra = cluster.intra_node_GBps * _share(cluster, kinds.intra)
    inter = cluster.inter_node_GBps * _share(cluster, kinds.inter)
    if kinds.inter == "ethernet" and cluster.link_efficiency is None:
        inter = min(inter, SOCKET_FLOWS_PER_NODE * TCP_FLOW_GBps)
    if cluster.latency_us is not None:  # per ring step, every step alike
        base, intra_hop, inter_hop = 0.0, cluster.latency_us, cluster.latency_us
    else:
        base, intra_hop, inter_hop = BASE_LATENCY_US, HOP_LATENCY_US[kinds.intra], HOP_LATENCY_US[kinds.inter]
    return Network(intra_Bps=intra * 1e9, inter_Bps=inter * 1e9, base_s=base * 1e-6, intra_hop_s=intra_hop * 1e-6,
                   inter_hop_s=inter_hop * 1e-6, overlap=OVERLAP["cpu" if cluster.is_cpu else "gpu"])


def _share(cluster: ClusterSpec, kind: str) -> float:
    return LINK_SHARE[kind] if cluster.link_efficiency is None else cluster.link_efficiency


def prior_width(kinds: LinkKinds, *, nodes: int, gpus_per_node: int) -> float:
    """How far the network time may be off at a placement: the widest link it crosses."""
    widths = [PRIOR_WIDTH[kinds.intra]] if gpus_per_node > 1 else []
    widths += [PRIOR_WIDTH[kinds.inter]] if nodes > 1 else []
    return max(widths, default=1.0)


def describe_priors(cluster: ClusterSpec, kinds: LinkKinds) -> str:
    """One line, in units: what the uncalibrated model assumes the network achieves."""
    net = prior_network(cluster, kinds)
    share = ("link_efficiency " + f"{cluster.link_efficiency:g}" if cluster.link_efficiency is not None
             else f"{LINK_SHARE[kinds.intra]:.0%} / {LINK_SHARE[kinds.inter]:.0%} of line rate")
    flows = (f", capped at {SOCKET_FLOWS_PER_NODE} TCP flows x {TCP_FLOW_GBps:.2f} GB/s"
             if kinds.inter == "ethernet" and cluster.link_efficiency is None else "")
    return (f"network priors (uncalibrated): {kinds.intra} {net.intra_Bps / 1e9:.3g} GB/s per {cluster.unit}, "
            f"{kinds.inter} {net.inter_Bps / 1e9:.3g} GB/s per node ({share}{flows}), "
            f"{net.intra_hop_s * 1e6:.3g}/{net.inter_hop_s * 1e6:.3g} us per ring step, overlap {net.overlap:g}")
