"""Unit tests of the performance model and planner: pure, no processes, milliseconds each. Their
files and fields are in test_planner_files.py."""

from __future__ import annotations

import pytest
from planner_util import make_cluster, make_profile

from orchestrator.errors import UserError
from trainers.batching import split_global_batch
from orchestrator.planner import (
    BACKWARD_FRACTION,
    DDP_BUCKET_BYTES,
    AllReduceSample,
    ClusterSpec,
    Placement,
    Profile,
    placement_for,
    placements,
    plan,
    predict,
    ring_allreduce_s,
)

def step(p: Profile, c: ClusterSpec, nodes: int, per_node: int, batch: int = 64) -> float:
    return predict(p, c, nodes=nodes, gpus_per_node=per_node, local_batch=batch).step_time_s


# --- the model: limits ---------------------------------------------------------------------


@pytest.mark.parametrize("batch", [32, 64, 128])
def test_one_gpu_is_the_profile(batch: int) -> None:
    profile = make_profile()
    measured = next(s.step_time_s for s in profile.samples if s.local_batch == batch)
    p = predict(profile, make_cluster(), nodes=1, gpus_per_node=1, local_batch=batch)
    assert p.step_time_s == pytest.approx(measured, rel=1e-12)
    assert p.comm_s == 0 and p.throughput == pytest.approx(batch / measured)
    assert p.bound == "compute" and p.fits_memory


@pytest.mark.parametrize("field", ["intra_node_GBps", "inter_node_GBps"])
@pytest.mark.parametrize("value", [0, -5])
def test_zero_or_negative_bandwidth_rejected(field: str, value: float) -> None:
    with pytest.raises(UserError, match=rf"cluster\.{field}: must be > 0, got {value}"):
        make_cluster(**{field: value})
    # built in code, not from YAML, the spec checks itself all the same
    with pytest.raises(UserError, match=rf"cluster\.{field}: must be > 0, got {value}"):
        make_cluster().replace(**{field: value})


@pytest.mark.parametrize("placement", [(1, 2), (1, 8), (2, 1), (2, 8), (4, 4)])
def test_more_bandwidth_is_never_slower(placement: tuple[int, int]) -> None:
    profile = make_profile(grad_bytes=2_000_000_000)
    slow = make_cluster()
    for fast in (
        slow.replace(intra_node_GBps=slow.intra_node_GBps * 2),
        slow.replace(inter_node_GBps=slow.inter_node_GBps * 2),
        slow.replace(latency_us=0.0),
    ):
        assert step(profile, fast, *placement) <= step(profile, slow, *placement)
    assert step(profile, slow.replace(intra_node_GBps=1e6, inter_node_GBps=1e6, latency_us=0),
                *placement) == pytest.approx(step(profile, slow, 1, 1), rel=1e-3)


def test_step_time_interpolates_and_grows_with_batch() -> None:
    profile, cluster = make_profile(), make_cluster()
    times = [step(profile, cluster, 1, 1, b) for b in (8, 16, 32, 48, 64, 96, 128)]
    assert times == sorted(times)
    assert step(profile, cluster, 1, 1, 48) == pytest.approx((0.040 + 0.070) / 2)
    # below the ladder: never faster per sample than the smallest rung, never slower than it
    assert 0.040 * 8 / 32 <= step(profile, cluster, 1, 1, 8) <= 0.040


def test_communication_grows_with_workers_and_nodes() -> None:
    profile, cluster = make_profile(), make_cluster()
    comm = [predict(profile, cluster, nodes=1, gpus_per_node=g, local_batch=64).comm_s
            for g in (1, 2, 4, 8)]
    assert comm[0] == 0 and comm == sorted(comm)
    # crossing nodes over a 25 GB/s NIC costs more than staying on 300 GB/s NVLink
    one_node = predict(profile, cluster, nodes=1, gpus_per_node=8, local_batch=64)
    two_nodes = predict(profile, cluster, nodes=2, gpus_per_node=4, local_batch=64)
    assert two_nodes.comm_s > one_node.comm_s
    assert two_nodes.efficiency < one_node.efficiency <= 1


def test_ring_allreduce_formula() -> None:
    # nccl-tests' bus bandwidth: a ring moves 2(P-1)/P x S over its slowest link, a GPU's NVLink
    # inside a node, the node's NIC (carrying the ring for all its GPUs) across nodes
    cluster = make_cluster(latency_us=0, link_efficiency=1.0)
    assert ring_allreduce_s(cluster, nodes=1, gpus_per_node=8, nbytes=3e9) == pytest.approx(
        2 * 7 / 8 * 3e9 / 300e9)
    assert ring_allreduce_s(cluster, nodes=4, gpus_per_node=8, nbytes=3e9) == pytest.approx(
        2 * 31 / 32 * 3e9 / 25e9)
    # latency_us: per ring step, 2(P-1) steps per all-reduce, once per message
    slow = make_cluster(latency_us=10, link_efficiency=1.0)
    extra = (ring_allreduce_s(slow, nodes=4, gpus_per_node=8, nbytes=3e9, messages=3)
             - ring_allreduce_s(cluster, nodes=4, gpus_per_node=8, nbytes=3e9, messages=3))
    assert extra == pytest.approx(3 * 2 * 31 * 10e-6)



@pytest.mark.parametrize("kwargs, message", [
    ({"messages": 0}, "ring_allreduce_s.messages: must be > 0, got 0"),  # was a ZeroDivisionError
    ({"nbytes": float("nan")}, "ring_allreduce_s.nbytes: must be a finite number, got nan"),  # was a nan
    ({"nodes": -2}, "ring_allreduce_s.nodes: must be > 0, got -2"),  # was a negative time
    ({"gpus_per_node": 2.5}, "ring_allreduce_s.gpus_per_node: must be an integer, got 2.5"),
])
def test_ring_allreduce_arguments_are_checked(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UserError) as raised:
        ring_allreduce_s(make_cluster(), **{"nodes": 2, "gpus_per_node": 8, "nbytes": 1e9, **kwargs})
    assert str(raised.value) == message


def test_throughput_scales_when_communication_is_cheap() -> None:
    profile = make_profile(grad_bytes=1_000_000)
    cluster = make_cluster()
    rates = [predict(profile, cluster, nodes=n, gpus_per_node=8, local_batch=128).throughput
             for n in (1, 2, 4)]
    assert rates == sorted(rates) and rates[-1] > 3.8 * rates[0]


def test_overlap_hides_communication_shorter_than_backward() -> None:
    profile = make_profile()
    cluster = make_cluster()
    p = predict(profile, cluster, nodes=1, gpus_per_node=8, local_batch=128)
    t_bwd = BACKWARD_FRACTION * (0.130 - 0.004)
    assert p.comm_s < t_bwd
    assert p.compute_s < p.step_time_s < p.compute_s + p.comm_s


def test_measured_allreduce_samples_replace_the_spec() -> None:
    profile = make_profile(grad_bytes=DDP_BUCKET_BYTES // 2)
    samples = [{"bytes": b, "nodes": 1, "gpus_per_node": 4, "seconds": s}
               for b, s in ((2**20, 0.001), (2**22, 0.004), (2**26, 0.050))]
    cluster = make_cluster(allreduce_samples=samples)
    at = predict(profile, cluster, nodes=1, gpus_per_node=4, local_batch=64)
    # interpolated linearly in bytes between the two rungs (exact for latency + bytes / bandwidth)
    half = DDP_BUCKET_BYTES // 2
    assert at.comm_s == pytest.approx(0.004 + (half - 2**22) / (2**26 - 2**22) * 0.046)
    exact = predict(profile.replace(grad_bytes=2**22), cluster, nodes=1, gpus_per_node=4,
                    local_batch=64)
    assert exact.comm_s == pytest.approx(0.004)
    # noise that makes a small message slower than a larger one is not believed
    noisy = make_cluster(allreduce_samples=[{**samples[0], "seconds": 0.010}, *samples[1:]])
    small = predict(profile.replace(grad_bytes=2**20), noisy, nodes=1, gpus_per_node=4,
                    local_batch=64)
    assert small.comm_s == pytest.approx(0.004)
    # a placement without samples falls back to the spec figures
    spec = predict(profile, make_cluster(), nodes=1, gpus_per_node=8, local_batch=64)
    assert predict(profile, cluster, nodes=1, gpus_per_node=8, local_batch=64).comm_s == spec.comm_s


def test_samples_that_agree_with_the_formula_change_no_prediction() -> None:
    # probe-network's sizes (1 KiB..64 MiB, 4x apart) timed exactly as the model would: the table
    # must give back the formula at every bucket size between them, so placements stay in order.
    cluster = make_cluster(nodes=4, gpus_per_node=8, intra_node_GBps=16.0, inter_node_GBps=3.125,
                           intra_link="pcie", inter_link="ethernet")
    samples = [{"bytes": 4**k * 1024, "nodes": n, "gpus_per_node": g,
                "seconds": ring_allreduce_s(cluster, nodes=n, gpus_per_node=g, nbytes=4**k * 1024)}
               for n, g in ((1, 8), (2, 1), (2, 8)) for k in range(9)]
    probed = cluster.replace(allreduce_samples=tuple(AllReduceSample.from_dict(x) for x in samples))
    for grad_bytes in (10**6, 5 * 10**6, 10**8, 1_000_000_007):
        profile = make_profile(grad_bytes=grad_bytes)
        for nodes in (1, 2, 3, 4):
            spec = predict(profile, cluster, nodes=nodes, gpus_per_node=8, local_batch=128)
            table = predict(profile, probed, nodes=nodes, gpus_per_node=8, local_batch=128)
            assert table.step_time_s == pytest.approx(spec.step_time_s, rel=1e-9)


def test_data_loading_bounds_the_step() -> None:
    profile = make_profile(data_samples_per_s=500.0)
    p = predict(profile, make_cluster(), nodes=1, gpus_per_node=8, local_batch=128)
    assert p.bound == "data" and p.step_time_s == pytest.approx(128 / 500)
    assert p.throughput == pytest.approx(8 * 500)


def test_a_batch_too_large_for_memory_becomes_accumulation() -> None:
    profile = make_profile()
    p = predict(profile, make_cluster(), nodes=1, gpus_per_node=1, local_batch=384)
    assert not p.fits_memory and (p.local_batch, p.accumulation) == (128, 3)
    assert p.step_time_s == pytest.approx(3 * (0.130 - 0.004) + 0.004)
    split = split_global_batch(100, workers=1, max_local_batch=64)
    assert (split.local_batch, split.accumulation) == (50, 2)
    prime = split_global_batch(97, workers=1, max_local_batch=64)  # only micro-batches of 1 divide it
    assert (prime.local_batch, prime.accumulation) == (1, 97)


def test_a_cluster_or_profile_too_large_to_plan_in_seconds_is_refused_in_one_line() -> None:
    with pytest.raises(UserError, match=r"^cluster\.nodes: 10,000,000 nodes x 8 GPUs is 80,000,000 GPUs; "
                                        r"the planner plans up to 65,536$"):
        make_cluster(nodes=10_000_000)
    assert make_cluster(nodes=8192).gpus == 65_536
    ladder = [{"local_batch": b, "step_time_s": 0.001 * b} for b in range(1, 1001)]
    with pytest.raises(UserError, match=r"^profile\.samples: at most 256 local batches, got 1,000$"):
        make_profile(samples=ladder, max_local_batch=1000)


def test_a_huge_global_batch_is_split_without_trying_every_accumulation() -> None:
    # The split looks at most min(max_local_batch, sqrt(batch)) candidates: a batch of 10**12
    # (or a prime just above it) would otherwise try ~10**10 accumulations one by one.
    assert split_global_batch(10**12, workers=8, max_local_batch=128) == \
        split_global_batch(10**12, workers=8, max_local_batch=128, accumulation=976_562_500)
    prime = 10**12 + 39
    assert split_global_batch(prime, workers=1, max_local_batch=prime).accumulation == 1
    assert split_global_batch(prime, workers=1, max_local_batch=prime - 1).local_batch == 1
    assert split_global_batch(3 * 999_983, workers=1, max_local_batch=2_000_000).local_batch == 999_983
    chosen = plan(make_profile(), make_cluster(), global_batch=10**12).choice
    assert chosen.global_batch == 10**12 and chosen.local_batch == 128
    with pytest.raises(UserError, match=r"^plan\.global_batch: must be <= 2\*\*53, got 9007199254740993$"):
        plan(make_profile(), make_cluster(), global_batch=2**53 + 1)


def test_statistical_efficiency_and_goodput() -> None:
    profile = make_profile(gradient_noise_scale=1000.0)
    p = predict(profile, make_cluster(), nodes=1, gpus_per_node=8, local_batch=128)
    assert p.global_batch == 1024
    assert p.statistical_efficiency == pytest.approx((1000 + 128) / (1000 + 1024))
    assert p.goodput == pytest.approx(p.throughput * p.statistical_efficiency)
    no_noise = predict(make_profile(), make_cluster(), nodes=1, gpus_per_node=8, local_batch=128)
    assert no_noise.statistical_efficiency == 1.0 and no_noise.goodput == no_noise.throughput


# --- the planner ---------------------------------------------------------------------------


def test_placements_cover_every_uniform_shape() -> None:
    cluster = make_cluster(nodes=128, gpus_per_node=8)
    assert len(placements(cluster)) == 1024
    assert all(p.gpus <= 12 for p in placements(cluster, max_gpus=12))
    assert placement_for(cluster, 12) == Placement(2, 6)
    assert placement_for(cluster, 8) == Placement(1, 8)
    with pytest.raises(UserError, match="resources.workers"):
        placement_for(cluster, 2000)


def test_max_throughput_uses_every_gpu_when_communication_is_cheap() -> None:
    result = plan(make_profile(grad_bytes=1_000_000), make_cluster())
    assert result.workers == 32 and result.choice.local_batch == 128
    assert "32 GPUs" in result.explanation and result.explanation.endswith(".")


def test_max_throughput_stops_at_the_efficiency_floor() -> None:
    profile = make_profile(grad_bytes=2_000_000_000)  # 500M fp32 parameters
    cluster = make_cluster()
    result = plan(profile, cluster, min_efficiency=0.8)
    assert result.choice.nodes == 1 and result.efficiency >= 0.8
    assert any(c.reason and "efficiency" in c.reason for c in result.candidates)
    looser = plan(profile, cluster, min_efficiency=0.3)  # crossing nodes costs efficiency
    assert looser.workers > result.workers and looser.throughput > result.throughput


def test_min_cost_prefers_one_gpu_unless_scaling_is_free() -> None:
    profile = make_profile(grad_bytes=2_000_000_000)
    cheap = plan(profile, make_cluster(intra_node_GBps=10), objective="min_cost",
                 total_samples=1_000_000)
    assert cheap.workers == 1
    assert cheap.cost == pytest.approx(cheap.time_to_finish_s / 3600 * 2.0)
    # with negligible communication, all of one node costs about the same as one GPU: faster wins
    free = plan(make_profile(grad_bytes=1000), make_cluster(), objective="min_cost")
    assert free.workers > 1


def test_min_cost_meets_the_deadline() -> None:
    profile = make_profile(grad_bytes=2_000_000_000)
    cluster = make_cluster()
    alone = plan(profile, cluster, objective="min_cost", total_samples=10_000_000)
    fastest = plan(profile, cluster, total_samples=10_000_000, min_efficiency=0.05)
    deadline = (alone.time_to_finish_s + fastest.time_to_finish_s) / 2
    rushed = plan(profile, cluster, objective="min_cost", total_samples=10_000_000,
                  deadline_s=deadline)
    assert rushed.time_to_finish_s <= deadline and rushed.workers > alone.workers
    assert rushed.cost > alone.cost
    with pytest.raises(UserError, match=r"^deadline: no placement finishes within"):
        plan(profile, cluster, objective="min_cost", total_samples=10_000_000, deadline_s=1.0)


def test_budget_caps_the_choice() -> None:
    profile = make_profile(grad_bytes=2_000_000_000)  # scaling is costly: more GPUs, more money
    cluster = make_cluster()
    spend = plan(profile, cluster, total_samples=50_000_000, min_efficiency=0.1)
    thrift = plan(profile, cluster, total_samples=50_000_000, objective="min_cost")
    budget = (spend.cost + thrift.cost) / 2
    capped = plan(profile, cluster, total_samples=50_000_000, min_efficiency=0.1, budget=budget)
    assert capped.cost <= budget < spend.cost
    assert thrift.workers <= capped.workers < spend.workers
    with pytest.raises(UserError, match=r"^budget: no placement fits within 1e-09 USD; the cheapest \(1 GPU\) costs"):
        plan(profile, cluster, total_samples=50_000_000, budget=1e-9)
    with pytest.raises(UserError, match=r"within 0\.002 s; the fastest \(\d+ GPUs\) needs 0\.\d*[1-9]"):
        plan(profile, cluster, objective="min_cost", total_samples=100, deadline_s=0.002)
    with pytest.raises(UserError, match=r"plan\.total_samples: required"):
        plan(profile, cluster, budget=10.0)
    with pytest.raises(UserError, match=r"cluster\.gpu_hour_cost: required"):
        plan(profile, make_cluster(gpu_hour_cost=None), total_samples=1000, budget=10.0)


def test_max_goodput_trades_throughput_for_statistical_efficiency() -> None:
    noisy_free = make_profile(grad_bytes=1_000_000, gradient_noise_scale=1e9)
    cluster = make_cluster(nodes=16)
    big = plan(noisy_free, cluster, objective="max_goodput")
    assert big.workers == 128  # a huge noise scale: large batches lose nothing
    small_noise = noisy_free.replace(gradient_noise_scale=64.0)
    result = plan(small_noise, cluster, objective="max_goodput")
    fastest = plan(small_noise, cluster, objective="max_throughput")
    assert result.choice.global_batch < fastest.choice.global_batch
    assert result.choice.goodput >= fastest.choice.goodput


def test_a_global_batch_stays_constant() -> None:
    profile = make_profile()
    result = plan(profile, make_cluster(), global_batch=768)
    batches = {c.prediction.global_batch for c in result.candidates}
    assert batches == {768}
    assert all(768 % c.prediction.gpus == 0 for c in result.candidates)
    assert 5 not in {c.prediction.gpus for c in result.candidates}  # 768 / 5 is no integer
    one = next(c.prediction for c in result.candidates if c.prediction.gpus == 1)
    assert (one.local_batch, one.accumulation) == (128, 6)
    # strong scaling: the baseline is one GPU training the same global batch
    assert one.efficiency == pytest.approx(1.0)
    assert all(c.prediction.efficiency <= 1 + 1e-12 for c in result.candidates)


def test_a_fixed_accumulation_is_held_at_every_placement_as_the_loop_trains_it() -> None:
    # training.grad_accumulation 4: the loop trains global 768 on 2 GPUs as 96 x 4; the plan (and the
    # run's sizing) predicted 128 x 3, a split that never runs, and checked its floor on it.
    profile = make_profile()
    result = plan(profile, make_cluster(), global_batch=768, accumulation=4)
    for c in result.candidates:
        split = split_global_batch(768, workers=c.prediction.gpus, accumulation=4)
        assert (c.prediction.local_batch, c.prediction.accumulation) == (split.local_batch, 4)
    assert 1 not in {c.prediction.gpus for c in result.candidates}  # 192 x 4 is past max_local_batch 128
    # 64 over 32 GPUs x 4 trained 1 x 4 (global 128, and chosen for its doubled samples per step)
    small = plan(profile, make_cluster(), global_batch=64, accumulation=4, min_efficiency=0.1)
    assert {c.prediction.global_batch for c in small.candidates} == {64}
    assert 32 not in {c.prediction.gpus for c in small.candidates}
    with pytest.raises(UserError, match=r"^plan\.global_batch: 768 does not divide over any GPU count up to 1 "
                                        r"into 4 micro-batches of at most max_local_batch 128$"):
        plan(profile, make_cluster(), global_batch=768, accumulation=4, max_gpus=1)
    with pytest.raises(UserError, match=r"^plan\.accumulation: must be an integer 1 to 2\*\*31 or None, got 0$"):
        plan(profile, make_cluster(), global_batch=768, accumulation=0)


def test_one_gpu_is_the_baseline_even_where_the_batch_splits_badly() -> None:
    # 256 on a GPU that fits 96 trains as 64 x 4, slower per sample than 96 would: still one GPU's
    # efficiency (its own baseline), so a floor never excludes it.
    profile = make_profile(grad_bytes=100_000_000, max_local_batch=96,
                           samples=[{"local_batch": b, "step_time_s": 0.2 * (0.3 + 0.7 * b / 96)} for b in (32, 64, 96)])
    single = make_cluster(nodes=1, gpus_per_node=1)
    result = plan(profile, single, global_batch=256, min_efficiency=0.99)
    assert (result.choice.gpus, result.choice.local_batch, result.choice.accumulation) == (1, 64, 4)
    assert result.choice.efficiency == pytest.approx(1.0) and result.choice.efficiency_low == pytest.approx(1.0)


def test_a_deadline_missed_only_under_the_floor_names_the_floor() -> None:
    profile = make_profile(grad_bytes=100_000_000, samples=[
        {"local_batch": b, "step_time_s": 0.2 * (0.1 + 0.9 * b / 128)} for b in (32, 64, 128, 256)], max_local_batch=256)
    cluster = make_cluster(nodes=4, gpus_per_node=1, intra_node_GBps=16.0, inter_node_GBps=1.25,
                           intra_link="pcie", inter_link="ethernet")
    loose = plan(profile, cluster, total_samples=10_000_000, min_efficiency=0.1)
    deadline = loose.choice.time_to_finish_s * 1.01  # the whole cluster makes it, below the floor
    assert loose.choice.gpus == 4 and loose.choice.efficiency_low < 0.8
    with pytest.raises(UserError, match=r"^deadline: no placement at pessimistic efficiency >= 0\.8 \(min_efficiency\) "
                                        r"finishes within .*; the fastest \(\d GPUs?\) needs"):
        plan(profile, cluster, total_samples=10_000_000, deadline_s=deadline, min_efficiency=0.8)
    with pytest.raises(UserError, match=r"^deadline: no placement finishes within"):  # nothing could: no floor said
        plan(profile, cluster, total_samples=10_000_000, deadline_s=deadline / 2, min_efficiency=0.8)


def test_the_table_shows_the_chosen_row_and_the_floor_as_given() -> None:
    # At 4 GPUs the fastest split (1x4) misses a 0.985 floor that 4x1 meets: the table's row for 4
    # GPUs used to be 1x4, so no row was the one chosen.
    profile = make_profile(grad_bytes=2_000_000_000, max_local_batch=256, samples=[
        {"local_batch": b, "step_time_s": t, "optimizer_s": 0.005}
        for b, t in ((32, 0.06), (64, 0.11), (128, 0.21), (256, 0.41))])
    cluster = make_cluster(nodes=4, gpus_per_node=4, intra_node_GBps=70, inter_node_GBps=25,
                           intra_link="pcie-host-staged", inter_link="infiniband")
    result = plan(profile, cluster, min_efficiency=0.985, global_batch=1024)
    rows = [c.prediction for c in result.best_per_gpu_count()]
    assert result.choice in rows and len(rows) == len({p.gpus for p in rows})
    others = [c for c in result.candidates if c.prediction.gpus == result.choice.gpus and c.prediction != result.choice]
    assert any(c.prediction.throughput > result.choice.throughput for c in others)  # the case this guards
    assert f"(pessimistic {result.choice.efficiency_low:.3f}) >= 0.985;" in result.explanation


def test_bad_plan_arguments_name_the_argument() -> None:
    with pytest.raises(UserError, match=r"^objective: must be one of"):
        plan(make_profile(), make_cluster(), objective="fastest")
    with pytest.raises(UserError, match=r"^plan\.min_efficiency: must be <= 1"):
        plan(make_profile(), make_cluster(), min_efficiency=1.5)
    with pytest.raises(UserError, match=r"^plan\.global_batch: must be > 0, got -4"):
        plan(make_profile(), make_cluster(), global_batch=-4)
    with pytest.raises(UserError, match=r"^plan\.deadline_s: must be a finite number, got inf"):
        plan(make_profile(), make_cluster(), deadline_s=float("inf"), total_samples=1000)
    with pytest.raises(UserError, match=r"^plan\.min_efficiency: must be a number, got None$"):
        plan(make_profile(), make_cluster(), min_efficiency=None)


@pytest.mark.parametrize("name", ["nodes", "gpus_per_node", "local_batch", "accumulation"])
def test_a_required_predict_argument_given_none_is_one_line(name: str) -> None:
    given = {"nodes": 2, "gpus_per_node": 4, "local_batch": 64, "accumulation": 1, name: None}
    with pytest.raises(UserError, match=rf"^predict\.{name}: must be an integer, got None$"):
        predict(make_profile(), make_cluster(), **given)


def test_a_long_string_argument_is_shown_cut_in_a_short_line() -> None:
    with pytest.raises(UserError, match=r"^predict\.nodes: must be an integer, got 'xxxx.*\.\.\. \(5,002 characters\)$") as err:
        predict(make_profile(), make_cluster(), nodes="x" * 5000, gpus_per_node=1, local_batch=64)
    assert len(str(err.value)) < 200
    with pytest.raises(UserError, match=r"^objective: must be one of .*\(5,002 characters\)$"):
        plan(make_profile(), make_cluster(), objective="x" * 5000)


def test_planning_1024_gpus_considers_every_placement() -> None:
    result = plan(make_profile(), make_cluster(nodes=128, gpus_per_node=8),
                  total_samples=100_000_000)
    assert len(result.candidates) == 1024
    assert {c.prediction.placement for c in result.candidates} == set(
        placements(make_cluster(nodes=128, gpus_per_node=8)))
