"""`orchestrator` command line: parse, validate, build, run; user errors are one line, exit 2."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Plan, train and track data-parallel jobs on Ray.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare data sets as Parquet.")
app.add_typer(data_app, name="data")
console = Console(stderr=True)
out = Console(soft_wrap=True)  # result lines stay whole for scripts that parse them

SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a field: --set training.lr=0.01")]


def main() -> None:
    """Entry point: every UserError becomes one line on stderr and exit code 2."""
    # Nothing phones home by default (MLflow's client otherwise reports usage to an outside host).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.basicConfig(level=os.environ.get("ORCH_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        app(standalone_mode=False)
    except UserError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click's usage errors carry their own exit code
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        raise


@app.command()
def validate(config: Path, set_: SetOption = None) -> None:
    """Check a job config (and its data set's columns, when present) without starting anything."""
    import torch

    from orchestrator.config import load_config
    from trainers.data import check_columns
    from trainers.models import build_model

    job = load_config(config, set_ or [])
    with torch.device("meta"):  # checks model.name and model.kwargs without allocating weights
        build_model(job.model.name, job.model.kwargs)
    if job.data.dataset and not all(Path(p).exists() for p in job.data.paths):
        data = f"built-in {job.data.dataset!r}, prepared on first run"
    else:
        data = f"{check_columns(job.data.paths, job.data.features, job.data.label)} rows"
    out.print(f"{config}: ok ({job.name}: model {job.model.name}, data {', '.join(job.data.paths)}: {data})")


@app.command()
def run(
    config: Path,
    workers: Annotated[int | None, typer.Option(help="Worker count; skips planning.")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address; default: config ray.address or embedded.")] = None,
    set_: SetOption = None,
) -> None:
    """Train a job: check data, (plan), launch on Ray Train, track in MLflow."""
    from orchestrator import launcher
    from orchestrator.config import load_config

    overrides = list(set_ or [])
    if address:
        overrides.append(f"ray.address={address}")
    if workers is not None and workers <= 0:
        raise UserError(f"--workers: must be > 0, got {workers}")
    job = load_config(config, overrides)
    stop = threading.Event()

    def status(message: str) -> None:  # autoscaling, restarts, re-planning: one line each
        console.print(message, highlight=False, markup=False, soft_wrap=True)

    launch = launcher.prepare_launch(job, workers=workers, config_path=str(config), on_status=status)
    _print_sizing(launch.sizing)
    console.print(f"[bold]{job.name}[/bold]: {launch.workers} worker(s), {launch.total_steps} steps "
                  f"({launch.steps_per_epoch}/epoch), global batch {job.training.global_batch_size}"
                  + (" [dim](resuming MLflow run)[/dim]" if launch.run.resumed else ""))
    # Installed after prepare_launch: ray.init() replaces the SIGTERM handler with its own.
    with _graceful_stop(stop):
        with _progress_bar() as update:
            result = launcher.run_job(launch, on_progress=update, stop_event=stop, on_status=status)
    _print_result(result)


def _print_sizing(sizing: Any) -> None:
    if sizing.profile is not None:
        p = sizing.profile
        how = "cached" if sizing.profile_cached else f"measured in {p.meta.get('profile_seconds', 0):.1f} s"
        console.print(f"profile ({how}): {p.device}, {p.param_count:,} parameters, max local batch "
                      f"{p.max_local_batch}, data {p.data_samples_per_s or 0:,.0f} samples/s")
    if sizing.plan is not None:
        from orchestrator.plots import plan_table

        console.print(plan_table(sizing.plan))
    else:
        console.print(f"[bold]plan:[/bold] {sizing.explanation}", highlight=False)


@contextmanager
def _graceful_stop(stop: threading.Event):
    """First SIGTERM/Ctrl-C: checkpoint and stop cleanly; a second one exits at once."""
    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        console.print(f"[yellow]{signal.Signals(signum).name}: writing a final checkpoint, then stopping "
                      "(again to abort)[/yellow]")
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def _progress_bar():
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=None, info="starting workers")

        def update(step: int, total: int, info: dict[str, Any]) -> None:
            parts = [f"{k.split('/')[-1]} {v:.4g}" for k, v in info.items()
                     if k in ("train/loss", "val/accuracy", "train/samples_per_s") and isinstance(v, float)]
            progress.update(task, completed=step, total=total, info="  ".join(parts) or "starting workers")

        yield update


def _print_result(result: Any) -> None:
    if result.stopped:
        out.print(f"stopped at step {result.final_step}; run the same command again to resume.")
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    out.print(f"MLflow run: {result.run_id} (experiment {result.experiment_id})")
    out.print(f"final step: {result.final_step}; " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
    if result.model_version:
        out.print(f"registered model version: {result.model_version}")
    uri = result.tracking_uri
    out.print(f"open the UI: mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"open the UI: {uri}")


@data_app.command("prepare")
def data_prepare(
    name: Annotated[str, typer.Argument(help="digits | synthetic | corpus")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write Parquet files into.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Data set option, e.g. --set rows=1024")] = None,
) -> None:
    """Write a built-in data set as Parquet."""
    from orchestrator.config import parse_override
    from trainers.data import prepare_dataset

    kwargs = {".".join(k): v for k, v in (parse_override(s) for s in set_ or [])}
    path = prepare_dataset(name, out_dir, **kwargs)
    out.print(f"wrote {name} to {path}")


# ---------------------------------------------------------------------------------------------
# Profile, plan, measure the network (orchestrator/profiler.py, planner.py, cluster.py)


@app.command()
def profile(
    config: Path,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the profile JSON.")] = Path("profile.json"),
    address: Annotated[str | None, typer.Option(help="Ray address; default: config ray.address or embedded.")] = None,
    refresh: Annotated[bool, typer.Option(help="Measure again even if a cached profile exists.")] = False,
    set_: SetOption = None,
) -> None:
    """Profile the job on ONE worker (one GPU, or the CPU): step time per batch, memory, noise."""
    from orchestrator import launcher
    from orchestrator.config import load_config
    from orchestrator.profiler import profile_job
    from orchestrator.ray_session import connect_ray

    job = load_config(config, list(set_ or []) + ([f"ray.address={address}"] if address else [])).localized()
    launcher.check_data(job)
    connect_ray(job.ray.address)
    measured, cached = profile_job(job, use_gpu=launcher.wants_gpu(job), refresh=refresh)
    measured.save(output)
    seconds = measured.meta.get("profile_seconds", 0)
    out.print(f"wrote {output} ({'cached' if cached else f'measured in {seconds:.1f} s'}, {measured.device}):")
    for sample in measured.samples:
        out.print(f"  local batch {sample.local_batch:>5}: {sample.step_time_s * 1e3:8.2f} ms/step")
    noise = measured.gradient_noise_scale
    out.print(f"  max local batch {measured.max_local_batch}, gradient bytes {measured.grad_bytes:,}, "
              f"data {measured.data_samples_per_s or 0:,.0f} samples/s, noise scale {noise or float('nan'):.4g}")


@app.command()
def plan(
    profile_path: Annotated[Path, typer.Option("--profile", help="Profile JSON from `orchestrator profile`.")],
    cluster: Annotated[Path, typer.Option(help="Cluster YAML (see configs/cluster_*.yaml).")],
    objective: Annotated[str, typer.Option(help="max_throughput | min_cost | max_goodput")] = "max_throughput",
    min_efficiency: Annotated[float, typer.Option(help="Scaling-efficiency floor for max_throughput.")] = 0.8,
    global_batch: Annotated[int | None, typer.Option(help="Keep this global batch at every GPU count.")] = None,
    total_samples: Annotated[int | None, typer.Option(help="Samples to train (for time to finish and cost).")] = None,
    deadline_hours: Annotated[float | None, typer.Option(help="min_cost: finish within this many hours.")] = None,
    budget: Annotated[float | None, typer.Option(help="Spend at most this much (needs gpu_hour_cost).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Also write plan.json here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the scaling plot (PNG) here.")] = None,
) -> None:
    """Choose workers, placement, local batch and accumulation from a profile and a cluster."""
    import json

    from orchestrator import planner
    from orchestrator.cluster import load_cluster
    from orchestrator.plots import plan_table, scaling_plot

    if objective not in planner.OBJECTIVES:
        raise UserError(f"--objective: must be one of {', '.join(planner.OBJECTIVES)}, got {objective!r}")
    chosen = planner.plan(
        planner.Profile.load(profile_path), load_cluster(cluster), objective=objective,
        min_efficiency=min_efficiency, global_batch=global_batch, total_samples=total_samples,
        deadline_s=deadline_hours * 3600 if deadline_hours else None, budget=budget,
    )
    if output:
        chosen.save(output)
    if plot:
        scaling_plot(chosen, plot)
    if as_json:
        typer.echo(json.dumps(chosen.to_dict(), indent=2))
        return
    out.print(plan_table(chosen))  # its caption is the plan's one-sentence explanation


@app.command("probe-network")
def probe_network(
    address: Annotated[str | None, typer.Option(help="Ray address; default: RAY_ADDRESS or a new local Ray on 127.0.0.1.")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Cluster YAML to write (merged if it exists).")] = Path("cluster.yaml"),
    max_mib: Annotated[int, typer.Option(help="Largest all-reduce message, MiB.")] = 64,
) -> None:
    """Measure all-reduce time across the live cluster's workers (NCCL on GPUs, gloo on CPUs)."""
    from orchestrator.cluster import DEFAULT_PROBE_SIZES, probe_network as measure

    sizes = [s for s in DEFAULT_PROBE_SIZES if s <= max_mib * 2**20]
    spec = measure(address or os.environ.get("RAY_ADDRESS"), sizes, output)
    out.print(f"wrote {output}: {len(spec.allreduce_samples)} all-reduce samples on {spec.nodes} node(s) x "
              f"{spec.gpus_per_node} worker(s)")


k8s_app = typer.Typer(no_args_is_help=True, help="Kubernetes manifests (KubeRay RayJob / RayCluster).")
app.add_typer(k8s_app, name="k8s")


@k8s_app.command("render")
def k8s_render(
    config: Path,
    plan_path: Annotated[Path | None, typer.Option("--plan", help="plan.json to size the worker group.")] = None,
    image: Annotated[str | None, typer.Option(help="Job image; default: the -cpu or -cuda tag of ours.")] = None,
    owner: Annotated[str | None, typer.Option(help="Your Kubernetes user name (kubectl auth whoami); "
                                              "required for a RayJob.")] = None,
    mlflow_uri: Annotated[str | None, typer.Option(help="MLflow for the job; default: the in-cluster "
                                                   "service. Credentials in it are dropped.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write here instead of stdout.")] = None,
    cluster: Annotated[bool, typer.Option("--cluster", help="A standalone RayCluster sized for the plan.")] = False,
    set_: SetOption = None,
) -> None:
    """Render a RayJob (or with --cluster a RayCluster) for one training job."""
    from orchestrator.k8s.command import k8s_render_command

    rendered = k8s_render_command(str(config), plan_path=str(plan_path) if plan_path else None, image=image,
                                  output=str(output) if output else None, cluster=cluster,
                                  overrides=list(set_ or []), owner=owner, mlflow_uri=mlflow_uri)
    for note in rendered.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(rendered.text, nl=not rendered.text.endswith("\n"))


# ---------------------------------------------------------------------------------------------
# Ray Jobs: submit to a cluster, then list / follow / stop (orchestrator/submit.py)

jobs_app = typer.Typer(no_args_is_help=True, help="Jobs submitted to a Ray cluster.")
app.add_typer(jobs_app, name="jobs")
tracking_app = typer.Typer(no_args_is_help=True, help="MLflow tracking helpers.")
app.add_typer(tracking_app, name="tracking")
AddressOption = Annotated[
    str | None, typer.Option(help="Ray dashboard, e.g. http://HEAD:8265; default: RAY_ADDRESS.", show_default=False)
]


@app.command()
def submit(
    config: Path,
    address: AddressOption = None,
    workers: Annotated[int | None, typer.Option(help="Worker count; skips planning.")] = None,
    follow: Annotated[bool, typer.Option(help="Stream the logs; exit 0 only if the job succeeds.")] = False,
    resume: Annotated[str | None, typer.Option(help="Continue the job NAME (its MLflow run and checkpoints).")] = None,
    pip: Annotated[Path | None, typer.Option(help="requirements.txt to install on the cluster for this job.")] = None,
    set_: SetOption = None,
) -> None:
    """Submit a job to a Ray cluster (Ray Jobs API); each submission is its own job."""
    from orchestrator import submit as jobs

    if workers is not None and workers <= 0:
        raise UserError(f"--workers: must be > 0, got {workers}")
    code = jobs.submit_job(config, address=address, overrides=list(set_ or []), workers=workers,
                           resume=resume, requirements=pip, follow=follow)
    raise typer.Exit(code)


@jobs_app.command("list")
def jobs_list(address: AddressOption = None) -> None:
    """Submitted jobs, oldest first."""
    from orchestrator import submit as jobs

    for line in jobs.format_jobs(jobs.JobsClient(address).list()):
        typer.echo(line)


@jobs_app.command("status")
def jobs_status(job_id: str, address: AddressOption = None) -> None:
    """A job's status, message and MLflow run name."""
    from orchestrator import submit as jobs

    for line in jobs.format_info(jobs.JobsClient(address).info(job_id)):
        typer.echo(line)


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    address: AddressOption = None,
    follow: Annotated[bool, typer.Option(help="Stream until the job ends; exit 0 only if it succeeded.")] = False,
) -> None:
    """A job's driver logs."""
    from orchestrator import submit as jobs

    client = jobs.JobsClient(address)
    if not follow:
        sys.stdout.write(client.logs(job_id))
        return
    raise typer.Exit(jobs.exit_code(client.follow(job_id, sys.stdout.write)))


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: AddressOption = None) -> None:
    """Stop a job (SIGTERM, then ORCH_JOB_STOP_GRACE_S to checkpoint) and wait for STOPPED."""
    from orchestrator import submit as jobs

    status = jobs.JobsClient(address).stop(job_id)
    out.print(f"{job_id}: {status}" + ("" if status in jobs.TERMINAL else " (stop requested; still ending)"))


@tracking_app.command("replay")
def tracking_replay(
    spill_file: Path,
    tracking_uri: Annotated[str | None, typer.Option(help="Default: MLFLOW_TRACKING_URI.")] = None,
) -> None:
    """Send metrics a job could not deliver (unsent-metrics-RUN_ID.jsonl) to their run."""
    from orchestrator.tracking import replay

    if not spill_file.is_file():
        raise UserError(f"{spill_file}: file not found")
    count = replay(spill_file, tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    sent = spill_file.with_name(spill_file.name + ".sent")
    spill_file.rename(sent)  # a second replay would log every point twice
    out.print(f"sent {count} metric points; the file is now {sent}")
