"""Commands that plan: plan (orchestrator/planner), probe-network (cluster.py), calibrate
(calibrations.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from orchestrator.cli.app import app, note, out, tracking_uri_flag
from orchestrator.errors import UserError, given


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
    total_samples: Annotated[int | None, typer.Option(help="Samples to train (for time to finish and cost); "
                                                           "default: what --config trains.")] = None,
    deadline_hours: Annotated[float | None, typer.Option(help="min_cost: finish within this many hours.")] = None,
    budget: Annotated[float | None, typer.Option(help="Spend at most this many USD (needs gpu_hour_cost).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Also write plan.json here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the scaling plot (PNG) here.")] = None,
) -> None:
    """Choose workers, placement, local batch and accumulation from a profile and a cluster.

    Like `orchestrator run`, the plan holds the job's global batch fixed: --global-batch, else
    --config's, else the one the profile was taken for (profile meta.global_batch_size);
    --vary-batch lets it vary instead. The output says which. --config's fixed
    training.grad_accumulation is held too.
    """
    import json

    from orchestrator import planner
    from orchestrator.calibrations import newest
    from orchestrator.files import check_writable, distinct_outputs
    from orchestrator.plots import print_plan, scaling_plot

    distinct_outputs({"-o": output, "--plot": plot}, {"--profile": profile_path, "--cluster": cluster, "--config": config})
    for path in (output, plot):  # both now: -o was replaced before a --plot that cannot be written failed
        if path is not None:
            check_writable(path)
    if objective not in planner.OBJECTIVES:
        raise UserError(f"--objective: must be one of {', '.join(planner.OBJECTIVES)}, got {objective!r}")
    deadline_s = planner.deadline_from_hours(deadline_hours, "--deadline-hours")
    profile = planner.Profile.load(profile_path)
    job = None
    if config is not None:
        from orchestrator.config import load_config
        from orchestrator.driver.sizing import fixed_accumulation

        job = load_config(config)
    held = _held_global_batch(profile, global_batch=global_batch, job=job, vary=vary_batch)
    notes: list[str] = []  # said once planned: before it, a bad flag's error was a second line under them
    if total_samples is None and job is not None:
        total_samples = _config_samples(job, notes)
    accumulation = fixed_accumulation(job) if job is not None else None  # `run` trains that split
    spec, said = newest(planner.load_cluster(cluster))
    notes += [escape(said)] if said else []
    flags = {"min_efficiency", "total_samples", "budget"} | ({"global_batch"} if global_batch is not None else set())
    try:
        chosen = planner.plan(
            profile, spec, objective=objective, min_efficiency=min_efficiency, global_batch=held,
            total_samples=total_samples, deadline_s=deadline_s, budget=budget, accumulation=accumulation,
        )
    except UserError as exc:  # `plan.budget: must be > 0` names the flag (or file) the value came from
        field = re.match(r"plan\.(\w+): ", str(exc))
        if field is not None and field[1] == "global_batch" and global_batch is None and config is not None:
            raise UserError(f"{config}: training.global_batch_size: {str(exc)[field.end():]}") from None
        if field is None or field[1] not in flags:
            raise
        raise UserError(f"--{field[1].replace('_', '-')}: {str(exc)[field.end():]}") from None
    for line in notes:
        note(line)
    if output:
        chosen.save(output)
    if plot:
        scaling_plot(chosen, plot)
    if as_json:
        typer.echo(json.dumps(chosen.to_dict(), indent=2))
        return
    print_plan(out, chosen)  # its caption is the plan's explanation


def _config_samples(job: Any, notes: list[str]) -> int | None:
    """About the samples `run` trains for the config: max_steps, or fewer by epochs of the local data's
    rows less the held-out share (what the Parquet footers count; `run` counts the split exactly).
    The plan showed no time to finish or cost for a --config without --total-samples. What it says
    goes to `notes`, printed once the plan is made."""
    from orchestrator.driver.data import total_steps

    t = job.training
    steps = t.max_steps  # None: by epochs only (one of the two is set: validated)
    said = f"{steps:,} steps" if steps is not None else ""
    if t.epochs is not None:
        rows = _local_rows(job.data)
        if rows is None:
            notes.append("time and cost: training.epochs counts the data's rows, not here yet; give --total-samples")
            return None
        train_rows = int(rows * (1 - job.data.val_fraction))
        if train_rows < t.global_batch_size:  # `run` refuses it (steps_per_epoch): it was timed as 1 step an epoch
            notes.append(f"time and cost: training.global_batch_size {t.global_batch_size:,} is more than the "
                         f"~{train_rows:,} training rows, which `run` refuses")
            return None
        per_epoch = train_rows // t.global_batch_size
        # past 2**53 samples: said of training.epochs as `run` says it, not of a --total-samples never given
        steps = total_steps(job, per_epoch)
        if steps != t.max_steps:
            said = f"{t.epochs:,} epochs of ~{per_epoch:,} steps"
    notes.append(f"time and cost for the config's {said} of {t.global_batch_size:,} samples (--total-samples to change)")
    return steps * t.global_batch_size


def _local_rows(data: Any) -> int | None:
    """Rows of the local Parquet at data.path (None: on object storage, or not there yet), from its
    footers as `validate` counts them: data there that `run` refuses (a truncated file, a missing
    column) is refused here too, not said to be 'not here yet'."""
    from trainers.data import check_columns

    if any("://" in p for p in data.paths) or not all(os.path.exists(p) for p in data.paths):
        return None
    return check_columns(data.paths, data.features, data.label)


def _held_global_batch(profile: Any, *, global_batch: int | None, job: Any, vary: bool) -> int | None:
    """The global batch `plan` holds, by the same default as `run` (see `plan`); `job`: --config's."""
    if vary:
        if global_batch is not None or job is not None:
            raise UserError("--vary-batch: lets the global batch vary; drop --global-batch / --config to use it")
        return None
    if global_batch is not None:
        return global_batch
    if job is not None:
        return job.training.global_batch_size
    return profile.meta.get("global_batch_size")  # checked when the profile was read


@app.command("probe-network")
def probe_network(
    address: Annotated[str | None, typer.Option(help="Ray address; default: RAY_ADDRESS or a new local Ray on 127.0.0.1.")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Cluster YAML to write (its figures kept where not measured).")] = Path("cluster.yaml"),
    max_mib: Annotated[int, typer.Option(help="Largest all-reduce message, MiB.")] = 64,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs per worker slot on a CPU-only cluster.")] = 1.0,
) -> None:
    """Measure all-reduce across the live cluster (NCCL on GPUs, gloo on CPUs) and fit its network."""
    import math

    from orchestrator.cluster import MAX_PROBE_MIB, probe_network as measure, probe_sizes
    from orchestrator.files import check_writable, distinct_outputs
    from orchestrator.planner.explain import above_line_rate, describe_calibration

    given(address, "--address")
    if not 1 <= max_mib <= MAX_PROBE_MIB:
        raise UserError(f"--max-mib: must be 1 to {MAX_PROBE_MIB}, got {max_mib}")
    if not (math.isfinite(cpus_per_worker) and cpus_per_worker > 0):
        raise UserError(f"--cpus-per-worker: must be a number > 0, got {cpus_per_worker}")
    distinct_outputs({"-o": output}, {})  # '-': a file named '-' was written after the whole probe
    check_writable(output)
    sizes = probe_sizes(max_mib * 2**20)
    spec = measure(address or os.environ.get("RAY_ADDRESS"), sizes, output, cpus_per_worker=cpus_per_worker)
    places = sorted({f"{s.nodes}x{s.gpus_per_node}" for s in spec.allreduce_samples})
    out.print(f"wrote {output}: {len(spec.allreduce_samples)} all-reduce samples at {', '.join(places)} on "
              f"{spec.nodes} node(s) x {spec.gpus_per_node} worker(s)", highlight=False)
    out.print(describe_calibration(spec.calibration, unit=spec.unit), highlight=False)
    if impossible := above_line_rate(spec):
        note(escape(impossible))
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

    from orchestrator import calibrations, constants, planner
    from orchestrator.files import distinct_outputs
    from orchestrator.planner.explain import above_line_rate, describe_calibration

    distinct_outputs({"-o": output}, {"--cluster": cluster, **{f"--observations {path}": path for path in observations or []}})
    spec = planner.load_cluster(cluster) if cluster is not None else None
    if spec is None and not experiment:
        raise UserError("calibrate: --cluster: required without --experiment (whose runs say their cluster)")
    found = [o for path in observations or [] for o in planner.load_observations(path)]
    if experiment:
        past = calibrations.history(experiment, tracking_uri_flag(tracking_uri), spec)
        found += past.observations
        spec = spec or past.cluster
        out.print(f"{experiment}: {past.summary()}", highlight=False)
        if not found:  # not "no run logged the cluster": the runs may well have; none logged observations
            files = f"; nor do {', '.join(map(str, observations))} hold any" if observations else ""
            raise UserError(f"--experiment {experiment}: no run of it logged observations "
                            f"({planner.OBSERVATIONS_ARTIFACT}: a worker group logs them once it has trained "
                            f"{constants.REPLAN_MIN_STEPS} steps){files}; train longer, or give --observations FILE")
        if spec is None:
            why = "no run of it logged observations, nor so a cluster" if not past.observations else \
                  "no run logged the cluster it ran on"
            raise UserError(f"--experiment {experiment}: {why}; give --cluster FILE")
    if not found and observations and not experiment:
        raise UserError(f"--observations {', '.join(map(str, observations))}: no observations in "
                        f"{'it' if len(observations) == 1 else 'them'}")
    if not found:
        raise UserError("calibrate: no observations; give --observations FILE or --experiment NAME")
    result = planner.calibrate(spec, found)
    planner.save_cluster(result, output)
    section = result.calibration
    out.print(f"wrote {output}: {describe_calibration(section, unit=result.unit)}", highlight=False)
    if impossible := above_line_rate(result):
        note(escape(impossible))
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
    if stored is None:  # it said "stored" and kept the newer one
        out.print(f"not stored as cluster {key}'s calibration: a newer one is; `plan` and `run` use it "
                  f"({calibrations.newest(result)[1]})", highlight=False)
        return
    out.print(f"stored as cluster {key}'s calibration ({stored}): `plan` and `run` on this cluster use the "
              "newest one", highlight=False)
