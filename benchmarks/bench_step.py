"""Per-step overhead: our trainer vs a raw PyTorch DDP loop, and MLflow logging every step vs off.

Three paths train the same job for the same steps, interleaved on one already-running local Ray
(sessions.py): ``orchestrator run`` (MLflow every step, checkpoint cadence, Ray Data, the driver's
progress polling); the same loop on a bare TorchTrainer with ``run_id`` None (no MLflow, no
polling); raw DDP on tensors in memory. MLflow alone is isolated in bench_tracking.py. A step's time is the time between optimizer steps, as the loop
measures it; steps/s is one over the median after the loop's warm-up (its
``observed_step_time_s``). The mean over the same steps, which includes the checkpoint saves and
the first batch of each epoch, is shown for ours vs raw too. On the ResNet, raw DDP also runs
alone, beside one busy-looping process (what a little background CPU costs two single-threaded
ranks that wait for each other every step) and beside as many processes as Ray keeps beside a job's
ranks, each only waking every 10 ms as Ray's workers do (the gap on a 2-core machine).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

from benchmarks.harness import Row, SectionResult, Stat, Workspace, after_warmup, paired_ratios
from benchmarks.sessions import TrainingRun, run_raw
from benchmarks.workloads import CNN_STEP, RESNET_STEP, Workload

SECTION = "per-step"
# Steps each run trains: checkpoints at 50 and 100 (the config's cadence), epochs turn at 51 and 102.
STEPS = 120
# The ResNet's runs: all in its first epoch (streamed through Ray Data), a checkpoint at 50.
RESNET_STEPS = 40
GOAL = 1.02
# The background load beside raw DDP: the share of one core Ray's own processes and the driver
# were measured to take beside the training workers here (py-spy and /proc, 2026-12-01).
BACKGROUND_DUTY = 0.25
# Ray worker processes beside the two ranks during a job (Ray Train's controller and helpers, Ray
# Data's coordinators, idle workers, the progress actor: counted here with sched_sample,
# 2026-12-07); each wakes every 10 ms (Ray's core worker checks for signals on that timer).
RAY_WORKER_PROCESSES = 14
WAKE_PERIOD_S = 0.01


def _step(runs: Sequence[TrainingRun], center: Callable[[list[float]], float]) -> list[float]:
    return [center(after_warmup(r.step_times)) for r in runs]


def summarize_resnet(runs: dict[str, list[TrainingRun]], background: dict[str, list[TrainingRun]] | None = None,
                     ) -> SectionResult:
    """ours vs raw DDP on the ResNet, every step in the first epoch; bare Ray Train beside both;
    and how much raw DDP itself slows beside a little background CPU (`background`)."""
    median = {path: _step(rs, statistics.median) for path, rs in runs.items()}
    headline = paired_ratios(median["ours"], median["raw"])
    rows = [Row(section=SECTION, measure="ResNet: steps/s, ours vs raw DDP (median step, first epoch streamed)",
                unit="steps/s", ours=_rate(median["ours"]), baseline=_rate(median["raw"]), baseline_label="raw DDP",
                ratio=headline, ratio_label="raw/ours", goal=f"<= {GOAL}", met=headline.median <= GOAL)]
    if "bare" in median:
        rows += _bare_rows(median, prefix="ResNet: ")
    notes = [f"ResNet: {RESNET_STEP.note}, 2 workers, {RESNET_STEPS} steps a run, all in the first epoch"]
    details = {"resnet_step_times_s": {p: [r.step_times for r in rs] for p, rs in runs.items()}}
    if background:
        quiet, busy = (_step(background[k], statistics.median) for k in ("alone", "beside"))
        rows.append(Row(section=SECTION, measure=f"ResNet: raw DDP beside one process using {BACKGROUND_DUTY:.0%} "
                                                 "of a core vs alone", unit="steps/s",
                        ours=_rate(busy), baseline=_rate(quiet), baseline_label="raw DDP alone",
                        ratio=paired_ratios(busy, quiet), ratio_label="alone/beside"))
        notes.append(f"ResNet, background: a process at the benchmark's niceness busy {BACKGROUND_DUTY:.0%} of "
                     "every 10 ms (what Ray's raylet, GCS, dashboard and ~15 idle helper actors add up to here); "
                     "both DDP ranks wait for whichever one it preempts")
        if "wakers" in background:
            woken = _step(background["wakers"], statistics.median)
            rows.append(Row(section=SECTION, measure=f"ResNet: raw DDP beside {RAY_WORKER_PROCESSES} processes waking "
                                                     f"every {WAKE_PERIOD_S * 1000:.0f} ms vs alone", unit="steps/s",
                            ours=_rate(woken), baseline=_rate(quiet), baseline_label="raw DDP alone",
                            ratio=paired_ratios(woken, quiet), ratio_label="alone/beside"))
            notes.append(f"ResNet, wakers: {RAY_WORKER_PROCESSES} processes niced as Ray's workers that only wake "
                         f"every {WAKE_PERIOD_S * 1000:.0f} ms, as the Ray worker processes beside a job's ranks do "
                         "(their signal-check timer), doing nothing else")
        details["resnet_background_step_times_s"] = {k: [r.step_times for r in rs] for k, rs in background.items()}
    return SectionResult(rows=rows, notes=notes, details=details)


def measure_background(workload: Workload, ws: Workspace, *, repeats: int, steps: int) -> dict[str, list[TrainingRun]]:
    """raw DDP alone, beside a busy-looping process and beside processes that only wake, in turns
    (`repeats` rounds)."""
    kinds = ("alone", "beside", "wakers")
    runs: dict[str, list[TrainingRun]] = {k: [] for k in kinds}
    for i in range(repeats):
        for kind in kinds[i % 3:] + kinds[:i % 3]:
            with background_processes(kind):
                runs[kind].append(run_raw(workload, ws, steps=steps))
    return runs


def background_processes(kind: str) -> AbstractContextManager[None]:
    """What runs beside raw DDP: nothing ("alone"); a process at the benchmark's own niceness (as
    Ray's raylet, GCS and dashboard run) that spins BACKGROUND_DUTY of every 10 ms and sleeps the
    rest ("beside"); RAY_WORKER_PROCESSES processes niced as Ray's workers and raw DDP's ranks are,
    that wake every WAKE_PERIOD_S and do nothing else ("wakers")."""
    from benchmarks.raw_ddp import RAY_WORKER_NICENESS

    if kind == "beside":
        return _python_processes("import time\nwhile True:\n    t = time.perf_counter()\n"
                                 f"    while time.perf_counter() - t < {0.01 * BACKGROUND_DUTY}: pass\n"
                                 f"    time.sleep({0.01 * (1 - BACKGROUND_DUTY)})\n", count=1)
    if kind == "wakers":
        return _python_processes(f"import os, signal, time\nos.nice({RAY_WORKER_NICENESS})\nwhile True:\n"
                                 f"    time.sleep({WAKE_PERIOD_S})\n    signal.getsignal(signal.SIGINT)\n",
                                 count=RAY_WORKER_PROCESSES)
    return nullcontext()


@contextmanager
def _python_processes(code: str, *, count: int) -> Iterator[None]:
    """`count` Python processes running `code`, killed on leaving."""
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def summarize(runs: dict[str, list[TrainingRun]]) -> SectionResult:
    median = {path: _step(rs, statistics.median) for path, rs in runs.items()}
    mean = {path: _step(rs, statistics.fmean) for path, rs in runs.items()}
    headline = paired_ratios(median["ours"], median["raw"])
    rows = [
        Row(section=SECTION, measure="steps/s, ours vs raw DDP (median step after warm-up)", unit="steps/s",
            ours=_rate(median["ours"]), baseline=_rate(median["raw"]), baseline_label="raw DDP",
            ratio=headline, ratio_label="raw/ours", goal=f"<= {GOAL}", met=headline.median <= GOAL),
        Row(section=SECTION, measure="steps/s, ours vs raw DDP (mean step: checkpoints, epoch starts in)",
            unit="steps/s", ours=_rate(mean["ours"]), baseline=_rate(mean["raw"]), baseline_label="raw DDP",
            ratio=paired_ratios(mean["ours"], mean["raw"]), ratio_label="raw/ours"),
        *_bare_rows(median),
    ]
    details = {"steps_per_run": STEPS, "workers": 2,
               "step_times_s": {path: [r.step_times for r in rs] for path, rs in runs.items()},
               "run_wall_s": {path: [round(r.wall_s, 1) for r in rs] for path, rs in runs.items()}}
    notes = [f"{CNN_STEP.note}, 2 workers, {STEPS} steps a run; ours is `orchestrator run`, MLflow on",
             "ours and bare stream the first epoch (51 steps) through Ray Data and draw the later ones from "
             "the in-memory shard cache (data.cache_mb); raw DDP holds its shard in memory from the start"]
    return SectionResult(rows=rows, details=details, notes=notes)


def _bare_rows(median: dict[str, list[float]], prefix: str = "") -> list[Row]:
    """ours vs the same loop on a bare TorchTrainer, and that bare trainer vs raw DDP."""
    return [
        Row(section=SECTION, measure=f"{prefix}ours (MLflow every step) vs bare TorchTrainer, same loop, MLflow off",
            unit="steps/s", ours=_rate(median["ours"]), baseline=_rate(median["bare"]),
            baseline_label="bare, run_id None", ratio=paired_ratios(median["ours"], median["bare"]),
            ratio_label="off/on"),
        Row(section=SECTION, measure=f"{prefix}Ray Train + Ray Data, no MLflow (bare) vs raw DDP", unit="steps/s",
            ours=_rate(median["bare"]), baseline=_rate(median["raw"]), baseline_label="raw DDP",
            ratio=paired_ratios(median["bare"], median["raw"]), ratio_label="raw/bare"),
    ]


def _rate(step_times: list[float]) -> Stat:
    return Stat.of([1.0 / t for t in step_times])
