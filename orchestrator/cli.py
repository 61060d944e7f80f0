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
out = Console()

SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a field: --set training.lr=0.01")]


def main() -> None:
    """Entry point: every UserError becomes one line on stderr and exit code 2."""
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
    """Check a job config (and its data set's columns) without starting anything."""
    from orchestrator.config import load_config

    job = load_config(config, set_ or [])
    out.print(f"{config}: ok ({job.name}: model {job.model.name}, data {', '.join(job.data.paths)})")


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
    with _graceful_stop(stop):
        launch = launcher.prepare_launch(job, workers=workers, config_path=str(config))
        console.print(f"[bold]{job.name}[/bold]: {launch.workers} worker(s), {launch.total_steps} steps "
                      f"({launch.steps_per_epoch}/epoch), global batch {job.training.global_batch_size}"
                      + (" [dim](resuming MLflow run)[/dim]" if launch.run.resumed else ""))
        with _progress_bar() as update:
            result = launcher.run_job(launch, on_progress=update, stop_event=stop)
    _print_result(result)


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
