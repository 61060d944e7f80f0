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
from orchestrator.config import JobConfig, WorkerRange, flatten
from orchestrator.errors import UserError
from orchestrator.planner import ClusterSpec, Plan, Prediction, Profile
from orchestrator.tracking import JobRun, start_job_run
from trainers.batching import split_global_batch

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
    ray.init(address="local", num_cpus=(os.cpu_count() or 1) + _EMBEDDED_EXTRA_CPUS, include_dashboard=False,
             runtime_env={"env_vars": env_vars}, log_to_driver=False)


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
class Sizing:
    """How many workers, and why: the plan (workers: auto) or the prediction for a fixed count."""

    workers: int | tuple[int, int]
    max_local_batch: int | None
    profile: Profile | None = None
    profile_cached: bool = False
    cluster: ClusterSpec | None = None
    plan: Plan | None = None
    prediction: Prediction | None = None

    @property
    def explanation(self) -> str:
        if self.plan is not None:
            return self.plan.explanation
        if self.prediction is not None:
            p = self.prediction
            return (f"{p.gpus} workers as configured: predicted {p.step_time_s * 1e3:.1f} ms/step, "
                    f"{p.throughput:,.0f} samples/s, scaling efficiency {p.efficiency:.2f}.")
        return "workers as configured (profiling off)."


@dataclass
class Launch:
    """Everything decided before the trainer starts."""

    job: JobConfig
    sizing: Sizing
    use_gpu: bool
    data: Datasets
    steps_per_epoch: int
    total_steps: int
    run: JobRun

    @property
    def workers(self) -> int | tuple[int, int]:
        return self.sizing.workers


def prepare_launch(job: JobConfig, *, workers: int | None, config_path: str | None) -> Launch:
    job = job.localized()
    rows = check_data(job)  # fails before any Ray worker starts
    log.info("data: %d rows in %s", rows, ", ".join(job.data.paths))
    connect_ray(job.ray.address)
    use_gpu = wants_gpu(job)
    data = load_datasets(job)
    per_epoch = steps_per_epoch(data.train_rows, job.training.global_batch_size)
    steps = total_steps(job, per_epoch)
    sizing = size_job(job, workers=workers, use_gpu=use_gpu, total_samples=steps * job.training.global_batch_size)
    run = start_job_run(
        tracking_uri=resolve_tracking_uri(job), experiment=job.tracking.experiment,
        job_name=job.name, storage_path=job.checkpoint.storage_path,
    )
    launch = Launch(job, sizing, use_gpu, data, per_epoch, steps, run)
    _log_job(launch, config_path)
    return launch


# ---------------------------------------------------------------------------------------------
# Sizing: profile, plan


def live_cluster(job: JobConfig, *, use_gpu: bool) -> ClusterSpec:
    """The cluster file if the config names one, else the live Ray cluster's shape."""
    from orchestrator.cluster import CPU_DEFAULTS, GPU_DEFAULTS, discover_cluster, load_cluster, spec_from_nodes

    if job.resources.cluster:
        return load_cluster(job.resources.cluster)
    defaults = GPU_DEFAULTS if use_gpu else CPU_DEFAULTS
    if _EMBEDDED_EXTRA_CPUS and not use_gpu:
        # An embedded Ray declares extra logical CPUs for Ray Data; plan for the real cores.
        node = {"Alive": True, "Resources": {"CPU": os.cpu_count() or 1}}
        return spec_from_nodes([node], defaults, use_gpu=False, cpus_per_worker=job.resources.cpus_per_worker)
    return discover_cluster(defaults, use_gpu=use_gpu, cpus_per_worker=job.resources.cpus_per_worker)


def size_job(job: JobConfig, *, workers: int | None, use_gpu: bool, total_samples: int) -> Sizing:
    from orchestrator.planner import placement_for, plan, predict
    from orchestrator.profiler import profile_job

    configured = job.resources.workers
    fixed = workers or (configured if isinstance(configured, int) else None)
    if fixed and not job.resources.profile:
        return Sizing(fixed, job.training.max_local_batch)
    profile, cached = profile_job(job, use_gpu=use_gpu)
    cluster = live_cluster(job, use_gpu=use_gpu)
    if fixed:
        placement = placement_for(cluster, fixed)
        split = split_global_batch(job.training.global_batch_size, workers=fixed, max_local_batch=profile.max_local_batch)
        prediction = predict(profile, cluster, nodes=placement.nodes, gpus_per_node=placement.gpus_per_node,
                             local_batch=split.local_batch, accumulation=split.accumulation, total_samples=total_samples)
        return Sizing(fixed, profile.max_local_batch, profile, cached, cluster, prediction=prediction)
    r = job.resources
    deadline = r.deadline_hours * 3600 if r.deadline_hours else None
    max_gpus = configured.max if isinstance(configured, WorkerRange) else None
    chosen = plan(profile, cluster, objective=r.objective, min_efficiency=r.min_efficiency,
                  global_batch=job.training.global_batch_size, total_samples=total_samples,
                  deadline_s=deadline, budget=r.budget, max_gpus=max_gpus)
    count: int | tuple[int, int] = chosen.workers
    if isinstance(configured, WorkerRange):
        count = (configured.min, max(configured.min, chosen.workers))
    return Sizing(count, chosen.choice.local_batch, profile, cached, cluster, plan=chosen, prediction=chosen.choice)


def _log_job(launch: Launch, config_path: str | None) -> None:
    import torch

    run, job, sizing = launch.run, launch.job, launch.sizing
    run.log_params(flatten(job.to_dict()))
    run.set_tags({
        "ray_version": ray.__version__, "torch_version": torch.__version__,
        "workers": _describe_workers(launch.workers), "use_gpu": launch.use_gpu,
        **({"placement": str(sizing.prediction.placement)} if sizing.prediction else {}),
        "mlflow.note.content": run_description(launch),
        **_git_tags(),
    })
    if config_path and not run.resumed:
        run.log_artifact(config_path, "config")
    run.log_dict(job.to_dict(), "config/resolved.json")
    if not run.resumed:
        run.log_dataset(name=job.data.dataset or Path(job.data.paths[0]).name, uri=job.data.paths[0],
                        rows=launch.data.train_rows, schema=_data_schema(job))
    _log_sizing(run, sizing)


def _describe_workers(workers: int | tuple[int, int]) -> str:
    return str(workers) if isinstance(workers, int) else f"{workers[0]}-{workers[1]} (elastic)"


def _data_schema(job: JobConfig) -> dict[str, str]:
    columns = {job.data.features.column: f"list<{job.data.features.dtype}>"}
    if job.data.label:
        columns[job.data.label.column] = job.data.label.dtype
    return columns


def _log_sizing(run: JobRun, sizing: Sizing) -> None:
    """profile.json, plan.json and the scaling plot, plus the prediction as metrics."""
    import tempfile

    from orchestrator.plots import scaling_plot

    if sizing.profile is not None:
        run.log_dict(sizing.profile.to_dict(), "profile/profile.json")
    if sizing.plan is not None:
        run.log_dict(sizing.plan.to_dict(), "plan/plan.json")
        with tempfile.TemporaryDirectory() as tmp:
            run.log_artifact(scaling_plot(sizing.plan, Path(tmp) / "scaling.png"), "plan")
    if sizing.prediction is not None:
        p = sizing.prediction
        run.log_metrics({"plan/predicted_step_time_s": p.step_time_s, "plan/predicted_samples_per_s": p.throughput,
                         "plan/predicted_efficiency": p.efficiency}, step=0)


def run_description(launch: Launch) -> str:
    """Markdown shown at the top of the MLflow run page."""
    job, sizing = launch.job, launch.sizing
    lines = [
        f"**{job.name}**: `{job.model.name}` on `{', '.join(job.data.paths)}` "
        f"({launch.data.train_rows} training rows), global batch {job.training.global_batch_size}, "
        f"{launch.total_steps} steps.",
        "",
        f"**Workers:** {_describe_workers(launch.workers)}. {sizing.explanation}",
    ]
    if sizing.plan is not None:
        lines += ["", "| GPUs | placement | local batch x accum | step (ms) | samples/s | efficiency | note |",
                  "|---:|---|---|---:|---:|---:|---|"]
        for c in sizing.plan.best_per_gpu_count():
            p = c.prediction
            mark = "**chosen**" if p == sizing.plan.choice else (c.reason or "")
            lines.append(f"| {p.gpus} | {p.placement} | {p.local_batch} x {p.accumulation} | "
                         f"{p.step_time_s * 1e3:.2f} | {p.throughput:,.0f} | {p.efficiency:.2f} | {mark} |")
        lines += ["", "Scaling plot: artifact `plan/scaling.png`; profile: `profile/profile.json`."]
    return "\n".join(lines)


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
        run_id=launch.run.run_id, tracking_uri=launch.run.tracking_uri, max_local_batch=launch.sizing.max_local_batch,
        progress=progress, spill_dir=job.checkpoint.storage_path,
    )
    storage = job.checkpoint.storage_path
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
    observed = metrics.get("observed_step_time_s")
    if observed:
        predicted = launch.sizing.prediction
        run.log_metrics({"plan/observed_step_time_s": observed,
                         **({"plan/observed_over_predicted": observed / predicted.step_time_s} if predicted else {})},
                        step=final_step)
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
