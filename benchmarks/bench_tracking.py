"""Progress and metrics every step vs off, in one process: what reporting costs rank 0.

Rank 0 no longer talks to MLflow: it hands each step's metrics (and the step's loss as a device
tensor, converted once per send) to the driver's progress actor (`trainers.reporting.Reporter`),
at most every ``ORCH_PROGRESS_PUSH_S``; the driver logs them. The per-step workload's training step
(the digits CNN, local batch 128, one thread as a Ray worker has) runs in alternating blocks: with
the Reporter sending to a real progress actor, and without any channel. Each "on" block ends with
a flush (timed: it waits for the actor), so nothing spills into an "off" block. CPU time per step
(this process, every thread) is the headline, as it holds on a loaded machine; wall time per step
is in the details.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.harness import Row, SectionResult, Stat, Workspace, paired_ratios
from benchmarks.raw_ddp import load_tensors
from benchmarks.workloads import CNN_STEP

SECTION = "tracking"
LOCAL_BATCH = 128
STEPS_PER_BLOCK = 150  # ~3 s at ~20 ms a step: longer than one 2 s flush interval
WARMUP_STEPS = 20


def measure(ws: Workspace, *, repeats: int) -> SectionResult:
    import ray

    from orchestrator import constants
    from orchestrator.driver.progress import ProgressActor
    from orchestrator.ray_session import connect_ray
    from trainers.reporting import Reporter

    job = CNN_STEP.job(ws, run_name="tracking")
    step = _trainer_step(job)
    started_ray = not ray.is_initialized()
    connect_ray(None)
    actor = ProgressActor.remote()
    blocks: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(WARMUP_STEPS):
            step()
        for i in range(repeats):
            for mode in ("off", "on") if i % 2 else ("on", "off"):
                reporter = Reporter(actor if mode == "on" else None, global_batch=LOCAL_BATCH,
                                    push_every_s=constants.PROGRESS_PUSH_S)
                blocks[mode].append(_block(step, reporter, first_step=i * STEPS_PER_BLOCK))
                ray.get(actor.drain.remote())  # the driver's poll, outside the timed block
    finally:
        torch.set_num_threads(threads)
        if started_ray:
            ray.shutdown()
    cpu = {mode: [c for c, _ in b] for mode, b in blocks.items()}
    wall = {mode: [w for _, w in b] for mode, b in blocks.items()}
    ratio = paired_ratios(cpu["on"], cpu["off"])
    row = Row(section=SECTION, measure="progress + metrics every step vs off: CPU time per step, rank 0's process",
              unit="ms", ours=Stat.of([1e3 * c for c in cpu["on"]]), baseline=Stat.of([1e3 * c for c in cpu["off"]]),
              baseline_label="no progress channel", ratio=ratio, ratio_label="on/off")
    details = {"cpu_s_per_step": cpu, "wall_s_per_step": wall, "steps_per_block": STEPS_PER_BLOCK,
               "push_every_s": constants.PROGRESS_PUSH_S,
               "wall_ratio_on_off": paired_ratios(wall["on"], wall["off"]).median}
    notes = [f"the per-step workload's model and local batch ({LOCAL_BATCH}), one process and thread, "
             f"{repeats} pairs of {STEPS_PER_BLOCK}-step blocks after {WARMUP_STEPS} warm-up steps; rank 0 "
             "sends to the driver's progress actor, which MLflow never blocks"]
    return SectionResult(rows=[row], details=details, notes=notes)


def _trainer_step(job: Any):
    from trainers.models import build_model
    from trainers.step import TrainStep, make_optimizer

    model = build_model(job.model.name, job.model.kwargs)
    train_step = TrainStep(model, make_optimizer(model, job.training), cfg=job.training, device=torch.device("cpu"))
    x, y = load_tensors(job)
    micro = [(x[:LOCAL_BATCH], y[:LOCAL_BATCH])]

    def step() -> tuple[torch.Tensor, float]:
        started = time.perf_counter()
        loss = train_step(micro)
        return loss, time.perf_counter() - started

    return step


def _block(step, reporter: Any, *, first_step: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per step over one block."""
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(STEPS_PER_BLOCK):
        loss, seconds = step()
        reporter.step(step=first_step + i + 1, loss=loss, lr=1e-3, step_time_s=seconds, epoch=0)
    reporter.flush()
    return ((time.process_time() - cpu) / STEPS_PER_BLOCK, (time.perf_counter() - wall) / STEPS_PER_BLOCK)
