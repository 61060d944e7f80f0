"""The ways to train one job side by side, each timed the same way, and the Ray they run on.

* ours: ``orchestrator run CONFIG --workers 2`` in its own process, exactly as a user types it;
  stopped with Ctrl-C (SIGINT: final checkpoint, run marked KILLED) once it is past the steps
  measured, so no model is registered. Its step times and first step come from its MLflow run.
* bare: ``benchmarks.bare_ray_train``, the same loop on a hand-built TorchTrainer, no MLflow.
* raw: ``benchmarks.raw_ddp``, plain PyTorch DDP on tensors in memory.

Time to first step runs from launching the process to rank 0 finishing optimizer step 1: the
timestamp rank 0 gives the step's MLflow point (ours), or the recording actor's clock when the
step's progress update arrives (bare, a millisecond or so later). Same machine, same clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import Workspace, child_env
from benchmarks.workloads import Workload

WORKERS = 2
# Waits, in seconds, long enough for a run on a loaded 2-core machine (env vars override).
RUN_TIMEOUT_S = float(os.environ.get("BENCH_RUN_TIMEOUT_S", 300))
STOP_TIMEOUT_S = float(os.environ.get("BENCH_STOP_TIMEOUT_S", 120))
STOPPED_EXIT = 128 + signal.SIGINT
POLL_S = float(os.environ.get("BENCH_POLL_S", 1.0))


class BenchmarkError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class TrainingRun:
    path: str  # one of PATHS
    step_times: list[float]  # the loop's own time between optimizer steps, from step 1
    first_step_s: float | None = None  # launch -> rank 0 finished step 1
    wall_s: float = 0.0
    # launch -> a point on the way to step 1: ours "mlflow_run_created", bare "fit_called"
    milestones: dict[str, float] = field(default_factory=dict)


@contextmanager
def local_ray() -> Iterator[str]:
    """An already-running local Ray, sized as the CLI's embedded one; yields its address."""
    import ray

    from orchestrator.ray_session import connect_ray

    connect_ray(None)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


# ---------------------------------------------------------------------------------------------
# ours: the CLI


def run_orchestrator(workload: Workload, ws: Workspace, *, run_name: str, steps: int, address: str | None,
                     workers: int = WORKERS) -> TrainingRun:
    overrides = workload.overrides_for(ws, run_name=run_name)
    cmd = [sys.executable, "-m", "orchestrator", "run", str(workload.config), "--workers", str(workers),
           *(["--address", address] if address else []), *_sets(overrides)]
    log = ws.log(f"{run_name}.log")
    launched = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ws.root, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
        stopped = False
        try:
            _wait_for_step(proc, ws.mlflow_db, run_name, steps)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # the user's Ctrl-C: checkpoint, then stop
                stopped = True
            proc.wait(timeout=STOP_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.time() - launched
    # A run stopped by Ctrl-C exits 130 once its final checkpoint is written (128 + SIGINT, as a shell).
    if proc.returncode not in ((0, STOPPED_EXIT) if stopped else (0,)):
        raise BenchmarkError(f"orchestrator run exited with {proc.returncode}; see {log}:\n{_tail(log)}")
    created_at, first_at, step_times = _mlflow_steps(ws.tracking_uri, run_name)
    return TrainingRun("ours", step_times[:steps], first_at - launched, wall,
                       {"mlflow_run_created": created_at - launched})


def _wait_for_step(proc: subprocess.Popen, db: Path, run_name: str, step: int) -> None:
    """Poll the run's sqlite store until rank 0 logged `step`, with one indexed query a second.

    Not through MlflowClient: its queries cost enough CPU to slow the run being measured.
    """
    deadline = time.monotonic() + RUN_TIMEOUT_S
    query = ("SELECT MAX(m.step) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
             "WHERE r.name = ? AND m.key = 'train/loss'")
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise BenchmarkError(f"{run_name}: step {step} not reached in {RUN_TIMEOUT_S:.0f} s")
        time.sleep(POLL_S)
        try:  # before the run's first write the tables may not be there; a locked read is retried
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1)) as conn:
                (logged,) = conn.execute(query, (run_name,)).fetchone()
        except sqlite3.Error:
            continue
        if (logged or 0) >= step:
            return


def _run_id(client, run_name: str) -> str | None:
    experiment = client.get_experiment_by_name("bench")
    if experiment is None:
        return None
    found = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    return found[0].info.run_id if found else None


def _mlflow_steps(tracking_uri: str, run_name: str) -> tuple[float, float, list[float]]:
    """(when the driver created the run, when rank 0 finished step 1, step times from step 1)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run_id = _run_id(client, run_name)
    if run_id is None:
        raise BenchmarkError(f"{run_name}: no MLflow run")
    losses = client.get_metric_history(run_id, "train/loss")
    first = min(losses, key=lambda m: m.step)
    times = sorted(client.get_metric_history(run_id, "train/step_time_s"), key=lambda m: m.step)
    created = client.get_run(run_id).info.start_time / 1000.0
    return created, first.timestamp / 1000.0, [m.value for m in times]


def _tail(path: os.PathLike, lines: int = 25) -> str:
    with open(path) as f:
        return "".join(f.readlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# bare: the same loop on a hand-built TorchTrainer


def run_bare(workload: Workload, ws: Workspace, *, run_name: str, steps: int, address: str | None) -> TrainingRun:
    out = ws.log(f"{run_name}.json")
    cmd = [sys.executable, "-m", "benchmarks.bare_ray_train", str(workload.config),
           *_sets(workload.overrides_for(ws, run_name=run_name)), "--workers", str(WORKERS),
           "--steps", str(steps), "--out", str(out), *(["--address", address] if address else [])]
    log = ws.log(f"{run_name}.log")
    launched = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ws.root, env=child_env(), stdout=f, stderr=subprocess.STDOUT,
                              timeout=RUN_TIMEOUT_S)
    wall = time.time() - launched
    if proc.returncode != 0:
        raise BenchmarkError(f"bare TorchTrainer exited with {proc.returncode}; see {log}:\n{_tail(log)}")
    recorded = json.loads(out.read_text())
    points = sorted(recorded["points"], key=lambda p: p[1])
    return TrainingRun("bare", [p[2] for p in points], points[0][0] - launched, wall,
                       {"fit_called": recorded["fit_called"] - launched})


# ---------------------------------------------------------------------------------------------
# raw: plain PyTorch DDP


def run_raw(workload: Workload, ws: Workspace, *, steps: int) -> TrainingRun:
    from benchmarks.raw_ddp import run_raw_ddp

    started = time.time()
    result = run_raw_ddp(workload.job(ws, run_name="raw"), workers=WORKERS, steps=steps)
    return TrainingRun("raw", result.step_times, None, time.time() - started)


# ---------------------------------------------------------------------------------------------
# Side by side


PATHS = ("ours", "bare", "raw")


def run_path(path: str, workload: Workload, ws: Workspace, *, run_name: str, steps: int,
             address: str | None) -> TrainingRun:
    if path == "ours":
        return run_orchestrator(workload, ws, run_name=run_name, steps=steps, address=address)
    if path == "bare":
        return run_bare(workload, ws, run_name=run_name, steps=steps, address=address)
    return run_raw(workload, ws, steps=steps)


def interleaved(paths: tuple[str, ...], workload: Workload, ws: Workspace, *, repeats: int, steps: int,
                address: str | None, label: str) -> dict[str, list[TrainingRun]]:
    """`repeats` rounds of every path back to back; the order rotates so none is always first."""
    runs: dict[str, list[TrainingRun]] = {p: [] for p in paths}
    for i in range(repeats):
        for path in paths[i % len(paths):] + paths[: i % len(paths)]:
            runs[path].append(run_path(path, workload, ws, run_name=f"{label}-{path}-{i}", steps=steps,
                                       address=address))
    return runs
