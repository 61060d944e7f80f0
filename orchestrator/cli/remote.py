"""Commands that reach a cluster or a tracking server: k8s render (orchestrator/k8s), submit
(orchestrator/submit.py), jobs list / status / logs / stop (ray_jobs.py), tracking replay."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli.app import SetOption, app, jobs_app, k8s_app, out, tracking_app, tracking_uri_flag
from orchestrator.errors import UserError, given


@k8s_app.command("render")
def k8s_render(
    config: Path,
    plan_path: Annotated[Path | None, typer.Option("--plan", help="plan.json to size the worker group.")] = None,
    image: Annotated[str | None, typer.Option(help="Job image; default: the -cpu or -cuda tag of ours.")] = None,
    owner: Annotated[str | None, typer.Option(help="Your Kubernetes user name (kubectl auth whoami); "
                                              "default: this machine's login name.")] = None,
    mlflow_uri: Annotated[str | None, typer.Option(help="MLflow for the job; default: the in-cluster "
                                                   "service. Credentials in it are dropped.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output",
                                                help="Write here instead of stdout ('-': stdout).")] = None,
    cluster: Annotated[bool, typer.Option("--cluster", help="A standalone RayCluster sized for the plan.")] = False,
    set_: SetOption = None,
) -> None:
    """Render a RayJob (or with --cluster a RayCluster) for one training job."""
    from orchestrator.k8s.command import k8s_render_command

    rendered = k8s_render_command(str(config), plan_path=str(plan_path) if plan_path else None, image=image,
                                  output=str(output) if output and str(output) != "-" else None, cluster=cluster,
                                  overrides=list(set_ or []), owner=owner, mlflow_uri=mlflow_uri)
    for note in rendered.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(rendered.text, nl=not rendered.text.endswith("\n"))


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


@tracking_app.command("replay")
def tracking_replay(
    spill_file: Path,
    tracking_uri: Annotated[str | None, typer.Option(help="Default: MLFLOW_TRACKING_URI.")] = None,
) -> None:
    """Send what a job could not deliver to MLflow (a spill file its end-of-job report names).

    Safe to repeat: only lines not sent before go (progress is kept beside the file)."""
    from orchestrator.tracking import replay

    uri = tracking_uri_flag(tracking_uri)
    if not uri:
        raise UserError("--tracking-uri: required (or set MLFLOW_TRACKING_URI)")
    for line in replay(spill_file, uri).lines(spill_file):
        out.print(line, markup=False, highlight=False)
