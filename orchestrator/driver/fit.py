"""One `TorchTrainer.fit`, run in a background thread so the driver's thread stays free to poll
progress and act on a stop within seconds."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from orchestrator import constants
from orchestrator.driver.ports import FitOutcome, Prepared
from orchestrator.driver.sizing import Sizing, Workers
from orchestrator.errors import user_error_among
from orchestrator.ray_session import torch_config
from trainers.loop import LoopArgs, train_loop_per_worker


def build_trainer(prepared: Prepared, sizing: Sizing, workers: Workers, *, progress: Any,
                  run_dir: str) -> TorchTrainer:
    """The job's TorchTrainer; the same run folder every time, so a new fit resumes from the
    job's latest checkpoint."""
    job = prepared.job
    local = None if "://" in run_dir else run_dir
    args = LoopArgs(
        config=job.worker_config().model_dump(mode="json"), steps_per_epoch=prepared.steps_per_epoch,
        total_steps=prepared.total_steps, run_dir=local, max_local_batch=sizing.max_local_batch, progress=progress,
        push_every_s=constants.PROGRESS_PUSH_S, stop_check_every=constants.STOP_CHECK_EVERY,
        system_metrics_every_s=constants.SYSTEM_METRICS_S if job.tracking.log_system_metrics else None,
    )
    parent, name = run_dir.rstrip("/").rsplit("/", 1)
    # Without held-out rows Ray Train gets no "val" set: no split coordinator (one more process in
    # the job's start-up) for a set the loop would not evaluate.
    data = prepared.data
    datasets = {"train": data.train} if data.val is None else {"train": data.train, "val": data.val}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=args.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=prepared.use_gpu,
            resources_per_worker={"CPU": job.resources.cpus_per_worker, **({"GPU": 1} if prepared.use_gpu else {})},
        ),
        torch_config=torch_config(),  # NCCL where the workers see CUDA, gloo otherwise
        run_config=ray.train.RunConfig(
            name=name, storage_path=parent,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.checkpoint.keep_last),
            failure_config=ray.train.FailureConfig(max_failures=job.resources.max_failures),
            callbacks=[FailureForwarder(progress)],
        ),
        datasets=datasets,
    )


class RayFit:
    """`trainer.fit()` in a daemon thread, then `after()` (no worker is saving any more);
    `outcome()` once `done()`."""

    def __init__(self, trainer: TorchTrainer, after: Callable[[], None] | None = None) -> None:
        self._outcome: FitOutcome | None = None
        self._after = after
        self._thread = threading.Thread(target=self._fit, args=(trainer,), name="trainer-fit", daemon=True)
        self._thread.start()

    def _fit(self, trainer: TorchTrainer) -> None:
        try:
            result = trainer.fit()
            self._outcome = FitOutcome(dict(result.metrics or {}), result.checkpoint)
        except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread
            self._outcome = FitOutcome({}, None, exc)
        if self._after is not None:
            self._after()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return self.done()

    def outcome(self) -> FitOutcome:
        self._thread.join()
        assert self._outcome is not None
        return self._outcome


def read_checkpoint(checkpoint: Any) -> dict[str, Any]:
    """The training state in a Ray Train checkpoint, local or remote (verified, weights only)."""
    from trainers import checkpoint as ckpt

    if checkpoint.filesystem.type_name == "local":
        return ckpt.read(Path(checkpoint.path))
    with checkpoint.as_directory() as folder:
        return ckpt.read(Path(folder))


class FailureForwarder(ray.train.UserCallback):
    """Runs in the Ray Train controller when a worker group fails, before the controller restarts
    it: tells the driver why (the restarted rank 0 only knows where it resumed from), and has the
    autoscaling coordinator look at the nodes now, so an elastic restart after a lost node sizes on
    the nodes that are left."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        from orchestrator.autoscale import refresh_cluster_view

        fatal = user_error_among(worker_exceptions)
        self.progress.record_failure.remote(failure_causes(worker_exceptions), str(fatal) if fatal else None)
        refresh_cluster_view()


def failure_causes(worker_exceptions: dict[int, Exception]) -> str:
    """`rank 0: ...; ranks 1, 2: ...`: ranks that failed alike (every rank finding the same data
    gone or the same checkpoint damaged) said once."""
    ranks: dict[str, list[int]] = {}
    for rank, exc in sorted(worker_exceptions.items()):
        ranks.setdefault(describe_error(exc), []).append(rank)
    return "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {cause}" for cause, r in ranks.items())


def describe_error(exc: BaseException) -> str:
    """The exception's type and first line, short enough for an MLflow tag."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}"[:300]
