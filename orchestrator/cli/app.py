"""The command tree and what every command shares: its consoles, common options, one-line notes."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console

from orchestrator.errors import given
from orchestrator.redact import scrub

app = typer.Typer(add_completion=False, help="Plan, train and track data-parallel jobs on Ray.")
data_app = typer.Typer(help="Prepare data sets as Parquet.")
app.add_typer(data_app, name="data")
k8s_app = typer.Typer(help="Kubernetes manifests (KubeRay RayJob / RayCluster).")
app.add_typer(k8s_app, name="k8s")
jobs_app = typer.Typer(help="Jobs submitted to a Ray cluster.")
app.add_typer(jobs_app, name="jobs")
tracking_app = typer.Typer(help="MLflow tracking helpers.")
app.add_typer(tracking_app, name="tracking")
console = Console(stderr=True)
out = Console(soft_wrap=True, markup=False)  # whole lines for scripts; paths and names as given ('a[/]b')

SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a field: --set training.lr=0.01")]


def note(text: str) -> None:
    """One line on stderr, never wrapped (rich markup allowed), any URI's credentials scrubbed."""
    console.print(scrub(text), highlight=False, soft_wrap=True)


def tracking_uri_flag(flag: str | None) -> str | None:
    """--tracking-uri, else MLFLOW_TRACKING_URI, checked to be a tracking store MLflow knows."""
    from orchestrator.config import check_tracking_uri

    if given(flag, "--tracking-uri"):
        return check_tracking_uri(flag, "--tracking-uri")
    return check_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")
