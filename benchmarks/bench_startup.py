"""Start-up: `orchestrator run --workers 2` to its first training step vs a bare TorchTrainer.

Both are new processes running the same loop on the same data (sessions.py); the clock runs
from launching the process to rank 0 finishing optimizer step 1. Warm: on an already-running
local Ray (the per-step runs, which start the same way). Cold: from nothing, each process
starting its own embedded Ray. The MLflow store exists already (a new store's tables take a few
seconds to create, once); planning and profiling are off.
"""

from __future__ import annotations

import time

from benchmarks.harness import Row, SectionResult, Stat, Workspace, paired_ratios
from benchmarks.sessions import TrainingRun, interleaved
from benchmarks.workloads import CNN_STEP

SECTION = "start-up"
GOAL = 1.10
# A cold run only has to reach its first step; a few more let the loop settle before the stop.
COLD_STEPS = 5


def create_store(ws: Workspace) -> float:
    """Seconds to create the workspace's MLflow sqlite store, done once before any run."""
    from mlflow.tracking import MlflowClient

    started = time.perf_counter()
    MlflowClient(ws.tracking_uri).search_experiments()
    return time.perf_counter() - started


def measure_cold(ws: Workspace, *, repeats: int) -> dict[str, list[TrainingRun]]:
    return interleaved(("ours", "bare"), CNN_STEP, ws, repeats=repeats, steps=COLD_STEPS, address=None,
                       label="cold")


def summarize(warm: dict[str, list[TrainingRun]] | None, cold: dict[str, list[TrainingRun]] | None, *,
              store_s: float) -> SectionResult:
    rows, details = [], {"mlflow_store_creation_s": store_s}
    for label, runs in (("warm: already-running local Ray", warm), ("cold: new process, embedded Ray", cold)):
        if runs is None:
            continue
        ours = [r.first_step_s for r in runs["ours"]]
        bare = [r.first_step_s for r in runs["bare"]]
        ratio = paired_ratios(ours, bare)
        rows.append(Row(
            section=SECTION, measure=f"time to first step, {label}", unit="s",
            ours=Stat.of(ours), baseline=Stat.of(bare), baseline_label="bare TorchTrainer, same loop",
            ratio=ratio, ratio_label="ours/bare", goal=f"<= {GOAL}", met=ratio.median <= GOAL,
        ))
        details[label] = {
            "ours_first_step_s": ours, "bare_first_step_s": bare,
            # How far each got before its trainer started: the driver's share of the wait.
            "ours_mlflow_run_created_s": [r.milestones["mlflow_run_created"] for r in runs["ours"]],
            "bare_fit_called_s": [r.milestones["fit_called"] for r in runs["bare"]],
            "run_wall_s": {path: [r.wall_s for r in runs[path]] for path in ("ours", "bare")},
        }
    notes = [CNN_STEP.note, "planning and profiling off (--workers 2); the MLflow store exists already "
             f"(creating a new store's tables takes {store_s:.1f} s, once)"]
    return SectionResult(rows=rows, details=details, notes=notes)
