"""Per-step overhead: our trainer vs a raw PyTorch DDP loop, and MLflow logging every step vs off.

Three paths train the same job for the same steps, interleaved on one already-running local Ray
(sessions.py): ``orchestrator run`` (MLflow every step, checkpoint cadence, Ray Data, the driver's
progress polling); the same loop on a bare TorchTrainer with ``run_id`` None (no MLflow, no
polling); raw DDP on tensors in memory. MLflow alone is isolated in bench_tracking.py. A step's time is the time between optimizer steps, as the loop
measures it; steps/s is one over the median after the loop's warm-up (its
``observed_step_time_s``). The mean over the same steps, which includes the checkpoint saves and
the first batch of each epoch, is shown for ours vs raw too.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from benchmarks.harness import Row, SectionResult, Stat, after_warmup, paired_ratios
from benchmarks.sessions import TrainingRun
from benchmarks.workloads import CNN_STEP, RESNET_STEP

SECTION = "per-step"
# Steps each run trains: checkpoints at 50 and 100 (the config's cadence), epochs turn at 51 and 102.
STEPS = 120
# The ResNet's runs: all in its first epoch (streamed through Ray Data), a checkpoint at 50.
RESNET_STEPS = 40
GOAL = 1.02


def _step(runs: Sequence[TrainingRun], center: Callable[[list[float]], float]) -> list[float]:
    return [center(after_warmup(r.step_times)) for r in runs]


def summarize_resnet(runs: dict[str, list[TrainingRun]]) -> SectionResult:
    """ours vs raw DDP on the ResNet, every step in the first epoch."""
    median = {path: _step(rs, statistics.median) for path, rs in runs.items()}
    headline = paired_ratios(median["ours"], median["raw"])
    row = Row(section=SECTION, measure="ResNet: steps/s, ours vs raw DDP (median step, first epoch streamed)",
              unit="steps/s", ours=_rate(median["ours"]), baseline=_rate(median["raw"]), baseline_label="raw DDP",
              ratio=headline, ratio_label="raw/ours", goal=f"<= {GOAL}", met=headline.median <= GOAL)
    note = f"ResNet: {RESNET_STEP.note}, 2 workers, {RESNET_STEPS} steps a run, all in the first epoch"
    return SectionResult(rows=[row], notes=[note],
                         details={"resnet_step_times_s": {p: [r.step_times for r in rs] for p, rs in runs.items()}})


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
        Row(section=SECTION, measure="ours (MLflow every step) vs bare TorchTrainer, same loop, MLflow off",
            unit="steps/s", ours=_rate(median["ours"]), baseline=_rate(median["bare"]),
            baseline_label="bare, run_id None", ratio=paired_ratios(median["ours"], median["bare"]),
            ratio_label="off/on"),
        Row(section=SECTION, measure="Ray Train + Ray Data, no MLflow (bare) vs raw DDP", unit="steps/s",
            ours=_rate(median["bare"]), baseline=_rate(median["raw"]), baseline_label="raw DDP",
            ratio=paired_ratios(median["bare"], median["raw"]), ratio_label="raw/bare"),
    ]
    details = {"steps_per_run": STEPS, "workers": 2,
               "step_times_s": {path: [r.step_times for r in rs] for path, rs in runs.items()},
               "run_wall_s": {path: [round(r.wall_s, 1) for r in rs] for path, rs in runs.items()}}
    notes = [f"{CNN_STEP.note}, 2 workers, {STEPS} steps a run; ours is `orchestrator run`, MLflow on",
             "ours and bare stream the first epoch (51 steps) through Ray Data and draw the later ones from "
             "the in-memory shard cache (data.cache_mb); raw DDP holds its shard in memory from the start"]
    return SectionResult(rows=rows, details=details, notes=notes)


def _rate(step_times: list[float]) -> Stat:
    return Stat.of([1.0 / t for t in step_times])
