"""The job's MLflow run as the driver opens it: what the run page shows before the first step
(params, tags, description, config, profile, plan and its scaling plot, the data set), all
queued on the one non-blocking tracking path (`orchestrator.tracking`)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.config import DEFAULT_TRACKING_URI, JobConfig, flatten
from orchestrator.driver.ports import Prepared
from orchestrator.driver.sizing import Sizing, describe
from orchestrator.redact import redact


def resolve_tracking_uri(job: JobConfig) -> str:
    """The tracking URI with a local store made absolute (`--set`/config, then
    MLFLOW_TRACKING_URI, then MLflow's default: sqlite:///mlflow.db here)."""
    uri = job.resolved_tracking_uri() or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri.removeprefix("sqlite:///"))
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def initial_records(run: Any, prepared: Prepared, sizing: Sizing, *, config_path: str | None) -> None:
    """Params, tags, artifacts and the prediction, as the run page shows them from the start."""
    import ray
    import torch

    job = prepared.job
    run.log_params(flatten(redact(job.to_dict())))
    run.set_tags({
        "ray_version": ray.__version__, "torch_version": torch.__version__,
        "workers": describe(sizing.workers), "use_gpu": prepared.use_gpu,
        **({"placement": str(sizing.prediction.placement)} if sizing.prediction else {}),
        **_calibration_tags(sizing),
        **_git_tags(),
    })
    run.set_description(description(prepared, sizing))
    if config_path:
        run.log_text(redacted_yaml(config_path), f"config/{Path(config_path).name}", new_run_only=True)
    run.log_dict(redact(job.to_dict()), "config/resolved.json")
    run.log_dataset(name=dataset_name(job), uri=job.data.paths[0],
                    rows=prepared.data.train_rows, schema=_data_schema(job))
    _log_sizing(run, sizing)


def dataset_name(job: JobConfig) -> str:
    """The data set's name in MLflow: the built-in set's, else the last part of its (first) path,
    taken without credentials (of `s3://KEY:SECRET@bucket` that part is the userinfo and bucket)."""
    return job.data.dataset or Path(redact(job.data.paths[0])).name


def redacted_yaml(path: str) -> str:
    """The user's config file as they wrote it, with secret-named values and URI credentials masked."""
    import yaml

    from orchestrator.files import read_yaml

    return yaml.safe_dump(redact(read_yaml(path, "config")), sort_keys=False)


def _calibration_tags(sizing: Sizing) -> dict[str, str]:
    """Which network the plan used, and the cluster's key (`orchestrator calibrate` groups runs by it)."""
    from orchestrator.calibrations import CLUSTER_KEY_TAG, cluster_key
    from orchestrator.planner.explain import describe_calibration

    cluster = sizing.cluster
    if cluster is None:
        return {}
    cal = cluster.calibration
    network = describe_calibration(cal, unit=cluster.unit) if cal is not None else "none: spec and documented priors"
    return {"plan.calibration": network[:5000], CLUSTER_KEY_TAG: cluster_key(cluster)}


def description(prepared: Prepared, sizing: Sizing) -> str:
    """Markdown shown at the top of the MLflow run page."""
    job = prepared.job
    lines = [
        f"**{job.name}**: `{job.model.name}` on `{', '.join(job.data.paths)}` "
        f"({prepared.data.train_rows} training rows), global batch {job.training.global_batch_size}, "
        f"{prepared.total_steps} steps.",
        "",
        f"**Workers:** {describe(sizing.workers)}. {sizing.explanation}",
    ]
    if sizing.plan is not None:
        lines += ["", f"| {sizing.plan.unit}s | placement | local batch x accum | step (ms) | samples/s | efficiency | note |",
                  "|---:|---|---|---:|---:|---:|---|"]
        for c in sizing.plan.best_per_gpu_count():
            p = c.prediction
            mark = "**chosen**" if p == sizing.plan.choice else (c.reason or "")
            lines.append(f"| {p.gpus} | {p.placement} | {p.local_batch} x {p.accumulation} | "
                         f"{p.step_time_s * 1e3:.2f} | {p.throughput:,.0f} | {p.efficiency:.2f} | {mark} |")
        lines += ["", "Scaling plot: artifact `plan/scaling.png`; profile: `profile/profile.json`; predicted vs "
                      "observed step time: metrics `plan/*`."]
    return "\n".join(lines)


def _data_schema(job: JobConfig) -> dict[str, str]:
    columns = {job.data.features.column: f"list<{job.data.features.dtype}>"}
    if job.data.label:
        columns[job.data.label.column] = job.data.label.dtype
    return columns


def _log_sizing(run: Any, sizing: Sizing) -> None:
    """profile.json, plan.json and the scaling plot, plus the prediction as metrics at step 0."""
    from orchestrator.calibrations import CLUSTER_ARTIFACT
    from orchestrator.plots import scaling_plot

    if sizing.profile is not None:
        run.log_dict(sizing.profile.to_dict(), "profile/profile.json")
    if sizing.cluster is not None:  # what the run's observations were taken on
        run.log_dict(sizing.cluster.to_dict(), CLUSTER_ARTIFACT)
    if sizing.plan is not None:
        run.log_dict(sizing.plan.to_dict(), "plan/plan.json")
        with tempfile.TemporaryDirectory() as tmp:
            run.log_artifact(scaling_plot(sizing.plan, Path(tmp) / "scaling.png"), "plan")
    if sizing.prediction is not None:
        p = sizing.prediction
        # Per step: a resumed run keeps the prediction it has at step 0 (MLflow would show two there).
        run.log_metrics({"plan/predicted_samples_per_s": p.throughput, "plan/predicted_efficiency": p.efficiency},
                        step=0, per_step=True)


def _git_tags() -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit.stdout.strip()}
