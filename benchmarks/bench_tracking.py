"""MLflow logging every step vs off, in one process: what the loop's tracking costs rank 0.

The per-step benchmark's ours-vs-bare row holds the orchestrator's driver too; this isolates the
tracking. The per-step workload's training step (the digits CNN, local batch 128, one thread as a
Ray worker has) runs in alternating blocks: with the loop's ``MetricBuffer`` logging the loop's
five metrics every step to a sqlite MLflow store, and without. A block lasts past one flush of the
buffer (``ORCH_METRIC_FLUSH_S``); each "on" block ends by closing its buffer (timed: it sends the
rest), so no flush spills into an "off" block. CPU time per step (this process, every thread: the buffer's sender included)
is the headline, as it holds on a loaded machine; wall time per step is in the details.
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
    from mlflow.tracking import MlflowClient

    from orchestrator import constants
    from orchestrator.tracking import MetricBuffer

    job = CNN_STEP.job(ws, run_name="tracking")
    client = MlflowClient(ws.tracking_uri)
    experiment = client.get_experiment_by_name("bench") or client.get_experiment(client.create_experiment("bench"))
    run_id = client.create_run(experiment.experiment_id, run_name="tracking-cost").info.run_id
    step = _trainer_step(job)
    blocks: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(WARMUP_STEPS):
            step()
        for i in range(repeats):
            for mode in ("off", "on") if i % 2 else ("on", "off"):
                sink = MetricBuffer(tracking_uri=ws.tracking_uri, run_id=run_id, spill_dir=ws.root) \
                    if mode == "on" else None
                blocks[mode].append(_block(step, sink, first_step=i * STEPS_PER_BLOCK))
    finally:
        torch.set_num_threads(threads)
    cpu = {mode: [c for c, _ in b] for mode, b in blocks.items()}
    wall = {mode: [w for _, w in b] for mode, b in blocks.items()}
    ratio = paired_ratios(cpu["on"], cpu["off"])
    row = Row(section=SECTION, measure="MLflow every step vs off: CPU time per step, rank 0's process", unit="ms",
              ours=Stat.of([1e3 * c for c in cpu["on"]]), baseline=Stat.of([1e3 * c for c in cpu["off"]]),
              baseline_label="MLflow off", ratio=ratio, ratio_label="on/off")
    details = {"cpu_s_per_step": cpu, "wall_s_per_step": wall, "steps_per_block": STEPS_PER_BLOCK,
               "flush_every_s": constants.METRIC_FLUSH_S,
               "wall_ratio_on_off": paired_ratios(wall["on"], wall["off"]).median}
    notes = [f"the per-step workload's model and local batch ({LOCAL_BATCH}), one process and thread, "
             f"{repeats} pairs of {STEPS_PER_BLOCK}-step blocks after {WARMUP_STEPS} warm-up steps"]
    return SectionResult(rows=[row], details=details, notes=notes)


def _trainer_step(job: Any):
    import torch.nn.functional as F

    from trainers.loop import make_optimizer
    from trainers.models import build_model

    model = build_model(job.model.name, job.model.kwargs)
    optimizer = make_optimizer(model, job.training)
    x, y = load_tensors(job)
    x, y = x[:LOCAL_BATCH], y[:LOCAL_BATCH]

    def step() -> dict[str, float]:
        started = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # The loop's per-step metrics (trainers/loop.py), with its loss.item().
        return {"train/loss": loss.item(), "train/lr": job.training.lr, "train/samples_per_s": 1.0,
                "train/step_time_s": time.perf_counter() - started, "train/epoch": 0}

    return step


def _block(step, sink: Any, *, first_step: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per step over one block."""
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(STEPS_PER_BLOCK):
        metrics = step()
        if sink is not None:
            sink.add(metrics, step=first_step + i + 1)
    if sink is not None:
        sink.close()
    return ((time.process_time() - cpu) / STEPS_PER_BLOCK, (time.perf_counter() - wall) / STEPS_PER_BLOCK)
