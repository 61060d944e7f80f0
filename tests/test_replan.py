"""Unit tests of online re-planning (the resize decision on a refit cluster) and of the pure
helpers behind autoscaling and elastic restarts: no processes, milliseconds each."""

from __future__ import annotations

import pytest

from orchestrator.cluster import worker_slots
from orchestrator.driver.policies import GroupKind
from orchestrator.driver.recorder import Group
from orchestrator.driver.replan import observation, replan
from orchestrator.driver.sizing import Sizing
from orchestrator.planner import (
    ClusterSpec,
    Placement,
    Profile,
    decide_resize,
    plan,
    predict,
    refit,
)
from trainers.batching import split_global_batch

# A small CNN as profiled on one CPU worker: compute-bound, 120 kB of gradients.
PROFILE = Profile.from_dict({
    "version": 1, "model": "cnn", "device": "cpu", "param_count": 30_000, "grad_bytes": 120_000,
    "max_local_batch": 64,
    "samples": [{"local_batch": b, "step_time_s": t} for b, t in ((8, 0.002), (16, 0.003), (32, 0.005), (64, 0.009))],
})
CLUSTER = ClusterSpec(nodes=2, gpus_per_node=1, intra_node_GBps=2.0, inter_node_GBps=1.25, latency_us=50.0)
TWO = Placement(2, 1)


def steady(seconds: float, steps: int = 30) -> list[float]:
    """A worker group's step times: all alike (the planner's `refit` takes their median)."""
    return [seconds] * steps


def learned(profile: Profile, cluster: ClusterSpec, observed: float, *, rounds: int = 6) -> ClusterSpec:
    """The cluster after the driver's re-planning rounds on one group: each refit moves the network
    by a bounded factor, until one learns nothing new."""
    for _ in range(rounds):
        result = refit(profile, cluster, placement=TWO, local_batch=32, step_times=steady(observed))
        cluster = result.cluster
        if not result.changed:
            break
    return cluster


def test_one_refit_moves_the_network_by_a_bounded_factor_and_repeated_rounds_settle() -> None:
    fast = ClusterSpec(nodes=2, gpus_per_node=1, intra_node_GBps=100, inter_node_GBps=100, latency_us=1)
    first = refit(PROFILE, fast, placement=TWO, local_batch=32, step_times=steady(0.03))
    assert first.scale == 10.0 and first.changed == ("inter",) and "(bounded)" in first.reason
    settled = learned(PROFILE, fast, 0.03)
    final = refit(PROFILE, settled, placement=TWO, local_batch=32, step_times=steady(0.03))
    assert not final.changed
    assert predict(PROFILE, settled, nodes=2, gpus_per_node=1, local_batch=32).step_time_s == pytest.approx(0.03, rel=0.06)


def test_slow_network_resizes_to_fewer_workers_when_it_pays() -> None:
    fast = ClusterSpec(nodes=2, gpus_per_node=1, intra_node_GBps=100, inter_node_GBps=100, latency_us=1)
    assert plan(PROFILE, fast, global_batch=64, min_efficiency=0.7).workers == 2
    cluster = learned(PROFILE, fast, 0.03)
    decision = decide_resize(PROFILE, cluster, current=TWO, min_workers=1, max_workers=2, global_batch=64,
                             remaining_samples=64 * 1000, min_efficiency=0.7, margin=0.1, restart_cost_s=10)
    assert decision.resize and decision.workers == 1
    assert decision.gain > 0.1 and decision.saved_s > 0
    assert decision.reason.startswith("resize 2 -> 1 worker: 1 worker would give +")


def test_resize_needs_the_margin_the_payoff_and_the_range() -> None:
    cluster = learned(PROFILE, CLUSTER, 0.03)
    common = {"current": TWO, "global_batch": 64, "min_efficiency": 0.7}
    short = decide_resize(PROFILE, cluster, min_workers=1, max_workers=2, remaining_samples=64 * 20,
                          margin=0.1, restart_cost_s=60, **common)
    assert not short.resize and short.workers == 2 and "does not repay a 60 s restart" in short.reason
    greedy = decide_resize(PROFILE, cluster, min_workers=1, max_workers=2, remaining_samples=64 * 1000,
                           margin=100.0, restart_cost_s=0, **common)
    assert not greedy.resize and "within the 10000% margin" in greedy.reason
    floor = decide_resize(PROFILE, cluster, min_workers=2, max_workers=2, remaining_samples=64 * 1000,
                          margin=0.1, restart_cost_s=0, **common)
    assert not floor.resize and floor.workers == 2  # never below the configured minimum


def test_a_faster_network_than_assumed_grows_the_job() -> None:
    cluster = ClusterSpec(nodes=4, gpus_per_node=1, intra_node_GBps=0.01, inter_node_GBps=0.01, latency_us=5000)
    assert plan(PROFILE, cluster, global_batch=64, min_efficiency=0.5).workers == 1
    # Observed at 2 workers much faster than the pessimistic spec says: the refit grows to 4.
    cluster = learned(PROFILE, cluster, 0.0051)
    decision = decide_resize(PROFILE, cluster, current=TWO, min_workers=1, max_workers=4, global_batch=64,
                             remaining_samples=64 * 100_000, min_efficiency=0.5, margin=0.1, restart_cost_s=30)
    assert decision.resize and decision.workers == 4 and decision.reason.startswith("resize 2 -> 4 workers")


def test_the_workers_compute_only_steps_lack_the_optimizer_and_replan_adds_it() -> None:
    """`trainers.loop._compute_only_s` times forward and backward without sync, never the optimizer
    (that would train on the probe): a group whose compute is exactly as profiled must not read as
    faster compute, nor leave the optimizer's time to the network."""
    profile = Profile.from_dict({
        "version": 1, "model": "toy", "device": "A10", "param_count": 25_000_000, "grad_bytes": 100_000_000,
        "max_local_batch": 64, "samples": [{"local_batch": 32, "step_time_s": 0.040, "optimizer_s": 0.008},
                                           {"local_batch": 64, "step_time_s": 0.070, "optimizer_s": 0.008}]})
    cluster = ClusterSpec(nodes=2, gpus_per_node=4, intra_node_GBps=16, inter_node_GBps=12.5)
    for placement in (Placement(1, 1), Placement(2, 4)):
        truth = predict(profile, cluster, nodes=placement.nodes, gpus_per_node=placement.gpus_per_node, local_batch=64)
        group = Group(workers=placement.gpus, local_batch=64, accumulation=1, kind=GroupKind.FIRST,
                      compute_step_times=(truth.compute_s - 0.008,) * 30, placement=placement,
                      observed_step_time_s=truth.step_time_s, observed_steps=40, step_times=(truth.step_time_s,) * 40)
        sizing = Sizing(placement.gpus, 64, profile, cluster=cluster)
        result = replan(group, profile=profile, cluster=cluster, step=40, total_steps=1000, global_batch=64,
                        objective="max_throughput", min_efficiency=0.7, bounds=None, replan_enabled=True, resizes=0,
                        slots=placement.gpus)
        assert result.record["refit"]["changed"] == [], result.text
        assert result.text.startswith("step 40, 1 worker (1x1):" if placement.gpus == 1 else "step 40, 8 workers (2x4):")
        assert result.profile is profile and result.cluster is cluster
        seen = observation(sizing, group, run_id=None)
        assert seen is not None and seen["compute_step_time_s"] == pytest.approx(truth.compute_s)


def test_worker_slots_count_what_each_alive_node_can_host() -> None:
    nodes = [
        {"Alive": True, "Resources": {"CPU": 2.0}},  # a head without GPUs
        {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}},
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 4.0}},
        {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 8.0}},
        {"Alive": True, "Resources": {"CPU": 1.0, "GPU": 2.0}},  # CPU-bound: one worker
    ]
    assert worker_slots(nodes, use_gpu=True) == 1 + 4 + 1
    assert worker_slots(nodes, use_gpu=False, cpus_per_worker=2.0) == 1 + 1 + 4 + 0
    assert worker_slots([], use_gpu=True) == 0


@pytest.mark.parametrize(("workers", "expected"), [(1, (48, 1)), (2, (24, 1)), (3, (16, 1)), (4, (12, 1))])
def test_global_batch_holds_for_every_elastic_worker_count(workers: int, expected: tuple[int, int]) -> None:
    split = split_global_batch(48, workers=workers, max_local_batch=64)
    assert (split.local_batch, split.accumulation) == expected and split.global_batch == 48
    assert split_global_batch(48, workers=workers, max_local_batch=8).global_batch == 48


def test_the_workers_probe_gives_the_refit_enough_times_however_long_a_step_takes(monkeypatch) -> None:
    # A 2 s budget alone gave a 0.1 s step 19 times and a 0.165 s one 12: the refit then had no
    # compute to go on and put a slower compute on the network.
    import torch

    from orchestrator.planner import REFIT_MIN_STEPS
    from trainers import loop

    clock = [0.0]

    class Step:
        model = torch.nn.BatchNorm1d(3)

        def accumulate(self, micro, sync: bool) -> None:
            assert not sync
            clock[0] += 0.165

        def discard(self) -> None:
            pass

    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    times = loop._compute_only_s(Step(), [], torch.device("cpu"))
    assert loop.COMPUTE_PROBE_MIN >= REFIT_MIN_STEPS and len(times) == loop.COMPUTE_PROBE_MIN
    assert all(t == pytest.approx(0.165) for t in times)
    clock[0] = 0.0
    Step.accumulate = lambda self, micro, sync: clock.__setitem__(0, clock[0] + 0.01)
    assert len(loop._compute_only_s(Step(), [], torch.device("cpu"))) == loop.COMPUTE_PROBE_STEPS  # quick: more


@pytest.mark.parametrize("workers", [2, None])
def test_sizing_predicts_the_split_a_fixed_accumulation_trains(workers: int | None, monkeypatch) -> None:
    # global 64 on 2 workers with training.grad_accumulation 4: the loop trains 8 x 4, sizing
    # predicted (and the plan checked its floor on) 32 x 1.
    from orchestrator import profiler
    from orchestrator.config import validate
    from orchestrator.driver import sizing

    job = validate({"name": "job", "model": {"name": "mlp"},
                    "training": {"max_steps": 10, "global_batch_size": 64, "grad_accumulation": 4},
                    "data": {"path": "data", "features": {"column": "x", "dtype": "float32"}},
                    "resources": {"workers": workers or "auto", "min_efficiency": 0.1}})
    monkeypatch.setattr(sizing, "live_cluster", lambda job, use_gpu: CLUSTER)
    monkeypatch.setattr(profiler, "profile_job", lambda job, use_gpu, gpus_per_node: (PROFILE, True))
    sized = sizing.size_job(job, workers=workers, use_gpu=False, total_samples=640)
    chosen = sized.prediction
    expected = split_global_batch(64, workers=chosen.gpus, accumulation=4)
    assert (chosen.local_batch, chosen.accumulation) == (expected.local_batch, 4)
    decision = decide_resize(PROFILE, CLUSTER, current=TWO, min_workers=1, max_workers=2, global_batch=64,
                             remaining_samples=64 * 1000, min_efficiency=0.1, accumulation=4)
    assert (decision.current.local_batch, decision.current.accumulation) == (8, 4)
