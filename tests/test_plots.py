"""The scaling plot is a real PNG; the table renders every column."""

from __future__ import annotations

from pathlib import Path

from io import StringIO

import pytest
from rich.console import Console

from orchestrator.errors import UserError
from orchestrator.planner import ClusterSpec, Profile, plan
from orchestrator.planner.search import placement_for
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


def _cpu_plan(**goal: object):
    """A CPU cluster known by its links alone (no `gpu: cpu`), planned from a CPU profile."""
    profile = Profile.from_dict({
        "version": 1, "model": "cnn", "device": "cpu (x86_64, 2 cores)", "param_count": 30_000,
        "grad_bytes": 120_000, "max_local_batch": 64,
        "samples": [{"local_batch": 32, "step_time_s": 0.005}, {"local_batch": 64, "step_time_s": 0.009}],
    })
    cluster = ClusterSpec(nodes=2, gpus_per_node=2, intra_node_GBps=2.0, inter_node_GBps=1.25,
                          intra_link="loopback", inter_link="loopback")
    return plan(profile, cluster, global_batch=128, **goal)


def test_a_cpu_plan_counts_workers_in_its_words_and_keeps_its_keys() -> None:
    """Before: "Chose 1 GPU (1x1) ...; at 2 GPUs, ...", "every GPU count", a "GPUs" column and axis."""
    for result in (_cpu_plan(min_efficiency=0.99), _cpu_plan(objective="min_cost", total_samples=10**6)):
        buffer = StringIO()
        print_plan(Console(file=buffer, width=80), result)
        words = "\n".join([buffer.getvalue(), result.explanation, plot_title(result)])
        assert "GPU" not in words, words
        assert result.explanation.startswith(f"Chose {result.workers} worker")
        assert "workers" in buffer.getvalue().splitlines()[2]  # the table's header
        assert result.unit == "worker" and "gpus" in result.to_dict()["choice"]  # the keys stay
    assert "at 2 workers, pessimistic efficiency" in _cpu_plan(min_efficiency=0.99).explanation
    assert "worker-hours per million samples" in _cpu_plan(objective="min_cost", total_samples=10**6).explanation
    assert "GPUs" in plan_table(_plan()).columns[0].header and _plan().unit == "GPU"
    cpus = ClusterSpec(nodes=2, gpus_per_node=2, intra_node_GBps=2.0, inter_node_GBps=1.25, gpu="cpu")
    with pytest.raises(UserError, match=r"^resources\.workers: must be between 1 and the cluster's 4 workers, got 5$"):
        placement_for(cpus, 5)
