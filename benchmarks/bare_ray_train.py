"""Bare Ray Train: our training loop on a TorchTrainer built by hand, without the orchestrator.

What a user writes without us: read the Parquet with Ray Data, wrap
``trainers.loop.train_loop_per_worker`` in a ``TorchTrainer``, fit. No MLflow (``run_id`` None),
no data check, no planning, no progress polling. Rank 0's progress events go to a recording actor;
its first steps event marks the first training step, and it keeps every step's time.

    python -m benchmarks.bare_ray_train CONFIG --set KEY=VALUE ... --workers 2 --steps 120 \\
        --out run.json [--address GCS_ADDRESS]   # no address: an embedded Ray, as the CLI starts
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from orchestrator import constants
from orchestrator.config import load_config
from orchestrator.ray_session import connect_ray, torch_config
from trainers.events import StepsDone
from trainers.loop import LoopArgs, train_loop_per_worker


class StepRecorder:
    """Stands in for the driver's progress actor (orchestrator/driver/progress.py) and keeps when
    each step was reported, and its time. The loop calls these methods; a new call there fails
    this benchmark loudly."""

    def __init__(self) -> None:
        self.points: list[tuple[float, int, float]] = []

    def publish(self, events: list[Any]) -> None:
        # Rank 0 sends at most every PROGRESS_PUSH_S, with every step since its last send; only
        # the newest step gets this arrival time (the first send is step 1's, at once).
        for event in events:
            if isinstance(event, StepsDone):
                for i, (point, seconds) in enumerate(zip(event.points, event.step_times_s)):
                    newest = i == len(event.points) - 1
                    self.points.append((time.time() if newest else float("nan"), point.step, float(seconds)))

    def register_worker(self, rank: int, pid: int, node_id: str) -> None:
        pass

    def stop_requested(self) -> bool:
        return False

    def given_up(self) -> str | None:
        return None

    def recorded(self) -> list[tuple[float, int, float]]:
        return list(self.points)


Recorder = ray.remote(num_cpus=0)(StepRecorder)


def connect(address: str | None) -> None:
    # The same Ray as `orchestrator run` joins or starts (loopback only, token auth).
    connect_ray(address)


def fit(config: str, overrides: list[str], *, workers: int, steps: int) -> dict[str, Any]:
    """The recorded steps, and when `TorchTrainer.fit` was called (for the start-up breakdown)."""
    job = load_config(config, overrides)
    ds = ray.data.read_parquet([os.path.abspath(p) for p in job.data.paths])
    train, val = ds.train_test_split(test_size=job.data.val_fraction)
    recorder = Recorder.remote()
    args = LoopArgs(config=job.localized().worker_config().model_dump(mode="json"),
                    steps_per_epoch=train.count() // job.training.global_batch_size, total_steps=steps,
                    progress=recorder, push_every_s=constants.PROGRESS_PUSH_S,
                    stop_check_every=constants.STOP_CHECK_EVERY)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=args.to_dict(),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        torch_config=torch_config("gloo"),  # the rendezvous ours uses
        run_config=ray.train.RunConfig(
            name=job.name, storage_path=os.path.abspath(job.checkpoint.storage_path),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.checkpoint.keep_last),
        ),
        datasets={"train": train, "val": val},
    )
    fit_called = time.time()
    trainer.fit()
    return {"points": ray.get(recorder.recorded.remote()), "fit_called": fit_called}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--address")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    connect(args.address)
    try:
        recorded = fit(args.config, args.overrides, workers=args.workers, steps=args.steps)
    finally:
        ray.shutdown()
    with open(args.out, "w") as f:
        json.dump(recorded, f)


if __name__ == "__main__":
    main()
