"""The driver: connect to Ray, check the data, start or resume the MLflow run, launch the
TorchTrainer, show progress, and register the trained model."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from orchestrator import constants
from orchestrator.config import JobConfig, flatten
from orchestrator.errors import UserError
from orchestrator.tracking import JobRun, start_job_run

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Ray


# Logical CPUs an embedded Ray declares beyond the machine's cores (0 when joining a cluster).
_EMBEDDED_EXTRA_CPUS = 0


def connect_ray(address: str | None) -> None:
    """Join the cluster at `address`, or start an embedded local Ray bound to 127.0.0.1."""
    if ray.is_initialized():
        return
    # Workers must import this package; an installed package is importable anywhere, a
    # checkout is shipped through the runtime env.
    env_vars = {"RAY_TRAIN_V2_ENABLED": "1"}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=False)
        return
    # Embedded Ray: oversubscribe logical CPUs so Ray Data's read tasks still run when every
    # core hosts a training worker.
    global _EMBEDDED_EXTRA_CPUS
    _EMBEDDED_EXTRA_CPUS = 2
    ray.init(num_cpus=(os.cpu_count() or 1) + _EMBEDDED_EXTRA_CPUS, include_dashboard=False,
             runtime_env={"env_vars": env_vars}, log_to_driver=False)


def cluster_slots(*, use_gpu: bool, cpus_per_worker: float) -> int:
    resources = ray.cluster_resources()
    if use_gpu:
        return int(resources.get("GPU", 0))
    cpus = resources.get("CPU", 1)
    if _EMBEDDED_EXTRA_CPUS:
        # The extra logical CPUs of an embedded Ray are for Ray Data, not for more workers.
        cpus -= _EMBEDDED_EXTRA_CPUS
    return max(int(cpus // cpus_per_worker), 1)


def wants_gpu(job: JobConfig) -> bool:
    if job.resources.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(job.resources.use_gpu)


@ray.remote(num_gpus=1)
def _cuda_on_gpu_worker() -> bool:
    import torch

    return torch.cuda.is_available()


def backend_for(use_gpu: bool) -> str:
    """NCCL where the GPU workers' torch sees CUDA; gloo otherwise (logical GPUs on CPU nodes)."""
    return "nccl" if use_gpu and ray.get(_cuda_on_gpu_worker.remote()) else "gloo"


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Datasets:
    train: Any
    val: Any
    train_rows: int
    example: Any  # a few input rows, for the MLflow model signature


def check_data(job: JobConfig) -> int:
    """Prepare a built-in data set if missing, then check columns and dtypes; returns row count."""
    from trainers.data import check_columns, ensure_prepared

    if job.data.dataset is not None:
        if len(job.data.paths) != 1:
            raise UserError("data.path: a built-in data set needs exactly one folder")
        ensure_prepared(job.data.dataset, job.data.paths[0], **job.data.dataset_kwargs)
    return check_columns(job.data.paths, job.data.features, job.data.label)


def load_datasets(job: JobConfig) -> Datasets:
    import numpy as np

    from trainers.loop import make_collate

    ds = ray.data.read_parquet([os.path.abspath(p) for p in job.data.paths])
    train, val = ds.train_test_split(test_size=job.data.val_fraction) if job.data.val_fraction else (ds, ds.limit(0))
    example_batch = val.take_batch(4, batch_format="numpy") if job.data.val_fraction else ds.take_batch(4, batch_format="numpy")
    x, _ = make_collate(job.data)(example_batch)
    if job.data.label is None:
        x = x[:, :-1]
    return Datasets(train, val, train.count(), np.asarray(x.numpy()))


def steps_per_epoch(train_rows: int, global_batch: int) -> int:
    if train_rows < global_batch:
        raise UserError(
            f"training.global_batch_size: {global_batch} is larger than the {train_rows} training rows"
        )
    return train_rows // global_batch


def total_steps(job: JobConfig, per_epoch: int) -> int:
    t = job.training
    if t.max_steps is not None and t.epochs is not None:
        return min(t.max_steps, t.epochs * per_epoch)
    return t.max_steps if t.max_steps is not None else t.epochs * per_epoch  # type: ignore[operator]


# ---------------------------------------------------------------------------------------------
# Progress: rank 0 pushes, the driver polls


@ray.remote(num_cpus=0)
class ProgressActor:
    def __init__(self) -> None:
        self.step, self.info, self.events, self._stop = 0, {}, [], False

    def update(self, step: int, info: dict[str, Any]) -> None:
        self.step = step
        if "event" in info:
            self.events.append((step, info))
        else:
            self.info.update(info)

    def snapshot(self) -> tuple[int, dict[str, Any], list]:
        return self.step, dict(self.info), list(self.events)

    def request_stop(self) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop


# ---------------------------------------------------------------------------------------------
# The job


@dataclass
class JobResult:
    run_id: str
    experiment_id: str
    tracking_uri: str
    final_step: int
    metrics: dict[str, Any]
    checkpoint_path: str | None
    model_version: str | None
    workers: int
    events: list = field(default_factory=list)
    stopped: bool = False


def resolve_tracking_uri(job: JobConfig) -> str:
    """Absolute form of the tracking URI, so worker processes write to the same store."""
    import mlflow

    uri = job.resolved_tracking_uri() or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri.removeprefix("sqlite:///"))
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


@dataclass
class Launch:
    """Everything decided before the trainer starts."""

    job: JobConfig
    workers: int | tuple[int, int]
    use_gpu: bool
    data: Datasets
    steps_per_epoch: int
    total_steps: int
    run: JobRun
    max_local_batch: int | None = None


def prepare_launch(job: JobConfig, *, workers: int | None, config_path: str | None) -> Launch:
    rows = check_data(job)  # fails before any Ray worker starts
    log.info("data: %d rows in %s", rows, ", ".join(job.data.paths))
    connect_ray(job.ray.address)
    use_gpu = wants_gpu(job)
    n_workers = workers or _configured_workers(job, use_gpu=use_gpu)
    data = load_datasets(job)
    per_epoch = steps_per_epoch(data.train_rows, job.training.global_batch_size)
    run = start_job_run(
        tracking_uri=resolve_tracking_uri(job), experiment=job.tracking.experiment,
        job_name=job.name, storage_path=job.checkpoint.storage_path,
    )
    launch = Launch(job, n_workers, use_gpu, data, per_epoch, total_steps(job, per_epoch), run,
                    job.training.max_local_batch)
    _log_job(launch, config_path)
    return launch


def _configured_workers(job: JobConfig, *, use_gpu: bool) -> int | tuple[int, int]:
    w = job.resources.workers
    if isinstance(w, int):
        return w
    if w == "auto":
        return cluster_slots(use_gpu=use_gpu, cpus_per_worker=job.resources.cpus_per_worker)
    return (w.min, w.max)


def _log_job(launch: Launch, config_path: str | None) -> None:
    import torch

    run, job = launch.run, launch.job
    run.log_params(flatten(job.to_dict()))
    run.set_tags({
        "ray_version": ray.__version__, "torch_version": torch.__version__,
        "workers": launch.workers, "use_gpu": launch.use_gpu,
        "mlflow.note.content": f"`{job.name}`: {job.model.name} on {', '.join(job.data.paths)}",
        **_git_tags(),
    })
    if config_path and not run.resumed:
        run.log_artifact(config_path, "config")
    run.log_dict(job.to_dict(), "config/resolved.json")


def _git_tags() -> dict[str, str]:
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit.stdout.strip()}


def build_trainer(launch: Launch, progress: Any) -> TorchTrainer:
    from trainers.loop import LoopArgs, train_loop_per_worker

    job = launch.job
    args = LoopArgs(
        job=job.to_dict(), steps_per_epoch=launch.steps_per_epoch, total_steps=launch.total_steps,
        run_id=launch.run.run_id, tracking_uri=launch.run.tracking_uri, max_local_batch=launch.max_local_batch,
        progress=progress, spill_dir=os.path.abspath(job.checkpoint.storage_path),
    )
    storage = os.path.abspath(job.checkpoint.storage_path) if "://" not in job.checkpoint.storage_path else job.checkpoint.storage_path
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=_asdict(args),
        scaling_config=ray.train.ScalingConfig(
            num_workers=launch.workers, use_gpu=launch.use_gpu,
            resources_per_worker={"CPU": job.resources.cpus_per_worker, **({"GPU": 1} if launch.use_gpu else {})},
        ),
        torch_config=TorchConfig(backend=backend_for(launch.use_gpu)),
        run_config=ray.train.RunConfig(
            name=job.name, storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.checkpoint.keep_last),
            failure_config=ray.train.FailureConfig(max_failures=job.resources.max_failures),
        ),
        datasets={"train": launch.data.train, "val": launch.data.val},
    )


def _asdict(obj: Any) -> dict[str, Any]:
    from dataclasses import fields

    return {f.name: getattr(obj, f.name) for f in fields(obj)}


ProgressCallback = Callable[[int, int, dict[str, Any]], None]


def run_job(launch: Launch, *, on_progress: ProgressCallback | None = None,
            stop_event: threading.Event | None = None) -> JobResult:
    """Fit in a background thread while the caller's thread polls progress and stop requests."""
    progress = ProgressActor.remote()
    trainer = build_trainer(launch, progress)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the driver thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="trainer-fit", daemon=True)
    thread.start()
    stop_sent = False
    while thread.is_alive():
        thread.join(constants.PROGRESS_POLL_S)
        step, info, _ = ray.get(progress.snapshot.remote())
        if on_progress:
            on_progress(step, launch.total_steps, info)
        if stop_event is not None and stop_event.is_set() and not stop_sent:
            progress.request_stop.remote()
            stop_sent = True
    if "error" in outcome:
        launch.run.finish("FAILED")
        raise outcome["error"]
    _, info, events = ray.get(progress.snapshot.remote())
    return _finish(launch, outcome["result"], events=events, stopped=stop_sent)


def _finish(launch: Launch, result: Any, *, events: list, stopped: bool) -> JobResult:
    from trainers import checkpoint as ckpt

    run = launch.run
    metrics = dict(result.metrics or {})
    checkpoint_path = result.checkpoint.path if result.checkpoint else None
    final_step = int(metrics.get("step", 0))
    version = None
    if checkpoint_path and not stopped:
        state = ckpt.read(Path(checkpoint_path)) if result.checkpoint.filesystem.type_name == "local" else _read_remote(result.checkpoint)
        final_step = int(state["step"])
        version = register_model(launch, state)
        run.set_tags({"checkpoint": checkpoint_path})
    run.log_dict(
        {"final_step": final_step, "metrics": metrics, "events": [e[1] | {"step": e[0]} for e in events]},
        "summary.json",
    )
    run.finish("KILLED" if stopped else "FINISHED")
    return JobResult(run.run_id, run.experiment_id, run.tracking_uri, final_step, metrics,
                     checkpoint_path, version, launch.workers if isinstance(launch.workers, int) else launch.workers[1],
                     events, stopped)


def _read_remote(checkpoint: Any) -> dict[str, Any]:
    from trainers import checkpoint as ckpt

    with checkpoint.as_directory() as folder:
        return ckpt.read(Path(folder))


def register_model(launch: Launch, state: dict[str, Any]) -> str | None:
    """Log the unwrapped model with an input example; register it under the configured name."""
    import mlflow
    import torch

    from trainers.models import build_model

    job, run = launch.job, launch.run
    existing = run.client.search_model_versions(f"run_id='{run.run_id}'")
    if existing:  # a finished job run again: its model is already registered
        return existing[0].version
    model = build_model(job.model.name, job.model.kwargs)
    model.load_state_dict(state["model"])
    model.eval()
    mlflow.set_tracking_uri(run.tracking_uri)
    with mlflow.start_run(run_id=run.run_id):
        info = mlflow.pytorch.log_model(
            model, name="model", input_example=launch.data.example,
            registered_model_name=job.tracking.registered_model,
        )
    del torch
    return str(info.registered_model_version) if job.tracking.registered_model else None
