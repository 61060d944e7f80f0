"""Interconnect-aware priors, node contention, the bucket overlap and the prediction interval:
pure unit tests, no processes, milliseconds each."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.errors import UserError
from orchestrator.planner import (
    DDP_BUCKET_BYTES,
    ClusterSpec,
    Profile,
    plan,
    predict,
    ring_allreduce_s,
)
from orchestrator.planner.priors import LINK_SHARE, PRIOR_WIDTH, SOCKET_FLOWS_PER_NODE, TCP_FLOW_GBps, link_kinds


def profile(**overrides: Any) -> Profile:
    data: dict[str, Any] = {
        "version": 1, "model": "toy", "device": "A10", "param_count": 25_000_000, "grad_bytes": 100_000_000,
        "samples": [{"local_batch": 32, "step_time_s": 0.040, "optimizer_s": 0.004},
                    {"local_batch": 64, "step_time_s": 0.070, "optimizer_s": 0.004}],
        "max_local_batch": 64,
    }
    return Profile.from_dict({**data, **overrides})


def cluster(**overrides: Any) -> ClusterSpec:
    return ClusterSpec.from_dict({"nodes": 2, "gpus_per_node": 4, "intra_node_GBps": 16, "inter_node_GBps": 12.5,
                                  **overrides})


def bus_GBps(c: ClusterSpec, nodes: int, gpus: int) -> float:
    """The achieved bus bandwidth the model uses, read back from the all-reduce time."""
    ranks, nbytes = nodes * gpus, 1e12  # large enough that latency does not matter
    return 2 * (ranks - 1) / ranks * nbytes / ring_allreduce_s(c, nodes=nodes, gpus_per_node=gpus, nbytes=nbytes) / 1e9


@pytest.mark.parametrize(("raw", "intra", "inter"), [
    ({"intra_link": "nvlink", "inter_link": "infiniband"}, "nvlink", "infiniband"),
    ({"intra": "NVLink", "inter": "IB"}, "nvlink", "infiniband"),
    ({"intra_node_link": "pcie_host_staged", "inter_node_link": "Ethernet"}, "pcie-host-staged", "ethernet"),
    ({"intra": "PCIe", "inter": "RoCE"}, "pcie", "roce"),
    ({"intra": "NVLink4", "inter": "HDR"}, "nvlink", "infiniband"),
    ({"intra": "PCIe Gen4 x16", "inter": "RoCEv2"}, "pcie", "roce"),
    ({"intra": "PCI-E", "inter": "100GbE"}, "pcie", "ethernet"),
    ({"intra": "pcie5", "inter": "InfiniBand NDR400"}, "pcie", "infiniband"),
    ({"intra": "NVSwitch", "inter": "10 GbE"}, "nvlink", "ethernet"),
    ({"intra": "NVLink 3.0", "inter": "10 Gigabit Ethernet"}, "nvlink", "ethernet"),
    ({"intra": "PCIe (no P2P)", "inter": "RoCE2"}, "pcie-host-staged", "roce"),
])
def test_link_kinds_and_their_spellings(raw: dict[str, str], intra: str, inter: str) -> None:
    c = cluster(**raw)
    assert (c.intra_link, c.inter_link) == (intra, inter)
    assert ClusterSpec.from_dict(c.to_dict()) == c  # written back under the field names
    assert link_kinds(c).assumed == ()


def test_an_unknown_link_kind_is_one_line() -> None:
    with pytest.raises(UserError, match=r"^cluster\.intra_link: must be one of .*nvlink.*got 'copper'$"):
        cluster(intra_link="copper")
    with pytest.raises(UserError, match=r"^cluster\.inter_link: must be one of .*infiniband.*got 'efa'$"):
        cluster(inter_link="EFA")  # its own transport: no prior of ours describes it
    for twins in ({"intra": "nvlink", "intra_link": "pcie"}, {"intra": "nvlink", "intra_node_link": "pcie"}):
        with pytest.raises(UserError, match=r"^cluster\.intra(_node_link)?: another name for intra_link, which is given "
                                            r"under another name too; keep one$"):
            cluster(**twins)
    # "none" between nodes with two nodes was planned as a free, certain link
    with pytest.raises(UserError, match=r"^cluster\.inter_link: none \(no link between nodes\) needs nodes: 1, got nodes: 2"):
        cluster(inter_link="none")
    assert cluster(nodes=1, inter_link="none").inter_link == "none"


def test_link_kinds_inferred_from_line_rates_and_said_so() -> None:
    kinds = link_kinds(cluster(intra_node_GBps=300, inter_node_GBps=25))
    assert (kinds.intra, kinds.inter) == ("nvlink", "infiniband")
    kinds = link_kinds(cluster())
    assert (kinds.intra, kinds.inter) == ("pcie", "ethernet")
    result = plan(profile(), cluster())
    assert any("intra-node link assumed pcie" in a for a in result.assumptions)
    assert any("inter-node link assumed ethernet" in a for a in result.assumptions)
    assert "uncalibrated priors (pcie / ethernet)" in result.explanation


def test_achieved_bandwidth_follows_the_link_kind() -> None:
    nvlink = cluster(intra_node_GBps=300, intra_link="nvlink")
    assert bus_GBps(nvlink, 1, 8) == pytest.approx(300 * LINK_SHARE["nvlink"], rel=1e-4)
    pcie, staged = cluster(intra_link="pcie"), cluster(intra_link="pcie-host-staged")
    assert bus_GBps(pcie, 1, 4) == pytest.approx(16 * LINK_SHARE["pcie"], rel=1e-4)
    assert bus_GBps(staged, 1, 4) == pytest.approx(bus_GBps(pcie, 1, 4) / 2, rel=1e-4)
    # across nodes the node's NIC carries the ring for all its GPUs: the same bus bandwidth at 2x1 and 2x4
    ib = cluster(intra_node_GBps=300, inter_node_GBps=25, inter_link="infiniband")
    assert bus_GBps(ib, 2, 1) == pytest.approx(bus_GBps(ib, 2, 4)) == pytest.approx(25 * 0.96, rel=1e-4)


def test_ethernet_is_capped_by_tcp_flows_unless_link_efficiency_says_otherwise() -> None:
    fast = cluster(inter_node_GBps=12.5, inter_link="ethernet")  # 100 GbE
    assert bus_GBps(fast, 2, 1) == pytest.approx(SOCKET_FLOWS_PER_NODE * TCP_FLOW_GBps, rel=1e-4)
    assert bus_GBps(fast, 2, 1) < 12.5 / 5  # far below the line rate
    slow = cluster(inter_node_GBps=1.25, inter_link="ethernet")  # 10 GbE: the wire, not TCP, limits
    assert bus_GBps(slow, 2, 1) == pytest.approx(1.25 * LINK_SHARE["ethernet"], rel=1e-4)
    told = cluster(inter_node_GBps=12.5, inter_link="ethernet", link_efficiency=0.8)
    assert bus_GBps(told, 2, 1) == pytest.approx(10.0, rel=1e-4)


def test_the_last_bucket_is_exposed_and_a_slow_network_cannot_hide() -> None:
    one_bucket = profile(grad_bytes=DDP_BUCKET_BYTES // 2)
    p = predict(one_bucket, cluster(), nodes=1, gpus_per_node=4, local_batch=64)
    assert p.exposed_comm_s == pytest.approx(p.comm_s)  # one bucket: ready only when backward ends
    many = profile(grad_bytes=8 * DDP_BUCKET_BYTES)
    fast = predict(many, cluster(intra_link="nvlink", intra_node_GBps=300), nodes=1, gpus_per_node=4, local_batch=64)
    assert fast.exposed_comm_s == pytest.approx(fast.comm_s / 8)  # the others hide behind backward
    slow = predict(many, cluster(intra_node_GBps=0.5), nodes=1, gpus_per_node=4, local_batch=64)
    backward = 2 / 3 * (0.070 - 0.004)
    assert slow.exposed_comm_s == pytest.approx(slow.comm_s - backward * 7 / 8)
    assert slow.bound == "communication" and slow.step_time_s == pytest.approx(slow.compute_s + slow.exposed_comm_s)


@pytest.mark.parametrize("kind", [{"intra_link": "pcie"}, {"intra_link": "nvlink", "intra_node_GBps": 300}])
def test_a_larger_gradient_never_predicts_a_faster_step(kind: dict[str, Any]) -> None:
    # DDP fills full 25 MiB buckets and leaves the rest to the last one: one byte past a multiple of
    # the cap adds a one-byte bucket behind a full one; it must not shrink the exposed all-reduce.
    c = cluster(**kind)
    sizes = sorted({int(f * DDP_BUCKET_BYTES) + d for f in (0.5, 1, 1.5, 2, 3, 7.9, 8) for d in (-1, 0, 1)})
    steps = [predict(profile(grad_bytes=size), c, nodes=2, gpus_per_node=4, local_batch=64) for size in sizes]
    for smaller, larger in zip(steps, steps[1:]):
        assert larger.step_time_s >= smaller.step_time_s and larger.exposed_comm_s >= smaller.exposed_comm_s
    past = predict(profile(grad_bytes=DDP_BUCKET_BYTES + 1), c, nodes=1, gpus_per_node=4, local_batch=64)
    full = predict(profile(grad_bytes=DDP_BUCKET_BYTES), c, nodes=1, gpus_per_node=4, local_batch=64)
    assert past.exposed_comm_s >= full.exposed_comm_s  # the full bucket is ready only at the very end


def test_node_samples_scale_compute_with_gpus_per_node() -> None:
    contended = profile(node_samples=[{"gpus_per_node": 2, "local_batch": 64, "step_time_s": 0.077},
                                      {"gpus_per_node": 4, "local_batch": 64, "step_time_s": 0.105}])
    free = cluster(intra_node_GBps=1e6, inter_node_GBps=1e6, latency_us=0, link_efficiency=1.0)
    compute = [predict(contended, free, nodes=1, gpus_per_node=g, local_batch=64).compute_s for g in (1, 2, 3, 4)]
    assert compute[0] == pytest.approx(0.070)
    assert compute[1] == pytest.approx(0.077) and compute[3] == pytest.approx(0.105)
    assert compute[2] == pytest.approx((0.077 + 0.105) / 2)  # interpolated in g
    wider = free.replace(gpus_per_node=8)
    assert predict(contended, wider, nodes=1, gpus_per_node=8, local_batch=64).compute_s == pytest.approx(0.105)
    assert predict(profile(), free, nodes=1, gpus_per_node=4, local_batch=64).compute_s == pytest.approx(0.070)


def test_a_version_1_profile_with_and_without_node_samples_reads() -> None:
    raw = profile().to_dict()
    assert "node_samples" not in raw and raw["version"] == 1
    with_nodes = profile(node_samples=[{"gpus_per_node": 4, "local_batch": 64, "step_time_s": 0.1}])
    assert Profile.from_dict(json.loads(json.dumps(with_nodes.to_dict()))) == with_nodes
    with pytest.raises(UserError, match=r"^profile\.node_samples\[0\]\.gpus_per_node: must be > 0, got 0$"):
        profile(node_samples=[{"gpus_per_node": 0, "local_batch": 64, "step_time_s": 0.1}])


def test_the_interval_widens_with_the_link_kind_and_holds_the_point() -> None:
    p = profile()
    for kind in ("nvlink", "pcie", "pcie-host-staged"):
        c = cluster(intra_link=kind, intra_node_GBps=300 if kind == "nvlink" else 16)
        x = predict(p, c, nodes=1, gpus_per_node=4, local_batch=64)
        assert x.step_time_low_s < x.step_time_s < x.step_time_high_s
        assert x.efficiency_low < x.efficiency < x.efficiency_high
        assert x.throughput_low < x.throughput < x.throughput_high
    narrow = predict(p, cluster(intra_link="nvlink"), nodes=1, gpus_per_node=4, local_batch=64)
    wide = predict(p, cluster(intra_link="pcie-host-staged"), nodes=1, gpus_per_node=4, local_batch=64)
    assert PRIOR_WIDTH["nvlink"] < PRIOR_WIDTH["pcie-host-staged"]
    assert narrow.efficiency_low / narrow.efficiency > wide.efficiency_low / wide.efficiency
    alone = predict(p, cluster(), nodes=1, gpus_per_node=1, local_batch=64)
    assert alone.efficiency_low == alone.efficiency == pytest.approx(1.0)  # no network, no doubt on scaling


def test_an_uncalibrated_slow_network_gets_a_cautious_choice() -> None:
    # At the point estimate 2 nodes pass the floor; at the pessimistic end of ethernet's wide prior they do not.
    p = profile(grad_bytes=20_000_000)
    c = cluster(inter_node_GBps=3.125)  # 25 GbE
    floor = 0.7
    result = plan(p, c, min_efficiency=floor)
    passed_over = [x for x in result.candidates if x.prediction.gpus > result.workers and not x.eligible]
    assert any(x.prediction.efficiency >= floor > x.prediction.efficiency_low for x in passed_over)
    assert result.choice.efficiency_low >= floor
    assert "pessimistic" in result.explanation
