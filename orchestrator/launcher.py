"""The driver: connect to Ray, check the data, size the job (and ask the autoscaler for it), start
or resume the MLflow run, launch the TorchTrainer, follow it (restarts, re-planning, resizes), and
register the trained model."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.train
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator import autoscale, constants
from orchestrator.ray_session import connect_ray, embedded, torch_config
from orchestrator.config import JobConfig, WorkerRange, flatten
from orchestrator.errors import UserError
from orchestrator.monitor import PROGRESS_NAMESPACE, FailureForwarder, JobMonitor, StatusCallback, progress_actor_name
from orchestrator.planner import ClusterSpec, Plan, Prediction, Profile
from trainers.batching import split_global_batch

if TYPE_CHECKING:
    from orchestrator.tracking import JobRun

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Ray


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

    from trainers.data import open_dataset
    from trainers.data.collate import Collate

    ds = ray.data.read_parquet([os.path.abspath(p) for p in job.data.paths])
    train, val = ds.train_test_split(test_size=job.data.val_fraction) if job.data.val_fraction else (ds, ds.limit(0))
    # The model's input example (its MLflow signature): the first rows, read by pyarrow directly
    # rather than by one more Ray Data job.
    x, _ = Collate(job.data)(open_dataset(job.data.paths).head(4, columns=job.data.columns))
    if job.data.label is None:
        x = x[:, :-1].contiguous()  # the model sees tokens without the last target
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
    """Rank 0 pushes steps, metrics and events; every rank registers its process and node; the
    controller forwards failures; the driver polls and asks for a stop (SIGTERM, or a resize)."""

    def __init__(self) -> None:
        self.step, self.info, self.events, self.workers = 0, {}, [], {}
        self._stop = False
        self._group: dict[str, Any] | None = None  # the latest worker-group start event

    def update(self, step: int, info: dict[str, Any]) -> None:
        # Events carry the wall time they arrived ("at"); a group's start event also gets the time
        # its first step was reported ("first_step_at"): restart and recovery times, on one clock.
        now = time.time()
        self.step = step
        if "event" not in info:
            self.info.update({k: v for k, v in info.items() if k != "step_times_s"})
            if self._group is not None and "first_step_at" not in self._group:
                self._group["first_step_at"] = now
            return
        info = {**info, "at": now}
        self.events.append((step, info))
        if "workers" in info:  # a new worker group: drop what the previous one reported
            self._group, self.info = info, {}
            self.workers = {r: w for r, w in self.workers.items() if r < info["workers"]}

    def register_worker(self, rank: int, pid: int, node_id: str) -> None:
        self.workers[rank] = {"pid": pid, "node_id": node_id}

    def record_failure(self, cause: str) -> None:
        self.events.append((self.step, {"event": "failure", "cause": cause, "at": time.time()}))

    def snapshot(self) -> tuple[int, dict[str, Any], list, dict[int, dict[str, Any]]]:
        return self.step, dict(self.info), list(self.events), dict(self.workers)

    def request_stop(self) -> None:
        self._stop = True

    def clear_stop(self) -> None:
        self._stop = False

    def stop_requested(self) -> bool:
        return self._stop


def progress_actor(run_id: str) -> Any:
    """The progress actor of the job running for MLflow run `run_id` (for tools and tests)."""
    return ray.get_actor(progress_actor_name(run_id), namespace=PROGRESS_NAMESPACE)


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
    restarts: int = 0  # worker-group restarts after failures, over the whole run
    resizes: int = 0  # resizes decided by online re-planning, over the whole run
    replan: list = field(default_factory=list)  # this execution's re-planning decisions


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


@dataclass(frozen=True)
class Autoscaled:
    """What the autoscaler was asked for and delivered; `before` is the sizing it replaced."""

    requester: str
    arrival: autoscale.Arrival
    before: Sizing | None = None


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
    autoscaled: Autoscaled | None = None  # a standing autoscaler request, released by run_job
    released: bool = False

    @property
    def workers(self) -> int | tuple[int, int]:
        return self.sizing.workers

    def release(self) -> None:
        """Withdraw the autoscaler request: once Ray Train's worker group runs (Ray Train keeps its
        own request from then on; both would ask for the workers twice), and when the job ends."""
        if self.autoscaled is not None and not self.released:
            autoscale.release(self.autoscaled.requester)
            self.released = True


def prepare_launch(job: JobConfig, *, workers: int | None, config_path: str | None,
                   on_status: StatusCallback | None = None) -> Launch:
    job = job.localized()
    rows = check_data(job)  # fails before any Ray worker starts
    log.info("data: %d rows in %s", rows, ", ".join(job.data.paths))
    tracking_warm_up = _warm_up_tracking(job)
    connect_ray(job.ray.address)
    use_gpu = wants_gpu(job)
    data = load_datasets(job)
    per_epoch = steps_per_epoch(data.train_rows, job.training.global_batch_size)
    steps = total_steps(job, per_epoch)
    samples = steps * job.training.global_batch_size
    autoscaled = None
    if autoscale_enabled(job):
        sizing, autoscaled = autoscale_job(job, workers=workers, use_gpu=use_gpu, total_samples=samples,
                                           on_status=on_status)
    else:
        sizing = size_job(job, workers=workers, use_gpu=use_gpu, total_samples=samples)
    tracking_warm_up.join()
    from orchestrator.tracking import start_job_run

    try:
        run = start_job_run(
            tracking_uri=resolve_tracking_uri(job), experiment=job.tracking.experiment,
            job_name=job.name, storage_path=job.checkpoint.storage_path,
        )
        launch = Launch(job, sizing, use_gpu, data, per_epoch, steps, run, autoscaled)
        _log_job(launch, config_path)
    except BaseException:
        if autoscaled is not None:
            autoscale.release(autoscaled.requester)
        raise
    return launch


def _warm_up_tracking(job: JobConfig) -> threading.Thread:
    """Import MLflow and open the tracking store (read only) while Ray reads and splits the data:
    seconds each, independent, and both before the first step. The run itself is created after
    sizing, so a job refused there leaves no run behind."""

    def warm_up() -> None:
        try:
            from orchestrator.tracking import client

            client(resolve_tracking_uri(job)).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - creating the run meets it again and reports it
            log.debug("tracking warm-up: %s", exc)

    thread = threading.Thread(target=warm_up, name="mlflow-warm-up", daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------------------------------------
# Autoscaling: ask for the planned workers, wait, re-plan with what arrived


def autoscale_enabled(job: JobConfig) -> bool:
    """resources.autoscale: false never; true on any cluster Ray joins; auto where an autoscaler
    can add nodes. An embedded Ray has nothing to scale."""
    mode = job.resources.autoscale
    if mode is False or embedded():
        return False
    return mode is True or autoscale.autoscaler_present()


def autoscale_job(job: JobConfig, *, workers: int | None, use_gpu: bool, total_samples: int,
                  on_status: StatusCallback | None) -> tuple[Sizing, Autoscaled]:
    """Request one bundle per wanted worker, wait for them, and size the job on what arrived.

    Wanted: a fixed count; a range's max when no cluster file says what the cluster can grow to
    (the live cluster may not have the nodes yet); else the plan's count (on the cluster file, or
    the live cluster). The job is sized (profiled, planned) on what arrived, so the profile runs on
    an arrived GPU; with fewer than planned it is re-planned. A fixed count cannot shrink (an
    error). The request stands until `Launch.release`.
    """
    from orchestrator.tracking import run_key

    r = job.resources
    fixed = _fixed_workers(job, workers)
    grows = isinstance(r.workers, WorkerRange) and not r.cluster
    sizing = None if fixed or grows else size_job(job, workers=None, use_gpu=use_gpu, total_samples=total_samples)
    wanted = fixed or (_most(sizing.workers) if sizing is not None else r.workers.max)  # type: ignore[union-attr]
    timeout = constants.AUTOSCALE_TIMEOUT_S if r.autoscale_timeout_s is None else r.autoscale_timeout_s
    requester = f"orchestrator-{run_key(job.name, job.checkpoint.storage_path)}"
    autoscale.request(requester, autoscale.worker_bundles(wanted, use_gpu=use_gpu, cpus_per_worker=r.cpus_per_worker),
                      ttl_s=timeout + constants.AUTOSCALE_REQUEST_TTL_S)
    try:
        arrival = autoscale.wait_for_workers(wanted, use_gpu=use_gpu, cpus_per_worker=r.cpus_per_worker,
                                             timeout_s=timeout, on_status=on_status)
        least = fixed or (r.workers.min if isinstance(r.workers, WorkerRange) else 1)
        if arrival.arrived < least:
            raise UserError(
                f"resources.workers: {arrival.arrived} of the {wanted} workers wanted arrived within {timeout:g} s "
                f"(resources.autoscale_timeout_s), fewer than the {least} the job needs"
                + (" (a fixed count does not shrink: use workers: {min, max} or auto to run on what arrives)"
                   if fixed else "")
            )
        if sizing is not None and not arrival.shortfall:
            return sizing, Autoscaled(requester, arrival)
        resized = size_job(job, workers=workers, use_gpu=use_gpu, total_samples=total_samples,
                           max_workers=arrival.arrived)
        if arrival.shortfall and on_status is not None:
            on_status(f"autoscaler: {arrival.arrived} of {wanted} workers arrived; sized on those: "
                      f"{_describe_workers(resized.workers)}. {resized.explanation}")
        return resized, Autoscaled(requester, arrival, before=sizing)
    except BaseException:
        autoscale.release(requester)
        raise


def _most(workers: int | tuple[int, int]) -> int:
    return workers if isinstance(workers, int) else workers[1]


# ---------------------------------------------------------------------------------------------
# Sizing: profile, plan


def live_cluster(job: JobConfig, *, use_gpu: bool) -> ClusterSpec:
    """The cluster file if the config names one, else the live Ray cluster's shape."""
    from orchestrator.cluster import CPU_DEFAULTS, GPU_DEFAULTS, discover_cluster, load_cluster, spec_from_nodes

    if job.resources.cluster:
        return load_cluster(job.resources.cluster)
    defaults = GPU_DEFAULTS if use_gpu else CPU_DEFAULTS
    if embedded() and not use_gpu:
        # An embedded Ray declares extra logical CPUs for Ray Data; plan for the real cores.
        node = {"Alive": True, "Resources": {"CPU": os.cpu_count() or 1}}
        return spec_from_nodes([node], defaults, use_gpu=False, cpus_per_worker=job.resources.cpus_per_worker)
    return discover_cluster(defaults, use_gpu=use_gpu, cpus_per_worker=job.resources.cpus_per_worker)


def _fixed_workers(job: JobConfig, workers: int | None) -> int | None:
    configured = job.resources.workers
    return workers or (configured if isinstance(configured, int) else None)


def size_job(job: JobConfig, *, workers: int | None, use_gpu: bool, total_samples: int,
             max_workers: int | None = None) -> Sizing:
    """Profile and plan (workers: auto or a range) or predict (a fixed count); `max_workers` caps
    the plan (the workers that arrived when the autoscaler delivered fewer)."""
    from orchestrator.planner import placement_for, plan, predict
    from orchestrator.profiler import profile_job

    configured = job.resources.workers
    fixed = _fixed_workers(job, workers)
    if fixed and not job.resources.profile:
        return Sizing(fixed, job.training.max_local_batch)
    if isinstance(configured, WorkerRange) and not job.resources.profile:
        top = min(configured.max, max_workers or configured.max)
        return Sizing((configured.min, max(configured.min, top)), job.training.max_local_batch)
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
    caps = [c for c in (configured.max if isinstance(configured, WorkerRange) else None, max_workers) if c]
    max_gpus = min(caps) if caps else None
    chosen = plan(profile, cluster, objective=r.objective, min_efficiency=r.min_efficiency,
                  global_batch=job.training.global_batch_size, total_samples=total_samples,
                  deadline_s=deadline, budget=r.budget, max_gpus=max_gpus)
    count: int | tuple[int, int] = chosen.workers
    if isinstance(configured, WorkerRange):
        count = (configured.min, max(configured.min, chosen.workers))
    # The memory limit, not the chosen micro-batch: the loop splits the global batch again for
    # whatever worker count an elastic (re)start gets, and gives the plan's split at the plan's count.
    return Sizing(count, profile.max_local_batch, profile, cached, cluster, plan=chosen, prediction=chosen.choice)


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
    if launch.autoscaled is not None:
        _log_autoscale(run, launch.autoscaled, sizing)


def _log_autoscale(run: JobRun, autoscaled: Autoscaled, sizing: Sizing) -> None:
    """What was asked of the autoscaler, what arrived, and the sizing it replaced, if any."""
    arrival = autoscaled.arrival
    run.set_tags({f"autoscale.{k}": v for k, v in arrival.to_dict().items()})
    if arrival.shortfall:
        run.set_tags({"autoscale.replan": f"{arrival.arrived} of {arrival.wanted} workers arrived: "
                                          f"{_describe_workers(sizing.workers)}. {sizing.explanation}"})
    before = autoscaled.before
    if before is not None and before.plan is not None and arrival.shortfall:
        run.log_dict(before.plan.to_dict(), "plan/plan_before_autoscale.json")


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


def build_trainer(launch: Launch, progress: Any, workers: int | tuple[int, int] | None = None) -> TorchTrainer:
    """The job's TorchTrainer; the same RunConfig (name, storage) every time, so a new fit resumes
    from the job's latest checkpoint."""
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
            num_workers=workers or launch.workers, use_gpu=launch.use_gpu,
            resources_per_worker={"CPU": job.resources.cpus_per_worker, **({"GPU": 1} if launch.use_gpu else {})},
        ),
        torch_config=torch_config(backend_for(launch.use_gpu)),
        run_config=ray.train.RunConfig(
            name=job.name, storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.checkpoint.keep_last),
            failure_config=ray.train.FailureConfig(max_failures=job.resources.max_failures),
            callbacks=[FailureForwarder(progress)],
        ),
        datasets={"train": launch.data.train, "val": launch.data.val},
    )


def _asdict(obj: Any) -> dict[str, Any]:
    from dataclasses import fields

    return {f.name: getattr(obj, f.name) for f in fields(obj)}


ProgressCallback = Callable[[int, int, dict[str, Any]], None]


def run_job(launch: Launch, *, on_progress: ProgressCallback | None = None,
            stop_event: threading.Event | None = None, on_status: StatusCallback | None = None) -> JobResult:
    """Fit in a background thread while the caller's thread polls progress and stop requests.

    A resize decided by online re-planning stops the fit at a checkpoint and fits again with the
    new worker count, resuming from it. The MLflow run ends FINISHED, KILLED (stopped: a final
    checkpoint was written and the same command resumes) or FAILED; the autoscaler request, if
    any, is withdrawn either way.
    """
    name = progress_actor_name(launch.run.run_id)
    # On the driver's node: the actor must outlive any worker node the job loses.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = ProgressActor.options(name=name, namespace=PROGRESS_NAMESPACE, scheduling_strategy=here).remote()
    monitor = JobMonitor(launch, on_status=on_status)
    workers = launch.workers
    try:
        while True:
            result, stop = _fit(launch, progress, workers, monitor, on_progress, stop_event)
            done = int((result.metrics or {}).get("step", 0)) >= launch.total_steps
            if stop != "resize" or done:
                break
            workers = monitor.workers_after_resize()
            monitor.resize_started(int(result.metrics.get("step", 0)))
            ray.get(progress.clear_stop.remote())
        _, _, events, _ = ray.get(progress.snapshot.remote())
        return _finish(launch, result, events=events, stopped=stop == "user" and not done, monitor=monitor)
    except KeyboardInterrupt:
        launch.run.finish("KILLED")
        raise
    except BaseException:
        launch.run.finish("FAILED")
        raise
    finally:
        launch.release()
        _kill_named(progress, name)


def _kill_named(actor: Any, name: str) -> None:
    """Kill the progress actor and wait until its name is free: the same job run again from this
    process (a rerun after a stop) names its actor alike."""
    ray.kill(actor)
    deadline = time.monotonic() + constants.ACTOR_RELEASE_S
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=PROGRESS_NAMESPACE)
        except ValueError:
            return
        time.sleep(0.05)


def _fit(launch: Launch, progress: Any, workers: int | tuple[int, int], monitor: JobMonitor,
         on_progress: ProgressCallback | None, stop_event: threading.Event | None) -> tuple[Any, str | None]:
    """One TorchTrainer.fit; returns its result and why it was asked to stop ("user", "resize", None)."""
    trainer = build_trainer(launch, progress, workers)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the driver thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="trainer-fit", daemon=True)
    thread.start()
    stop: str | None = None
    while thread.is_alive():
        thread.join(constants.PROGRESS_POLL_S)
        step, info, events, ranks = ray.get(progress.snapshot.remote())
        monitor.observe(step, info, events, ranks)
        if monitor.groups_started:
            launch.release()
        if on_progress:
            on_progress(step, launch.total_steps, info)
        if stop_event is not None and stop_event.is_set() and stop != "user":
            stop = "user"  # overrides a pending resize
            progress.request_stop.remote()
        elif monitor.resize_to is not None and stop is None:
            stop = "resize"
            progress.request_stop.remote()
    monitor.observe(*ray.get(progress.snapshot.remote()))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], stop


def _finish(launch: Launch, result: Any, *, events: list, stopped: bool, monitor: JobMonitor) -> JobResult:
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
        monitor.log_metrics({"plan/observed_step_time_s": observed,
                             **({"plan/observed_over_predicted": observed / predicted.step_time_s} if predicted else {})},
                            step=final_step)
    run.log_dict(
        {"final_step": final_step, "metrics": metrics, "events": [e[1] | {"step": e[0]} for e in events],
         "restarts": monitor.restarts, "resizes": monitor.resizes, "replan": monitor.decisions},
        "summary.json",
    )
    run.finish("KILLED" if stopped else "FINISHED")
    workers = monitor.group.workers if monitor.group else _most(launch.workers)
    return JobResult(run.run_id, run.experiment_id, run.tracking_uri, final_step, metrics,
                     checkpoint_path, version, workers, events, stopped, monitor.restarts, monitor.resizes,
                     monitor.decisions)


def _read_remote(checkpoint: Any) -> dict[str, Any]:
    from trainers import checkpoint as ckpt

    with checkpoint.as_directory() as folder:
        return ckpt.read(Path(folder))


def register_model(launch: Launch, state: dict[str, Any]) -> str | None:
    """Log the unwrapped model with an input example; register it under the configured name."""
    import mlflow

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
    return str(info.registered_model_version) if job.tracking.registered_model else None
