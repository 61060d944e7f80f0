"""The scaling plot is a real PNG; the table renders every column."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from orchestrator.planner import ClusterSpec, Profile, plan
from orchestrator.plots import plan_table, scaling_plot

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
