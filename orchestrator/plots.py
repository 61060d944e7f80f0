"""Pictures of a Plan: the scaling plot (PNG) and the candidate table (rich).

matplotlib is used through its object API on an Agg canvas: no pyplot, no global backend state,
safe in a driver that has a display or none.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from orchestrator.files import cannot_write
from orchestrator.planner import Candidate, Plan
from orchestrator.planner.explain import plural


def scaling_plot(plan: Plan, path: str | Path) -> Path:
    """Predicted throughput and scaling efficiency against GPU count (the best placement at each
    count) with their ~80 % intervals shaded, the efficiency floor and the choice marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = [c.prediction for c in plan.best_per_gpu_count()]
    gpus = [p.gpus for p in rows]
    marker = 3 if len(rows) <= 64 else 0
    fig = Figure(figsize=(7, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.fill_between(gpus, [p.throughput_low for p in rows], [p.throughput_high for p in rows], color="tab:blue",
                    alpha=0.15, lw=0, label="throughput, 80 % interval")
    ax.plot(gpus, [p.throughput for p in rows], "o-", color="tab:blue", ms=marker, label="throughput")
    ax.plot([plan.choice.gpus], [plan.choice.throughput], "*", color="tab:red", ms=16,
            label=f"choice: {plural(plan.choice.gpus, plan.unit)} ({plan.choice.placement})")
    ax.set_xlabel("GPUs" if plan.unit == "GPU" else "workers (CPU slots)")
    ax.set_ylabel("predicted throughput (samples/s)", color="tab:blue")
    if len(gpus) > 1 and gpus[-1] / gpus[0] >= 16:
        # log-log: linear scaling is a straight line, and 1..1024 GPUs stay readable
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no tick at 1.2 GPUs
    eff = ax.twinx()
    eff.fill_between(gpus, [p.efficiency_low for p in rows], [min(p.efficiency_high, 1.05) for p in rows],
                     color="tab:green", alpha=0.12, lw=0)
    eff.plot(gpus, [p.efficiency for p in rows], "s--", color="tab:green", ms=marker, label="scaling efficiency")
    eff.axhline(plan.min_efficiency, color="tab:green", lw=0.8, ls=":", label=f"floor {plan.min_efficiency:g}")
    eff.set_ylabel("scaling efficiency", color="tab:green")
    eff.set_ylim(0, 1.05)
    handles = ax.get_legend_handles_labels()[0] + eff.get_legend_handles_labels()[0]
    # below the axes: curves can run anywhere inside them
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)
    ax.set_title(plot_title(plan), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    except OSError as exc:
        raise cannot_write(path, exc) from None
    return path


def plot_title(plan: Plan) -> str:
    """What was planned where: the model, the device it was profiled on, the cluster's GPUs."""
    device = plan.device or "unknown device"
    cpu = plan.unit == "worker"
    target = "CPU workers" if cpu else (plan.gpu or "GPUs")
    mismatch = " - a CPU profile: compute is the CPU's" if device.lower().startswith("cpu") and not cpu else ""
    return f"{plan.model} on {target}: {plan.objective}\nprofiled on {device}{mismatch}"


def plan_table(plan: Plan, *, max_rows: int = 24) -> Table:
    """The best candidate at each GPU count; past `max_rows` counts, powers of two, the largest
    count and the choice."""
    rows = plan.best_per_gpu_count()
    if len(rows) > max_rows:
        keep = {rows[-1].prediction.gpus, plan.choice.gpus}
        rows = [c for c in rows if c.prediction.gpus in keep or _power_of_two(c.prediction.gpus)]
    # Text, never markup: a model name or a calibration note from a file may hold '[/]' or '[red]'.
    table = Table(title=Text(f"{plan.model}: {plan.objective}"), caption=Text(plan.explanation))
    for name in (f"{plan.unit}s", "placement", "batch x accum", "step (ms)", "80 % (ms)", "samples/s", "efficiency",
                 "pessimistic", "goodput", "time", "cost (USD)", "bound", "note"):
        left = name in ("placement", "batch x accum", "bound", "note")
        table.add_column(name, justify="left" if left else "right", no_wrap=name != "note")
    for c in rows:
        chosen = c.prediction == plan.choice
        table.add_row(*map(Text, _cells(c, chosen, plan.global_batch)), style="bold green" if chosen else None)
    return table


def _cells(c: Candidate, chosen: bool, global_batch: int | None) -> list[str]:
    p = c.prediction
    batch = f"{p.local_batch} x {p.accumulation}"
    if global_batch:  # why the local batch is what it is: the held global batch over the GPUs
        batch += f" ({global_batch}/{p.gpus})"
    return [
        str(p.gpus),
        str(p.placement),
        batch,
        f"{p.step_time_s * 1e3:,.1f}",
        f"{p.step_time_low_s * 1e3:,.1f}-{p.step_time_high_s * 1e3:,.1f}",
        f"{p.throughput:,.0f}",
        f"{p.efficiency:.2f}",
        f"{p.efficiency_low:.2f}",
        f"{p.goodput:,.0f}",
        "-" if p.time_to_finish_s is None else _hours(p.time_to_finish_s),
        "-" if p.cost is None else f"{p.cost:,.2f}",
        p.bound,
        "chosen" if chosen else (c.reason or ""),
    ]


def print_plan(console: Console, plan: Plan) -> None:
    """The table at its full width (never cut to the 80 columns rich assumes outside a terminal:
    `| tee`, `jobs logs`, CI), then what the plan assumed, one line each."""
    table = plan_table(plan)
    needed = console.measure(table, options=console.options.update_width(10_000)).maximum
    width = console.width
    console.width = max(width, needed)  # print() caps its own width argument at the console's
    try:
        console.print(table)
    finally:
        console.width = width
    console.print("Assumed:", highlight=False)
    for line in plan.assumptions:
        console.print(f"  - {line}", highlight=False, soft_wrap=True, markup=False)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds:.0f} s"


def _power_of_two(n: int) -> bool:
    return n & (n - 1) == 0
