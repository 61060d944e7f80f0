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
from rich.markup import escape

from orchestrator.errors import UserError, given
from orchestrator.quiet import quiet_noise

app = typer.Typer(add_completion=False, help="Plan, train and track data-parallel jobs on Ray.")
data_app = typer.Typer(help="Prepare data sets as Parquet.")
app.add_typer(data_app, name="data")
console = Console(stderr=True)
out = Console(soft_wrap=True)  # result lines stay whole for scripts that parse them

SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a field: --set training.lr=0.01")]


def main() -> None:
    """Entry point. Exit codes: 0 done, 2 bad input (a UserError or a usage error: one line, no
    traceback), 130 interrupted; `submit --follow` and `jobs logs --follow` add 1 (FAILED) and
    3 (STOPPED), see `orchestrator.ray_jobs.exit_code`."""
    from typer._click.exceptions import ClickException, UsageError as ClickUsageError

    quiet_noise()
    level = os.environ.get("ORCH_LOG_LEVEL", "WARNING")
    if not isinstance(logging.getLevelName(level.upper()), int):
        note(f"[red]error:[/red] ORCH_LOG_LEVEL: must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {escape(repr(level))}")
        sys.exit(2)
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        from orchestrator import constants  # noqa: F401 - an ORCH_... variable that is no number: one line
        # standalone_mode=False: typer raises usage errors instead of printing its boxed help, and
        # returns (not raises) the code of a `typer.Exit`.
        code = app(standalone_mode=False)
    except UserError as exc:
        note(f"[red]error:[/red] {escape(str(exc))}")
        code = exc.exit_code
    except ClickUsageError as exc:  # no or unknown command, unknown option, missing argument, bad value
        _usage_error(exc.ctx, exc.format_message())
        code = exc.exit_code
    except ClickException as exc:
        note(f"[red]error:[/red] {escape(exc.format_message())}")
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


def note(text: str) -> None:
    """One line on stderr, never wrapped (rich markup allowed)."""
    console.print(text, highlight=False, soft_wrap=True)


def _usage_error(ctx: Any, message: str) -> None:
    """The usage line, then one error line (listing the commands where one is missing or unknown)."""
    message = message.rstrip(".")
    suggested = "Did you mean" in message  # typer's own guess at a mistyped command
    if ctx is not None and (names := _command_names(ctx)) and "command" in message.lower() and not suggested:
        message += f"; one of: {', '.join(names)}"
    if ctx is not None:
        console.print(ctx.get_usage(), highlight=False, markup=False, soft_wrap=True)
        message += f" (see `{ctx.command_path} --help`)"
    note(f"[red]error:[/red] {escape(message)}")


def _command_names(ctx: Any) -> list[str]:
    return sorted(ctx.command.list_commands(ctx)) if hasattr(ctx.command, "list_commands") else []


@app.command()
def validate(config: Path, set_: SetOption = None) -> None:
    """Check a job config (and its data set's columns, when present) without starting anything."""
    from orchestrator.config import load_config

    job = load_config(config, set_ or [])  # before torch's import: a bad file is said within a second
    job.resolved_tracking_uri()  # MLFLOW_TRACKING_URI, when the config names no tracking_uri

    import torch

    from trainers.data import check_columns
    from trainers.models import build_model

    with torch.device("meta"):  # checks model.name and model.kwargs without allocating weights
        build_model(job.model.name, job.model.kwargs)
    if job.data.dataset and not all(Path(p).exists() for p in job.data.paths):
        # A mistyped path validates too: say that the first run prepares a new copy there.
        data = f"not there yet, a new copy of the built-in {job.data.dataset!r} data set is prepared there on first run"
    else:
        data = f"{check_columns(job.data.paths, job.data.features, job.data.label)} rows"
    out.print(f"{config}: ok ({job.name}: model {job.model.name}, data {', '.join(job.data.paths)}: {data})")
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
    set_: SetOption = None,
) -> None:
    """Train a job: check data, (plan), launch on Ray Train, track in MLflow."""
    from orchestrator.config import load_config

    overrides = list(set_ or [])
    if given(address, "--address"):
        overrides.append(f"ray.address={address}")
    if workers is not None and workers <= 0:
        raise UserError(f"--workers: must be > 0, got {workers}")
    job = load_config(config, overrides)  # before the driver's imports (torch, Ray): a bad file fails fast

    from orchestrator.console_ui import RichUI, result_lines
    from orchestrator.driver import run_job
    from orchestrator.driver.run_record import resolve_tracking_uri

    stop = threading.Event()
    with _graceful_stop(stop), RichUI(console) as ui:
        result = run_job(job, workers=workers, config_path=str(config), ui=ui, stop=stop, new_run=new_run)
    for line in result_lines(result, tracking_uri=resolve_tracking_uri(job)):
        out.print(line, highlight=False)


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
    path = prepare_dataset(name, Path(out_dir), **kwargs)
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
    from orchestrator.config import load_config
    from orchestrator.files import check_writable

    overrides = list(set_ or []) + ([f"ray.address={address}"] if given(address, "--address") else [])
    job = load_config(config, overrides).localized()
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


@app.command()
def plan(
    profile_path: Annotated[Path, typer.Option("--profile", help="Profile JSON from `orchestrator profile`.")],
    cluster: Annotated[Path, typer.Option(help="Cluster YAML (see configs/clusters/*.yaml).")],
    objective: Annotated[str, typer.Option(help="max_throughput | min_cost | max_goodput")] = "max_throughput",
    min_efficiency: Annotated[float, typer.Option(help="Scaling-efficiency floor for max_throughput, checked "
                                                       "against the interval's pessimistic end.")] = 0.8,
    global_batch: Annotated[int | None, typer.Option(help="Hold this global batch at every GPU count.")] = None,
    config: Annotated[Path | None, typer.Option(help="Job config: hold its training.global_batch_size, as "
                                                     "`orchestrator run` does.")] = None,
    vary_batch: Annotated[bool, typer.Option(help="Let the global batch vary: each placement tries the "
                                                  "profiled local batches.")] = False,
    total_samples: Annotated[int | None, typer.Option(help="Samples to train (for time to finish and cost).")] = None,
    deadline_hours: Annotated[float | None, typer.Option(help="min_cost: finish within this many hours.")] = None,
    budget: Annotated[float | None, typer.Option(help="Spend at most this many USD (needs gpu_hour_cost).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Also write plan.json here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the scaling plot (PNG) here.")] = None,
) -> None:
    """Choose workers, placement, local batch and accumulation from a profile and a cluster.

    Like `orchestrator run`, the plan holds the job's global batch fixed: --global-batch, else
    --config's, else the one the profile was taken for (profile meta.global_batch_size);
    --vary-batch lets it vary instead. The output says which.
    """
    import json

    from orchestrator import planner
    from orchestrator.calibrations import newest
    from orchestrator.plots import print_plan, scaling_plot

    if objective not in planner.OBJECTIVES:
        raise UserError(f"--objective: must be one of {', '.join(planner.OBJECTIVES)}, got {objective!r}")
    profile = planner.Profile.load(profile_path)
    held = _held_global_batch(profile, global_batch=global_batch, config=config, vary=vary_batch)
    spec, said = newest(planner.load_cluster(cluster))
    if said:
        note(escape(said))
    chosen = planner.plan(
        profile, spec, objective=objective, min_efficiency=min_efficiency, global_batch=held,
        total_samples=total_samples, deadline_s=deadline_hours * 3600 if deadline_hours else None, budget=budget,
    )
    if output:
        chosen.save(output)
    if plot:
        scaling_plot(chosen, plot)
    if as_json:
        typer.echo(json.dumps(chosen.to_dict(), indent=2))
        return
    print_plan(out, chosen)  # its caption is the plan's explanation


def _held_global_batch(profile: Any, *, global_batch: int | None, config: Path | None, vary: bool) -> int | None:
    """The global batch `plan` holds, by the same default as `run` (see `plan`)."""
    if vary:
        if global_batch is not None or config is not None:
            raise UserError("--vary-batch: lets the global batch vary; drop --global-batch / --config to use it")
        return None
    if global_batch is not None:
        return global_batch
    if config is not None:
        from orchestrator.config import load_config

        return load_config(config).training.global_batch_size
    meta = profile.meta.get("global_batch_size")
    return meta if isinstance(meta, int) and not isinstance(meta, bool) and meta > 0 else None


@app.command("probe-network")
def probe_network(
    address: Annotated[str | None, typer.Option(help="Ray address; default: RAY_ADDRESS or a new local Ray on 127.0.0.1.")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Cluster YAML to write (its figures kept where not measured).")] = Path("cluster.yaml"),
    max_mib: Annotated[int, typer.Option(help="Largest all-reduce message, MiB.")] = 64,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs per worker slot on a CPU-only cluster.")] = 1.0,
) -> None:
    """Measure all-reduce across the live cluster (NCCL on GPUs, gloo on CPUs) and fit its network."""
    import math

    from orchestrator.cluster import DEFAULT_PROBE_SIZES, probe_network as measure
    from orchestrator.files import check_writable
    from orchestrator.planner.explain import describe_calibration

    given(address, "--address")
    if max_mib < 1:
        raise UserError(f"--max-mib: must be at least 1, got {max_mib}")
    if not (math.isfinite(cpus_per_worker) and cpus_per_worker > 0):
        raise UserError(f"--cpus-per-worker: must be a number > 0, got {cpus_per_worker}")
    check_writable(output)
    sizes = [s for s in DEFAULT_PROBE_SIZES if s <= max_mib * 2**20]
    spec = measure(address or os.environ.get("RAY_ADDRESS"), sizes, output, cpus_per_worker=cpus_per_worker)
    places = sorted({f"{s.nodes}x{s.gpus_per_node}" for s in spec.allreduce_samples})
    out.print(f"wrote {output}: {len(spec.allreduce_samples)} all-reduce samples at {', '.join(places)} on "
              f"{spec.nodes} node(s) x {spec.gpus_per_node} worker(s)", highlight=False)
    out.print(describe_calibration(spec.calibration), highlight=False)
    out.print(f"{spec.calibration.note}", highlight=False)


@app.command()
def calibrate(
    cluster: Annotated[Path | None, typer.Option(
        help="Cluster YAML to calibrate (line rates, link kinds); with --experiment, by default the cluster its "
             "newest run was planned on.")] = None,
    observations: Annotated[list[Path] | None, typer.Option(help="Observations: a JSON list or JSON lines file "
                                                                   "(repeatable).")] = None,
    experiment: Annotated[str | None, typer.Option(help="Read the observations of every run of this MLflow "
                                                        "experiment (artifact plan/observations.json).")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI; default: MLFLOW_TRACKING_URI.")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Calibrated cluster YAML to write.")] = Path("cluster.calibrated.yaml"),
) -> None:
    """Fit the cluster's network to observed step times of any number of models and placements;
    `plan` and `run` on that cluster use the newest such calibration from then on."""
    import math

    from orchestrator import calibrations, planner
    from orchestrator.planner.explain import describe_calibration

    spec = planner.load_cluster(cluster) if cluster is not None else None
    if spec is None and not experiment:
        raise UserError("calibrate: --cluster: required without --experiment (whose runs say their cluster)")
    found = [o for path in observations or [] for o in planner.load_observations(path)]
    if experiment:
        past = calibrations.history(experiment, _tracking_uri(tracking_uri), spec)
        found += past.observations
        spec = spec or past.cluster
        out.print(f"{experiment}: {past.summary()}", highlight=False)
        if spec is None:
            raise UserError(f"--experiment {experiment}: no run logged the cluster it ran on; give --cluster FILE")
    if not found:
        raise UserError("calibrate: no observations; give --observations FILE or --experiment NAME")
    result = planner.calibrate(spec, found)
    planner.save_cluster(result, output)
    section = result.calibration
    out.print(f"wrote {output}: {describe_calibration(section)}", highlight=False)
    if section.residuals is not None:
        r = section.residuals
        out.print(f"residuals ({r.method}, n={r.n}): 80 % of steps within {math.exp(r.low) - 1:+.0%} .. "
                  f"{math.exp(r.high) - 1:+.0%} of the prediction", highlight=False)
    for name, why in section.not_fitted.items():
        out.print(f"not fitted: {name}: {why}", highlight=False)
    key = calibrations.cluster_key(result)
    if not section.fitted:  # it would only stand in front of the figures it kept
        out.print(f"not stored as cluster {key}'s calibration: these observations identify nothing", highlight=False)
        return
    stored = calibrations.store(result)
    out.print(f"stored as cluster {key}'s calibration ({stored}): `plan` and `run` on this cluster use the "
              "newest one", highlight=False)


k8s_app = typer.Typer(help="Kubernetes manifests (KubeRay RayJob / RayCluster).")
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
# Ray Jobs: submit to a cluster (orchestrator/submit.py), then list / follow / stop (ray_jobs.py)

jobs_app = typer.Typer(help="Jobs submitted to a Ray cluster.")
app.add_typer(jobs_app, name="jobs")
tracking_app = typer.Typer(help="MLflow tracking helpers.")
app.add_typer(tracking_app, name="tracking")
AddressOption = Annotated[
    str | None, typer.Option(help="Ray dashboard, e.g. http://HEAD:8265; default: RAY_ADDRESS.", show_default=False)
]
InsecureOption = Annotated[bool, typer.Option(
    "--insecure", help="Send the Ray token over plain http to another machine (refused otherwise).")]
FOLLOW_HELP = "Stream the logs until the job ends; exit 0 SUCCEEDED, 1 FAILED, 3 STOPPED."


def _jobs_client(address: str | None, insecure: bool, job_id: str | None = None) -> Any:
    from orchestrator.ray_jobs import JobsClient, check_job_id

    given(address, "--address")
    if job_id is not None:
        check_job_id(job_id)
    return JobsClient(address, insecure=insecure)


@app.command()
def submit(
    config: Path,
    address: AddressOption = None,
    insecure: InsecureOption = False,
    workers: Annotated[int | None, typer.Option(help="Worker count; skips planning.")] = None,
    follow: Annotated[bool, typer.Option(help=FOLLOW_HELP)] = False,
    resume: Annotated[str | None, typer.Option(help="Continue the job NAME (its MLflow run and checkpoints).")] = None,
    pip: Annotated[Path | None, typer.Option(help="requirements.txt to install on the cluster for this job.")] = None,
    set_: SetOption = None,
) -> None:
    """Submit a job to a Ray cluster (Ray Jobs API); each submission is its own job."""
    from orchestrator.submit import submit_job

    given(address, "--address")
    if workers is not None and workers <= 0:
        raise UserError(f"--workers: must be > 0, got {workers}")
    code = submit_job(config, address=address, insecure=insecure, overrides=list(set_ or []), workers=workers,
                      resume=resume, requirements=pip, follow=follow)
    raise typer.Exit(code)


@jobs_app.command("list")
def jobs_list(address: AddressOption = None, insecure: InsecureOption = False) -> None:
    """Submitted jobs, oldest first."""
    from orchestrator.ray_jobs import format_jobs

    for line in format_jobs(_jobs_client(address, insecure).list()):
        typer.echo(line)


@jobs_app.command("status")
def jobs_status(job_id: str, address: AddressOption = None, insecure: InsecureOption = False) -> None:
    """A job's status, message and MLflow run name."""
    from orchestrator.ray_jobs import format_info

    for line in format_info(_jobs_client(address, insecure, job_id).info(job_id)):
        typer.echo(line)


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    address: AddressOption = None,
    insecure: InsecureOption = False,
    follow: Annotated[bool, typer.Option(help=FOLLOW_HELP)] = False,
) -> None:
    """A job's driver logs."""
    client = _jobs_client(address, insecure, job_id)
    if not follow:
        sys.stdout.write(client.logs(job_id))
        return
    raise typer.Exit(client.follow(job_id, sys.stdout.write))


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: AddressOption = None, insecure: InsecureOption = False) -> None:
    """Stop a job (SIGTERM, then ORCH_JOB_STOP_GRACE_S to checkpoint) and wait for STOPPED."""
    from orchestrator.ray_jobs import TERMINAL

    status = _jobs_client(address, insecure, job_id).stop(job_id)
    out.print(f"{job_id}: {status}" + ("" if status in TERMINAL else " (stop requested; still ending)"))


def _tracking_uri(flag: str | None) -> str | None:
    """--tracking-uri, else MLFLOW_TRACKING_URI, checked to be a tracking store MLflow knows."""
    from orchestrator.config import check_tracking_uri

    if given(flag, "--tracking-uri"):
        return check_tracking_uri(flag, "--tracking-uri")
    return check_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")


@tracking_app.command("replay")
def tracking_replay(
    spill_file: Path,
    tracking_uri: Annotated[str | None, typer.Option(help="Default: MLFLOW_TRACKING_URI.")] = None,
) -> None:
    """Send what a job could not deliver to MLflow (a spill file its end-of-job report names).

    Safe to repeat: only lines not sent before go (progress is kept beside the file)."""
    from orchestrator.tracking import replay

    uri = _tracking_uri(tracking_uri)
    if not uri:
        raise UserError("--tracking-uri: required (or set MLFLOW_TRACKING_URI)")
    for line in replay(spill_file, uri).lines(spill_file):
        out.print(line, markup=False, highlight=False)
