"""What a plan says in words: why it chose, what it assumed (in units), and what to watch."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from orchestrator.planner.model import COMPUTE_SPREAD, MIN_RESIDUALS, PerformanceModel
from orchestrator.planner.priors import PRIOR_WIDTH, describe_priors, link_kinds
from orchestrator.planner.results import Candidate
from orchestrator.planner.types import Calibration, ClusterSpec, Profile

if TYPE_CHECKING:
    from orchestrator.planner.search import Goal


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def usd(amount: float) -> str:
    """Cents, or two significant digits below a cent (a tiny budget still reads as a number)."""
    return f"{amount:,.2f} USD" if abs(amount) >= 0.01 or amount == 0 else f"{amount:.2g} USD"


def past(value: float, limit: float, show: Callable[[float], str]) -> str:
    """`value` as `show` writes it, with how far it is past `limit` where both would read alike
    ("87.1 h > deadline 87.1 h" said nothing)."""
    text = show(value)
    return text if text != show(limit) else f"{text} (+{100 * (value / limit - 1):.2g} %)"


def below(value: float, limit: float) -> str:
    """An efficiency below `limit` with the digits that show it is below (0.79996 is not "0.800")."""
    digits = 3
    while digits < 9 and float(f"{value:.{digits}f}") >= limit:
        digits += 1
    return f"{value:.{digits}f}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def explanation(goal: Goal, choice: Candidate, candidates: list[Candidate], model: PerformanceModel,
                warned: tuple[str, ...]) -> str:
    """One sentence on the choice and why, then the network's basis and any warning."""
    p, unit = choice.prediction, model.cluster.unit
    what = (f"Chose {plural(p.gpus, unit)} ({p.placement}), local batch {p.local_batch} x "
            f"{p.accumulation} accumulation")
    interval = f"80 % interval {p.throughput_low:,.0f}-{p.throughput_high:,.0f}"
    if goal.objective == "max_throughput":
        why = (f"the highest predicted throughput ({p.throughput:,.0f} samples/s, {interval}) at scaling "
               f"efficiency {p.efficiency:.3f} (pessimistic {p.efficiency_low:.3f}) >= {goal.min_efficiency:g}")
    elif goal.objective == "max_goodput":
        why = (f"the highest predicted goodput ({p.goodput:,.0f} samples/s at statistical efficiency "
               f"{p.statistical_efficiency:.2f}; throughput {interval}), scaling efficiency {p.efficiency:.3f}")
    else:
        price = (usd(p.cost) if p.cost is not None
                 else f"{p.gpus / p.goodput * 1e6 / 3600:.3g} {unit}-hours per million samples")
        why = f"the lowest predicted cost ({price})"
    if goal.deadline_s is not None:
        why += f", done in {duration(p.time_to_finish_s)} within the {duration(goal.deadline_s)} deadline"
    sentence = f"{what}: {why}{_runner_up(choice, candidates, unit)}."
    basis = "Network calibrated" if model.cluster.calibration else "Network from uncalibrated priors"
    return " ".join([sentence, f"{basis} ({model.kinds.intra} / {model.kinds.inter}).", *warned])


def _runner_up(choice: Candidate, candidates: list[Candidate], unit: str) -> str:
    """What the next larger GPU (worker) count would have given, when the planner passed it over."""
    gpus = choice.prediction.gpus
    larger = [c for c in candidates if c.prediction.gpus > gpus and not c.eligible]
    if not larger:
        return ""
    nxt = min(larger, key=lambda c: (c.prediction.gpus, -c.prediction.throughput))
    return f"; at {nxt.prediction.gpus} {unit}s, {nxt.reason}"


def warnings(profile: Profile, cluster: ClusterSpec) -> tuple[str, ...]:
    """A profile measured on other hardware than the cluster's predicts that hardware's compute."""
    gpu = cluster.gpu or "GPUs"
    if profile.on_cpu and not cluster.is_cpu:
        return (f"Warning: the profile was measured on the CPU ({profile.device}) but the cluster has {gpu}: "
                f"compute times are the CPU's; profile on the cluster's GPU for a real plan.",)
    if not profile.on_cpu and cluster.is_cpu:
        return (f"Warning: the profile was measured on {profile.device} but the cluster runs CPU workers: "
                f"compute times are the GPU's.",)
    return ()


def assumptions(goal: Goal, model: PerformanceModel) -> tuple[str, ...]:
    """Everything the plan rests on that the user did not measure or say, in units."""
    cluster, kinds, unit = model.cluster, model.kinds, model.cluster.unit
    links = list(kinds.assumed) or [f"links as given: {kinds.intra} inside nodes, {kinds.inter} between nodes"]
    cal = cluster.calibration
    network = describe_calibration(cal, unit=unit) if cal else describe_priors(cluster, kinds)
    r = model.residuals
    if r is not None:
        interval = (f"80 % interval from the calibration's {r.method} residuals (n={r.n}): multi-{unit} step "
                    f"times {_percent(r.low)} to {_percent(r.high)}")
        unfitted = [f"{kind} x/{PRIOR_WIDTH[kind]:g}" for kind, level in ((kinds.intra, "intra_GBps"),
                                                                          (kinds.inter, "inter_GBps"))
                    if level not in cal.fitted]
        interval += f"; levels it did not fit keep the prior width ({', '.join(unfitted)})" if unfitted else ""
    else:
        few = (f" (the calibration's {cal.residuals.n} residuals are fewer than {MIN_RESIDUALS})"
               if cal is not None and cal.residuals is not None else "")
        interval = (f"80 % interval from prior widths{few}: network time within x/{PRIOR_WIDTH[kinds.intra]:g} "
                    f"({kinds.intra}) and x/{PRIOR_WIDTH[kinds.inter]:g} ({kinds.inter}), compute "
                    f"within {COMPUTE_SPREAD:.0%}")
    batch = (f"global batch held at {goal.global_batch} at every {unit} count (local batch = "
             f"{goal.global_batch} / {unit}s, split into accumulation where it does not fit)"
             if goal.global_batch else
             "global batch not held: each placement tries the profiled local batches (give the job's "
             "global batch to hold it, as `orchestrator run` does)")
    price = cluster.gpu_hour_cost
    cost = (f"cost at {price:g} USD per {unit}-hour (gpu_hour_cost)" if price is not None
            else f"no gpu_hour_cost: cost is counted in {unit}-hours")
    floor = ("scaling efficiency floor checked against the interval's pessimistic end"
             if goal.objective == "max_throughput" else
             f"objective {goal.objective}: no scaling efficiency floor (min_efficiency {goal.min_efficiency:g} "
             "holds for max_throughput only)")
    return (*links, network, interval, batch, cost, floor)


def describe_calibration(cal: Calibration, *, unit: str = "GPU") -> str:
    """One line, in units; `unit`: the cluster's (`ClusterSpec.unit`)."""
    kept = " (the fit did not beat the figures given; they were kept)" if cal.kept_input else ""
    fitted = ", ".join(cal.fitted) or "nothing"
    return (f"network calibrated from {cal.source} ({plural(cal.observations, 'observation')}, "
            f"{plural(len(cal.models), 'model')}, {cal.measured_at}){kept}: {cal.intra_GBps:.3g} GB/s per {unit} "
            f"inside a node, {cal.inter_GBps:.3g} GB/s per node between nodes, {cal.latency_us:.3g}/"
            f"{cal.inter_latency_us:.3g} us per ring step, overlap {cal.overlap:.2f}, "
            f"straggler jitter {cal.jitter:.0%}; fitted: {fitted}" + (f" ({cal.note})" if cal.note else ""))


def above_line_rate(cluster: ClusterSpec) -> str | None:
    """One line where the calibration's achieved bandwidth exceeds the line rate the cluster
    declares for that link (no link carries more), naming both figures; None where it does not.
    Said, not clamped: either the declared line rate or the observations are wrong."""
    cal = cluster.calibration
    if cal is None:
        return None
    kinds = link_kinds(cluster)
    levels = ((cal.intra_GBps, cluster.intra_node_GBps, f"per {cluster.unit} inside a node", kinds.intra,
               "intra_node_GBps"),
              (cal.inter_GBps, cluster.inter_node_GBps, "per node between nodes", kinds.inter, "inter_node_GBps"))
    over = [f"{past(achieved, line, gbps)} {where} is above the {kind} line rate of {gbps(line)} ({field})"
            for achieved, line, where, kind, field in levels if achieved > line]
    if not over:
        return None
    return (f"warning: calibrated {'; '.join(over)}: no link carries more than its line rate; check the line "
            "rate the cluster file declares, or the observations (their profiles, placements and step times)")


def gbps(rate: float) -> str:
    return f"{rate:.3g} GB/s"


def _percent(log_ratio: float) -> str:
    return f"{(math.exp(log_ratio) - 1) * 100:+.0f} %"
