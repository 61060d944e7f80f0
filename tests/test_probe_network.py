"""probe-network: measure all-reduce on a real multi-node Ray cluster, fit the network model,
cache the calibration per cluster fingerprint; and the pure helpers that read what nodes tell."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest

from orchestrator import cluster as clusters
from orchestrator.cluster import (
    calibrated_live_cluster,
    cluster_fingerprint,
    probe_network,
    probe_placements,
    probe_sizes,
)
from orchestrator.errors import UserError
from orchestrator.node_facts import nic_speed_gbps, rdma_kind, with_detected_links
from orchestrator.planner import ClusterSpec, Placement, load_cluster, predict, ring_allreduce_s

SIZES = [4 * 1024, 256 * 1024, 4 * 1024 * 1024]
MiB = 2**20


def test_probe_sizes_end_at_the_largest_message_asked_for() -> None:
    # `--max-mib 256` probed 64 MiB at most without a word; 3 probed 1 MiB.
    assert probe_sizes(64 * MiB) == [4**k * 1024 for k in range(9)]
    assert probe_sizes(256 * MiB)[-2:] == [64 * MiB, 256 * MiB]
    assert probe_sizes(3 * MiB)[-2:] == [MiB, 3 * MiB]
    assert probe_sizes(MiB)[-1] == MiB and probe_sizes(1024) == [1024]


@pytest.mark.slow
def test_probe_measures_and_fits_the_network(ray_cluster: Any, tmp_path: Path) -> None:
    out = tmp_path / "cluster.yaml"
    spec = probe_network(None, SIZES, out, use_gpu=False, placements=[Placement(1, 2), Placement(2, 1)],
                         repeats=3, warmup=1)
    assert load_cluster(out) == spec
    section = spec.calibration
    assert section.source == "probe-network" and section.measured_at.endswith("Z")
    assert {"intra_GBps", "inter_GBps"} <= set(section.fitted) and "overlap" in section.not_fitted
    assert section.residuals.method == "all-reduce" and section.residuals.n == 6
    assert {(s.nodes, s.gpus_per_node) for s in spec.allreduce_samples} == {(1, 2), (2, 1)}
    assert (spec.intra_link, spec.inter_link) == ("loopback", "loopback")  # every node is on 127.0.0.1
    assert "127.0.0.1" in section.note
    # The fit goes through the samples (the machine is shared: single small messages jitter).
    ratios = sorted(ring_allreduce_s(spec, nodes=s.nodes, gpus_per_node=s.gpus_per_node, nbytes=s.bytes) / s.seconds
                    for s in spec.allreduce_samples)
    assert 0.5 < ratios[len(ratios) // 2] < 2 and abs(section.residuals.median) < 0.7


@pytest.mark.slow
def test_a_live_cluster_is_probed_once_per_fingerprint(ray_cluster: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = clusters.probe_network

    def counted(*args: Any, **kwargs: Any) -> ClusterSpec:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(clusters, "probe_network", counted)
    first = calibrated_live_cluster(tmp_path, use_gpu=True, sizes=SIZES[:2])  # 2 nodes x 1 logical GPU
    again = calibrated_live_cluster(tmp_path, use_gpu=True)
    assert len(calls) == 1 and again == first
    assert (first.nodes, first.gpus_per_node) == (2, 1)
    assert first.calibration.not_fitted["intra_GBps"] == "no observation inside one node with 2 or more GPUs"
    assert predict_step(first) > 0


def test_the_live_shape_wins_over_the_cached_one_and_one_slot_probes_nothing(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The cache is per cluster fingerprint, not per worker size: a probe at 1 CPU per worker (2x2)
    # was planned as 2x2 for 2-CPU workers that fit 2x1. One worker slot has no all-reduce: probing
    # it failed the job ("there is no all-reduce to measure"), even with --workers 1.
    import ray

    from orchestrator.planner import save_cluster

    nodes = [node("127.0.0.1", gpus=0), node("127.0.0.2", gpus=0)]
    shape = {"now": (2, 1)}
    probes: list[Any] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(clusters, "discover_cluster", lambda **_: ClusterSpec(
        nodes=shape["now"][0], gpus_per_node=shape["now"][1], gpu="cpu", intra_node_GBps=1, inter_node_GBps=1))
    monkeypatch.setattr(clusters, "probe_network", lambda *a, **k: probes.append(a))
    probed = ClusterSpec(nodes=2, gpus_per_node=2, gpu="cpu", intra_node_GBps=1, inter_node_GBps=1)
    from orchestrator.planner import Observation, calibrate

    observed = [Observation(profile=load_profile(), nodes=2, gpus_per_node=g, local_batch=8, step_time_s=0.02 * g)
                for g in (1, 2)]
    save_cluster(calibrate(probed, observed), tmp_path / f"cluster-{cluster_fingerprint(nodes)}-cpu.yaml")
    spec = calibrated_live_cluster(tmp_path, use_gpu=False, cpus_per_worker=2)
    assert (spec.nodes, spec.gpus_per_node) == (2, 1) and spec.calibration is not None and not probes
    shape["now"] = (1, 1)
    alone = calibrated_live_cluster(tmp_path, use_gpu=False, cpus_per_worker=4)
    assert (alone.nodes, alone.gpus_per_node) == (1, 1) and alone.calibration is None and not probes


def load_profile() -> Any:
    from orchestrator.planner import Profile

    return Profile(model="m", device="cpu", param_count=10, grad_bytes=40, max_local_batch=8,
                   samples=[{"local_batch": 8, "step_time_s": 0.01}])


def predict_step(spec: ClusterSpec) -> float:
    from orchestrator.planner import Profile

    profile = Profile(model="m", device="cpu", param_count=10, grad_bytes=40, max_local_batch=8,
                      samples=[{"local_batch": 8, "step_time_s": 0.01}])
    return predict(profile, spec, nodes=2, gpus_per_node=1, local_batch=8).step_time_s


def node(address: str, gpus: int = 8, alive: bool = True, gpu_type: str = "A100") -> dict[str, Any]:
    return {"Alive": alive, "NodeManagerAddress": address,
            "Resources": {"CPU": 32, "GPU": gpus, f"accelerator_type:{gpu_type}": 1}}


def test_fingerprint_changes_with_nodes_gpus_and_addresses() -> None:
    base = [node("10.0.0.1"), node("10.0.0.2")]
    assert cluster_fingerprint(base) == cluster_fingerprint(list(reversed(base)))
    assert cluster_fingerprint(base) == cluster_fingerprint(base + [node("10.0.0.3", alive=False)])
    assert cluster_fingerprint(base) != cluster_fingerprint(base[:1])
    assert cluster_fingerprint(base) != cluster_fingerprint([node("10.0.0.1"), node("10.0.0.9")])
    assert cluster_fingerprint(base) != cluster_fingerprint([node("10.0.0.1", gpu_type="H100"), node("10.0.0.2")])


def test_probe_placements_as_the_cluster_allows() -> None:
    def spec(nodes: int, g: int) -> ClusterSpec:
        return ClusterSpec(nodes=nodes, gpus_per_node=g, intra_node_GBps=300, inter_node_GBps=25)

    assert probe_placements(spec(4, 8)) == [Placement(1, 8), Placement(2, 1), Placement(2, 8)]
    assert probe_placements(spec(1, 8)) == [Placement(1, 8)]
    assert probe_placements(spec(2, 1)) == [Placement(2, 1)]


def test_detected_links_and_what_was_assumed() -> None:
    gpus = ClusterSpec(nodes=2, gpus_per_node=8, intra_node_GBps=16, inter_node_GBps=1.25)
    facts = [{"address": "10.0.0.1", "nic_gbps": 100.0, "rdma": None, "peer_access": False},
             {"address": "10.0.0.2", "nic_gbps": 25.0, "rdma": None, "peer_access": False}]
    spec, said = with_detected_links(gpus, facts, given={})
    assert (spec.intra_link, spec.inter_link, spec.inter_node_GBps) == ("pcie-host-staged", "ethernet", 25 / 8)
    assert any("no GPU peer access" in s for s in said) and any("NIC 25 Gb/s" in s for s in said)
    ib = [{**f, "rdma": "infiniband", "peer_access": True} for f in facts]
    spec, said = with_detected_links(gpus, ib, given={"inter_node_GBps": 50})
    assert (spec.intra_link, spec.inter_link, spec.inter_node_GBps) == (None, "infiniband", 1.25)
    assert any("assumed from the line rate" in s for s in said)
    told, _ = with_detected_links(gpus.replace(inter_link="roce"), ib, given={"inter_link": "roce"})
    assert told.inter_link == "roce"  # the file's word stands


def test_nic_speed_and_rdma_devices(tmp_path: Path) -> None:
    stat = namedtuple("stat", "isup speed")
    stats = {"lo": stat(True, 0), "eth0": stat(True, 25000), "eth1": stat(False, 100000), "docker0": stat(True, 0)}
    assert nic_speed_gbps(stats) == 25.0
    assert nic_speed_gbps({"lo": stat(True, 0)}) is None
    assert rdma_kind(tmp_path / "absent") is None
    port = tmp_path / "mlx5_0" / "ports" / "1"
    port.mkdir(parents=True)
    (port / "link_layer").write_text("InfiniBand\n")
    assert rdma_kind(tmp_path) == "infiniband"
    (port / "link_layer").write_text("Ethernet\n")
    assert rdma_kind(tmp_path) == "roce"


def test_a_broken_output_file_is_refused_before_ray_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The figures of an existing -o file are kept, so it is read: a broken one was said only after
    an embedded Ray had started (~18 s here)."""
    import orchestrator.ray_session as session

    def no_ray(*_: Any, **__: Any) -> None:
        raise AssertionError("Ray was started before the output file was read")

    monkeypatch.setattr(session, "connect_ray", no_ray)
    out = tmp_path / "cluster.yaml"
    out.write_text("nodes: 1\ngpus_per_node: 2\nintra_node_GBps: .nan\ninter_node_GBps: 1\n")
    with pytest.raises(UserError, match=r"cluster\.yaml: cluster\.intra_node_GBps: must be finite"):
        probe_network(None, SIZES, out, use_gpu=False)


def _fake_live_cluster(monkeypatch: pytest.MonkeyPatch, nodes: list[dict[str, Any]], gpu: str) -> list[Any]:
    """Ray faked as a live cluster of `nodes` whose GPUs are `gpu`; returns the probes made (each
    answers a calibrated spec of that cluster)."""
    import ray

    from orchestrator.planner import Observation, calibrate

    live = ClusterSpec(nodes=2, gpus_per_node=1, gpu=gpu, intra_node_GBps=1, inter_node_GBps=1)
    observed = [Observation(profile=load_profile(), nodes=2, gpus_per_node=1, local_batch=8, step_time_s=0.03)]
    probes: list[Any] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(clusters, "discover_cluster", lambda **_: live)
    monkeypatch.setattr(clusters, "probe_network",
                        lambda *a, **k: probes.append(a) or calibrate(live, observed, source="probe-network"))
    return probes


@pytest.mark.parametrize("damage", ["nodes: [\n", "", "nodes: 2\ngpus_per_node: 1\nintra_no", "\x00\x01\x02",
                                    "nodes: 2\ngpus_per_node: 1\nintra_node_GBps: 1\ninter_node_GBps: 1\nold_key: 1\n"])
def test_a_damaged_cached_probe_is_a_warning_and_probed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture, damage: str) -> None:
    # A corrupt, truncated, empty or older-format cache entry failed the job ("not valid YAML",
    # exit 2), and the probe meant to replace it read the same file first and failed alike.
    nodes = [node("127.0.0.1", gpus=0), node("127.0.0.2", gpus=0)]
    probes = _fake_live_cluster(monkeypatch, nodes, "cpu")
    cached = tmp_path / f"cluster-{cluster_fingerprint(nodes)}-cpu.yaml"
    cached.write_text(damage)
    spec = calibrated_live_cluster(tmp_path, use_gpu=False)
    assert spec.calibration is not None and len(probes) == 1 and probes[0][2] is None  # the damaged file unread
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith(f"probing the network again: the cached calibration is unusable: "
                                                 f"{cached}: "), said
    assert load_cluster(cached).calibration == spec.calibration  # the new probe replaced it
    caplog.clear()
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert calibrated_live_cluster(blocked / "sub", use_gpu=False).calibration is not None  # a cache it cannot write
    assert [r.getMessage().split(": ", 1)[0] for r in caplog.records] == ["the network probe is not cached"]


def test_a_cached_probe_of_other_gpus_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    # The entry's name is the fingerprint, its content was never checked: an A100 cluster's NVLink
    # calibration, copied or planted under an H100 cluster's fingerprint, was used without a word.
    from orchestrator.planner import save_cluster

    nodes = [node("10.0.0.1", gpus=1, gpu_type="H100"), node("10.0.0.2", gpus=1, gpu_type="H100")]
    probes = _fake_live_cluster(monkeypatch, nodes, "H100")
    cached = tmp_path / f"cluster-{cluster_fingerprint(nodes)}-gpu.yaml"
    a100 = clusters.probe_network(None, SIZES, None).replace(gpu="A100", intra_link="nvlink")
    save_cluster(a100, cached)
    probes.clear()
    spec = calibrated_live_cluster(tmp_path, use_gpu=True)
    assert spec.gpu == "H100" and spec.intra_link is None and len(probes) == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"probing the network again: {cached}: the cached calibration is of gpu 'A100', this cluster's is 'H100'"]
    assert calibrated_live_cluster(tmp_path, use_gpu=True).gpu == "H100" and len(probes) == 1  # cached now


def test_a_link_planted_in_a_shared_probe_cache_is_not_used_nor_written_through(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # The probe's cache entry is named by a fingerprint anyone can compute: a link planted there
    # was read as this cluster's calibration, and a re-probe wrote through it to the link's target.
    from orchestrator.planner import save_cluster

    nodes = [node("127.0.0.1", gpus=0), node("127.0.0.2", gpus=0)]
    probes = _fake_live_cluster(monkeypatch, nodes, "cpu")
    victim = tmp_path / "victim.yaml"
    save_cluster(clusters.probe_network(None, SIZES, None).replace(inter_link="infiniband"), victim)
    before = victim.read_bytes()
    cached = tmp_path / f"cluster-{cluster_fingerprint(nodes)}-cpu.yaml"
    cached.symlink_to(victim)
    probes.clear()
    spec = calibrated_live_cluster(tmp_path, use_gpu=False)
    assert spec.inter_link is None and len(probes) == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"probing the network again: the cached calibration is unusable: {cached}: a symbolic link, not a file this "
        "program wrote"]
    assert victim.read_bytes() == before and not cached.is_symlink() and load_cluster(cached).inter_link is None
