"""What a plan says: its reasons and explanation never contradict the numbers they show."""

from __future__ import annotations

from planner_util import make_cluster, make_profile

from orchestrator.planner import plan

SAMPLES = 10_000_000


def test_a_limit_missed_by_a_hair_does_not_read_as_met() -> None:
    # Before: "finishes in 87.1 h > deadline 87.1 h", "pessimistic efficiency 0.800 < 0.8".
    profile, cluster = make_profile(), make_cluster()
    free = plan(profile, cluster, objective="min_cost", total_samples=SAMPLES, global_batch=256)
    slow = max((c.prediction for c in free.candidates), key=lambda p: p.time_to_finish_s)
    deadline = slow.time_to_finish_s * (1 - 1e-4)
    late = plan(profile, cluster, objective="min_cost", total_samples=SAMPLES, global_batch=256, deadline_s=deadline)
    reason = next(c.reason for c in late.candidates if c.prediction.placement == slow.placement)
    took, limit = reason.removeprefix("finishes in ").split(" > deadline ")
    assert took != limit and "%" in took, reason
    dear = max((c.prediction for c in free.candidates), key=lambda p: p.cost)
    over = plan(profile, cluster, objective="min_cost", total_samples=SAMPLES, global_batch=256,
                budget=dear.cost * (1 - 1e-4))
    reason = next(c.reason for c in over.candidates if c.prediction.placement == dear.placement)
    cost, limit = reason.removeprefix("costs ").split(" > budget ")
    assert cost != limit, reason

    table = plan(profile, cluster, global_batch=256, min_efficiency=0.05)
    edge = min((c.prediction for c in table.candidates if c.prediction.gpus > 1), key=lambda p: p.efficiency_low)
    floor = edge.efficiency_low + 4e-5
    shown = plan(profile, cluster, global_batch=256, min_efficiency=floor)
    reason = next(c.reason for c in shown.candidates if c.prediction.placement == edge.placement)
    value = float(reason.split()[2])
    assert value < floor and value == round(edge.efficiency_low, len(reason.split()[2]) - 2), (reason, floor)


def test_the_explanation_shows_efficiency_to_the_digits_of_its_pessimistic_end() -> None:
    # Before: "scaling efficiency 0.91 (pessimistic 0.912)": the pessimistic end read as the larger.
    chosen = plan(make_profile(), make_cluster(nodes=1, inter_link="none"), global_batch=256)
    p = chosen.choice
    assert f"scaling efficiency {p.efficiency:.3f} (pessimistic {p.efficiency_low:.3f})" in chosen.explanation


def test_an_objective_without_an_efficiency_floor_says_the_floor_is_not_applied() -> None:
    # max_goodput chose 0.753 efficiency under min_efficiency 0.9 and said nothing of the floor.
    chosen = plan(make_profile(gradient_noise_scale=5000), make_cluster(), objective="max_goodput",
                  min_efficiency=0.9, total_samples=SAMPLES)
    assert chosen.choice.efficiency < 0.9
    assert ("objective max_goodput: no scaling efficiency floor (min_efficiency 0.9 holds for max_throughput only)"
            in chosen.assumptions)
