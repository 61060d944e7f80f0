"""Pictures of a Plan: the scaling plot (PNG) and the candidate table (rich).

matplotlib is used through its object API on an Agg canvas: no pyplot, no global backend state,
safe in a driver that has a display or none.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from orchestrator.planner import Candidate, Plan


def scaling_plot(plan: Plan, path: str | Path) -> Path:
    """Predicted throughput and scaling efficiency against GPU count (the best placement at each
    count), the planner's choice marked; written as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = plan.best_per_gpu_count()
    gpus = [c.prediction.gpus for c in rows]
    marker = 3 if len(rows) <= 64 else 0
    fig = Figure(figsize=(7, 4.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(gpus, [c.prediction.throughput for c in rows], "o-", color="tab:blue", ms=marker,
            label="throughput")
    ax.plot([plan.choice.gpus], [plan.choice.throughput], "*", color="tab:red", ms=16,
            label=f"choice: {plan.choice.gpus} GPUs ({plan.choice.placement})")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("predicted throughput (samples/s)", color="tab:blue")
    if len(gpus) > 1 and gpus[-1] / gpus[0] >= 16:
        # log-log: linear scaling is a straight line, and 1..1024 GPUs stay readable
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    eff = ax.twinx()
    eff.plot(gpus, [c.prediction.efficiency for c in rows], "s--", color="tab:green", ms=marker,
             label="scaling efficiency")
    eff.axhline(plan.min_efficiency, color="tab:green", lw=0.8, ls=":")
    eff.set_ylabel("scaling efficiency", color="tab:green")
    eff.set_ylim(0, 1.05)
    handles = ax.get_legend_handles_labels()[0] + eff.get_legend_handles_labels()[0]
    # below the axes: curves can run anywhere inside them
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    ax.set_title(f"{plan.model} on {plan.gpu or 'GPUs'}: {plan.objective}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plan_table(plan: Plan, *, max_rows: int = 24) -> Table:
    """The best candidate at each GPU count; past `max_rows` counts, powers of two, the largest
    count and the choice."""
    rows = plan.best_per_gpu_count()
    if len(rows) > max_rows:
        keep = {rows[-1].prediction.gpus, plan.choice.gpus}
        rows = [c for c in rows if c.prediction.gpus in keep or _power_of_two(c.prediction.gpus)]
    table = Table(title=f"{plan.model}: {plan.objective}", caption=plan.explanation)
    for name in ("GPUs", "placement", "batch x accum", "step (ms)", "samples/s", "efficiency",
                 "goodput", "time", "cost", "bound", "note"):
        left = name in ("placement", "bound", "note")
        table.add_column(name, justify="left" if left else "right")
    for c in rows:
        chosen = c.prediction == plan.choice
        table.add_row(*_cells(c, chosen), style="bold green" if chosen else None)
    return table


def _cells(c: Candidate, chosen: bool) -> list[str]:
    p = c.prediction
    return [
        str(p.gpus),
        str(p.placement),
        f"{p.local_batch} x {p.accumulation}",
        f"{p.step_time_s * 1e3:,.1f}",
        f"{p.throughput:,.0f}",
        f"{p.efficiency:.2f}",
        f"{p.goodput:,.0f}",
        "-" if p.time_to_finish_s is None else _hours(p.time_to_finish_s),
        "-" if p.cost is None else f"{p.cost:,.2f}",
        p.bound,
        "chosen" if chosen else (c.reason or ""),
    ]


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds:.0f} s"


def _power_of_two(n: int) -> bool:
    return n & (n - 1) == 0
