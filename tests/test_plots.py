"""The scaling plot is a real PNG; the table renders every column."""

from __future__ import annotations

from pathlib import Path

from io import StringIO

from rich.console import Console

from orchestrator.planner import ClusterSpec, Profile, plan
from orchestrator.plots import plot_title, plan_table, print_plan, scaling_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plan(nodes: int = 4):
    profile = Profile.from_dict({
        "version": 1, "model": "toy", "device": "A100", "param_count": 10**8,
        "grad_bytes": 4 * 10**8, "max_local_batch": 64,
        "samples": [{"local_batch": 32, "step_time_s": 0.05},
                    {"local_batch": 64, "step_time_s": 0.09}],
    })
    cluster = ClusterSpec(nodes=nodes, gpus_per_node=8, gpu="A100", intra_node_GBps=300,
                          inter_node_GBps=25, gpu_hour_cost=3.0)
    return plan(profile, cluster, total_samples=10**7)


def test_scaling_plot_writes_a_png(tmp_path: Path) -> None:
    path = scaling_plot(_plan(), tmp_path / "plots" / "scaling.png")
    data = path.read_bytes()
    assert path.stat().st_size > 5000 and data.startswith(PNG_MAGIC)


def test_scaling_plot_of_a_large_cluster(tmp_path: Path) -> None:
    path = scaling_plot(_plan(nodes=128), tmp_path / "big.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_plan_table_marks_the_choice() -> None:
    result = _plan(nodes=128)
    table = plan_table(result)
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "chosen" in text and "samples/s" in text
    assert table.row_count <= 24 + 2


def test_printed_plan_is_never_cut_to_80_columns() -> None:
    buffer = StringIO()
    print_plan(Console(file=buffer, width=80), _plan())  # a pipe: rich assumes 80 columns
    text = buffer.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) > 80
    assert "cost (USD)" in text and "Assumed:" in text and "80 % interval" in text


def test_plot_title_says_what_was_planned_where() -> None:
    result = _plan()
    assert plot_title(result).startswith("toy on A100: max_throughput\nprofiled on A100")
    cpu = result.replace(device="cpu (x86_64, 2 cores)")
    assert "a CPU profile: compute is the CPU's" in plot_title(cpu)
