"""What `orchestrator run` shows while a job runs: the sizing, one line per event (autoscaling,
restarts, re-planning, tracking outages, rank 0's warnings), a rich progress bar with the true
figures, and at the end the result with what the tracking server did not take and how to send it."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column

from orchestrator import constants

# Progress-bar fields: the latest loss and accuracy, and the group's median samples/s.
_SHOWN = {"train/loss": "loss", "val/accuracy": "val_accuracy", "train/samples_per_s": "samples/s"}


class RichUI:
    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress: Progress | None = None
        self._task: Any = None
        self._stepped = False  # a step's metrics were shown: a stop now checkpoints

    def __enter__(self) -> RichUI:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def status(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def sized(self, prepared: Any, sizing: Any, resumed: bool | None) -> None:
        from orchestrator.driver.sizing import describe

        job = prepared.job
        if sizing.profile is not None:
            p = sizing.profile
            how = "cached" if sizing.profile_cached else f"measured in {p.meta.get('profile_seconds', 0):.1f} s"
            self.console.print(f"profile ({how}): {p.device}, {p.param_count:,} parameters, max local batch "
                               f"{p.max_local_batch}, data {p.data_samples_per_s or 0:,.0f} samples/s", highlight=False,
                               markup=False)
        if sizing.plan is not None:
            from orchestrator.plots import print_plan

            print_plan(self.console, sizing.plan)  # full width in `jobs logs` and pipes too
        else:
            self.console.print(f"[bold]plan:[/bold] {escape(sizing.explanation)}", highlight=False)
        self.console.print(f"[bold]{job.name}[/bold]: {describe(sizing.workers)} worker(s), {prepared.total_steps} "
                           f"steps ({prepared.steps_per_epoch}/epoch), global batch {job.training.global_batch_size}"
                           + (" [dim](resuming MLflow run)[/dim]" if resumed else ""))
        self._start_bar()

    def on_stop(self) -> str:
        """What a first stop signal does now: before the job is sized it just stops; while the workers
        start they leave without a checkpoint unless they began training; once steps are seen, a
        final checkpoint is written."""
        if self._progress is None:
            return "stopping before training starts"
        if not self._stepped:
            return "stopping (with a final checkpoint if the workers have begun training)"
        return "writing a final checkpoint, then stopping"

    def _start_bar(self) -> None:
        # Where the line is short (80 columns: a pipe, `jobs logs`) the bar and then the figures give
        # way, not the step count: it read "200/2…" at the end of a submitted job's log.
        whole, cut = Column(no_wrap=True), Column(no_wrap=True, overflow="ellipsis")
        columns = [TextColumn("[bold]train", table_column=whole), BarColumn(), MofNCompleteColumn(table_column=whole),
                   TextColumn("{task.fields[info]}", table_column=cut), TimeElapsedColumn(table_column=whole)]
        # Redrawn as often as the driver polls (PROGRESS_POLL_S), not rich's 10 times a second: a
        # redraw between polls shows nothing new and costs the training workers' cores ~1 % of one.
        self._progress = Progress(*columns, console=self.console, transient=False,
                                  refresh_per_second=1 / max(constants.PROGRESS_POLL_S, 0.1))
        self._task = self._progress.add_task("train", total=None, info="starting workers")
        self._progress.start()

    def progress(self, step: int, total: int, info: dict[str, float]) -> None:
        if self._progress is None:
            return
        parts = [f"{name} {info[key]:,.4g}" for key, name in _SHOWN.items() if isinstance(info.get(key), float)]
        self._stepped = self._stepped or bool(parts)  # a step's metrics: the workers train
        self._progress.update(self._task, completed=step, total=total, info="  ".join(parts) or "starting workers")


def result_lines(result: Any, *, tracking_uri: str, registered_model: str | None = None,
                 new_run: bool = False) -> list[str]:
    """The closing lines of `orchestrator run` (stdout: scripts parse them). `registered_model`:
    the name the job registers its model under, said when the tracking server did not take it.
    `new_run`: the command had --new-run, which run again would start yet another fresh run."""
    import os

    from orchestrator.submit import RESUME_HINT_ENV
    from orchestrator.tracking.ops import server_name

    server = server_name(tracking_uri)
    rerun = "run the command again without --new-run" if new_run else "run the same command again"
    owed = [f"model not registered as {registered_model!r}: MLflow at {server} did not take it; once it answers, "
            f"{rerun}: it sends what waits first and registers the model"]
    if result.already_complete is not None:
        done = result.already_complete
        return [f"complete: trained to step {done.get('step')} on {done.get('at')}; nothing to do "
                f"(MLflow run {done.get('run_id') or 'none yet'}, model version {done.get('model_version') or 'none'}). "
                "Use --new-run to train it again from scratch.",
                *(owed if registered_model and not result.model_version else [])]
    lines = []
    if result.stopped:
        again = os.environ.get(RESUME_HINT_ENV)  # a submitted job: the command is `submit --resume`
        lines.append(f"stopped at step {result.final_step}; "
                     + (f"resume with: {again}" if again else f"{rerun} to resume."))
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and k != "step"}
    none = "none (stopped before training started)" if result.stopped and not result.groups else \
        f"none yet (MLflow at {server} did not answer during the job; sending what waits creates it)"
    lines.append(f"MLflow run: {result.run_id or none}")
    shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
    lines.append(f"final step: {result.final_step}" + (f"; {shown}" if shown else ""))
    if result.model_version:
        lines.append(f"registered model version: {result.model_version}")
    if result.tracking is not None:  # what MLflow did not take, and the command that sends it
        lines += result.tracking.lines()
    report = result.tracking
    unanswered = result.run_id is None or bool(report and (report.waiting_points or report.waiting_operations))
    if registered_model and not result.model_version and not result.stopped and unanswered:
        # trained and checkpointed: the job is done, its model waits on the server (a model refused for
        # another reason, an artifact location on another host, was said when it was, with no "again")
        lines += owed
    lines.append(f"open the UI: {ui_command(tracking_uri)}")
    return lines


def ui_command(uri: str) -> str:
    """What opens the MLflow UI for `uri`: a server's own address, or the `mlflow ui` beside this
    Python (a venv's `mlflow` is rarely on PATH)."""
    import shlex
    import sys
    from pathlib import Path

    from orchestrator.redact import redact_uri

    if not uri.startswith("sqlite"):
        return redact_uri(uri)
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow)] if mlflow.is_file() else [sys.executable, "-m", "mlflow"]
    return shlex.join([*command, "ui", "--backend-store-uri", uri])
