"""Commands that train: validate, run, data prepare, profile."""

from __future__ import annotations

import re
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from orchestrator.cli.app import SetOption, app, console, data_app, note, out
from orchestrator.errors import UserError, given, shown
from orchestrator.redact import scrub


@app.command()
def validate(config: Path, set_: SetOption = None) -> None:
    """Check a job config, its model against the features, and its data when present; starts nothing."""
    from orchestrator.config import load_config

    job = load_config(config, set_ or [])  # before torch's import: a bad file is said within a second
    job.resolved_tracking_uri()  # MLFLOW_TRACKING_URI, when the config names no tracking_uri
    check_job_files(job, placing=True)

    from orchestrator.driver.data import check_batch_fits
    from orchestrator.storage import is_remote
    from trainers.compat import check_fit, output_classes
    from trainers.data.datasets import check_dataset_kwargs

    if job.data.dataset:  # its options, also where a copy is already there (only a first run prepares it)
        check_dataset_kwargs(job.data.dataset, job.data.dataset_kwargs)
    if job.data.dataset and not all(Path(p).exists() for p in job.data.paths):
        # A mistyped path validates too: say that the first run prepares a new copy there.
        output_classes(job.model, job.data)  # the model takes the features (a pass on the meta device)
        data = f"not there yet, a new copy of the built-in {job.data.dataset!r} data set is prepared there on first run"
    else:
        rows = check_fit(job.model, job.data)  # from the Parquet footers
        data = f"{rows} rows"
        if not any(is_remote(p) for p in job.data.paths):  # remote data may change before `run`: it says
            said = check_batch_fits(job, rows)
            if said:
                note(escape(said))
    out.print(scrub(f"{config}: ok ({job.name}: model {job.model.name}, data {', '.join(job.data.paths)}: {data})"))
    renamed = any(o.partition("=")[0].strip() == "name" for o in set_ or [])
    if renamed and job.tracking.registered_model:
        note(f"note: the model is still registered as {escape(repr(job.tracking.registered_model))} "
             "(tracking.registered_model); --set name=... renames the job and its MLflow run only")


@app.command()
def run(
    config: Path,
    workers: Annotated[int | None, typer.Option(help="Worker count; skips planning.")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address; default: config ray.address or embedded.")] = None,
    new_run: Annotated[bool, typer.Option("--new-run", help="Start a fresh run under this job name (the old "
                                          "checkpoints and MLflow run stay as they are).")] = False,
    config_sha256: Annotated[str | None, typer.Option(help="Train only if CONFIG's SHA-256 is this (hex): "
                                                           "`k8s render` pins its ConfigMap's so.")] = None,
    set_: SetOption = None,
) -> None:
    """Train a job: check data, (plan), launch on Ray Train, track in MLflow."""
    from orchestrator.config import load_config

    if config_sha256 is not None:
        check_digest(config, config_sha256)
    overrides = list(set_ or [])
    if given(address, "--address"):
        overrides.append(f"ray.address={address}")
    if workers is not None and workers <= 0:
        raise UserError(f"--workers: must be > 0, got {workers}")
    job = load_config(config, overrides)  # before the driver's imports (torch, Ray): a bad file fails fast
    check_job_files(job, placing=True, workers=workers)

    from orchestrator.console_ui import RichUI, result_lines
    from orchestrator.driver import run_job
    from orchestrator.driver.ports import Aborted
    from orchestrator.driver.run_record import resolve_tracking_uri

    stop = threading.Event()
    aborted = False
    try:
        with RichUI(console) as ui, _graceful_stop(stop, then=ui.on_stop) as received:
            result = run_job(job, workers=workers, config_path=str(config), ui=ui, stop=stop, new_run=new_run)
    except Aborted as exc:  # a second signal: the run is closed; its closing lines say what MLflow did not take
        result, aborted = exc.result, True
    for line in result_lines(result, tracking_uri=resolve_tracking_uri(job),
                             registered_model=job.tracking.registered_model, new_run=new_run):
        out.print(line, highlight=False)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # a complete job started none: ray_session imports torch
        from orchestrator.ray_session import shutdown_quietly

        shutdown_quietly()
    if result.stopped or aborted:  # checkpointed (or aborted), not finished: 128 + the signal, as the shell
        # reports a killed process, so a scheduler sees it unfinished
        raise typer.Exit(128 + (received[0] if received else signal.SIGTERM))


def check_digest(config: Path, expected: str) -> None:
    """The config is the file the job was rendered with: on Kubernetes the RayJob (its owner's)
    pins the digest of the ConfigMap it mounts, which another submitter could have created first."""
    import hashlib

    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise UserError(f"--config-sha256: must be 64 lowercase hex digits, got {expected!r}")
    try:
        found = hashlib.sha256(config.read_bytes()).hexdigest()
    except OSError as exc:
        raise UserError(f"{config}: cannot read ({exc.strerror or exc})") from None
    if found != expected:
        raise UserError(f"{config}: SHA-256 {found[:12]}... is not the {expected[:12]}... this job was rendered "
                        "with (--config-sha256); it is another config (on Kubernetes: a <job>-config ConfigMap "
                        "someone else created); nothing was run")


def check_job_files(job: Any, *, placing: bool = False, workers: int | None = None) -> None:
    """The local files a job names beside its data, checked now: a missing or broken
    `resources.cluster` file passed `validate` and was said by `run` and `profile` only once an
    embedded Ray had started; so was a `tracking.spill_dir` that is a file (and the default
    tracking store, ./mlflow.db, is checked as a given tracking_uri is). `placing` (validate, run):
    a fixed worker count (`workers`, else the config's) that the cluster file cannot hold, which
    `run` said only after profiling."""
    if job.resources.cluster:
        from orchestrator.driver.sizing import fixed_workers
        from orchestrator.planner import load_cluster, placement_for

        spec = load_cluster(job.resources.cluster)
        fixed = fixed_workers(job, workers)
        if placing and fixed and job.resources.profile:  # size_job places it on the file's nodes
            placement_for(spec, fixed)
    spill = job.tracking.spill_dir
    if spill and "://" in spill:  # as a Path, s3://b/x is ./s3:/b/x: the spill stayed in a pod's working dir
        raise UserError("tracking.spill_dir: must be a local folder (what MLflow could not take waits on this "
                        f"machine's disk), not a URI, got {shown(spill)}")
    if spill and Path(spill).exists() and not Path(spill).is_dir():
        raise UserError(f"tracking.spill_dir: cannot write to {spill} (not a folder)")
    if job.resolved_tracking_uri() is None:  # the default store, ./mlflow.db: checked as a given one is
        from orchestrator.config import DEFAULT_TRACKING_URI, check_tracking_uri

        check_tracking_uri(DEFAULT_TRACKING_URI, "tracking.tracking_uri")


@contextmanager
def _graceful_stop(stop: threading.Event, *, then: Callable[[], str]):
    """First SIGTERM/Ctrl-C: checkpoint and stop cleanly (before training starts: just stop); a
    second one exits at once. Yields the list the first signal's number is appended to."""
    received: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        console.print(f"[yellow]{signal.Signals(signum).name}: {then()} (again to abort)[/yellow]")
        received.append(signum)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@data_app.command("prepare")
def data_prepare(
    name: Annotated[str, typer.Argument(help="digits | synthetic | corpus")],
    out_dir: Annotated[str, typer.Option("--out", help="Folder to write Parquet files into.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Data set option, e.g. --set rows=1024")] = None,
) -> None:
    """Write a built-in data set as Parquet."""
    from orchestrator.config import parse_override
    from trainers.data import prepare_dataset

    given(out_dir, "--out", "give the folder to write the Parquet files into")  # not the current folder
    kwargs = {".".join(k): v for k, v in (parse_override(s) for s in set_ or [])}
    try:
        path = prepare_dataset(name, Path(out_dir), **kwargs)
    except UserError as exc:  # the library names the config's fields; here the user gave flags
        said = str(exc)
        for field, flag in _PREPARE_FLAGS.items():
            said = re.sub(rf"^{re.escape(field)}\b", flag, said)
        raise UserError(said) from None
    out.print(f"wrote {name} to {path}")


# What `data prepare` was given in place of the config fields its errors name.
_PREPARE_FLAGS = {"data.path": "--out", "data.dataset_kwargs.": "--set ", "data.dataset_kwargs": "--set",
                  "data.dataset": "NAME"}


@app.command()
def profile(
    config: Path,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the profile JSON.")] = Path("profile.json"),
    address: Annotated[str | None, typer.Option(help="Ray address; default: config ray.address or embedded.")] = None,
    refresh: Annotated[bool, typer.Option(help="Measure again even if a cached profile exists.")] = False,
    set_: SetOption = None,
) -> None:
    """Profile the job on ONE worker (one GPU, or the CPU): step time per batch, memory, noise."""
    from orchestrator.config import load_config
    from orchestrator.files import check_writable, distinct_outputs

    overrides = list(set_ or []) + ([f"ray.address={address}"] if given(address, "--address") else [])
    job = load_config(config, overrides).localized()
    check_job_files(job)
    # -o CONFIG (or the job's cluster file, or one of its data files) replaced what the job is made of
    distinct_outputs({"-o": output}, {"the config": config, "resources.cluster": job.resources.cluster,
                                      **{f"data.path {p}": p for p in job.data.paths if "://" not in p}})
    check_writable(output)

    from orchestrator.driver.data import check_data
    from orchestrator.driver.sizing import live_cluster, wants_gpu
    from orchestrator.profiler import profile_job
    from orchestrator.ray_session import connect_ray

    check_data(job)
    connect_ray(job.ray.address)
    use_gpu = wants_gpu(job)
    per_node = live_cluster(job, use_gpu=use_gpu).gpus_per_node
    measured, cached = profile_job(job, use_gpu=use_gpu, gpus_per_node=per_node, refresh=refresh)
    measured.save(output)
    seconds = measured.meta.get("profile_seconds", 0)
    out.print(f"wrote {output} ({'cached' if cached else f'measured in {seconds:.1f} s'}, {measured.device}):")
    for sample in measured.samples:
        out.print(f"  local batch {sample.local_batch:>5}: {sample.step_time_s * 1e3:8.2f} ms/step")
    noise = measured.gradient_noise_scale
    out.print(f"  max local batch {measured.max_local_batch}, gradient bytes {measured.grad_bytes:,}, "
              f"data {measured.data_samples_per_s or 0:,.0f} samples/s, noise scale {noise or float('nan'):.4g}")
