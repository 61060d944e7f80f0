"""The cluster learns from every job: where its calibrations are kept, which one `plan` and `run`
use, and the job history `orchestrator calibrate --experiment` fits them to.

Every run logs the cluster it was planned on (`CLUSTER_ARTIFACT`, tag `CLUSTER_KEY_TAG`) beside
its observations (`OBSERVATIONS_ARTIFACT`). `orchestrator calibrate --experiment NAME` reads them,
keeps the runs on the cluster of the newest one (or on `--cluster FILE`'s), fits, and stores the
result in this user's cache, ``$XDG_CACHE_HOME/orchestrator/clusters/calibrated-<key>.yaml``.
A cluster is known by `cluster_key`: a digest of its hardware as the spec states it (node count,
GPUs per node, GPU type, link kinds, line rates), so a cluster file and the live cluster it
describes meet at one key, and a grown or changed cluster gets another. `plan` and `run` then
take the newest calibration of that cluster, the stored one or the spec's own (a cluster file's,
a probe's), by `measured_at`, and say which.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError
from orchestrator.files import user_cache_dir
from orchestrator.redact import redact_uri, scrub, tracking_credentials, without_credentials
from orchestrator.planner.explain import plural
from orchestrator.planner import (
    OBSERVATIONS_ARTIFACT,
    ClusterSpec,
    Observation,
    load_cluster,
    load_observations,
    save_cluster,
)

log = logging.getLogger(__name__)

CLUSTER_ARTIFACT = "plan/cluster.json"  # the spec a run was planned on, its calibration included
CLUSTER_KEY_TAG = "plan.cluster_key"
KEY_FIELDS = ("nodes", "gpus_per_node", "gpu", "intra_node_GBps", "inter_node_GBps", "intra_link", "inter_link")


def cluster_key(spec: ClusterSpec) -> str:
    """16 hex digits naming the cluster's hardware as `spec` states it (pure; the calibration,
    latency, price and samples are not part of it)."""
    blob = json.dumps({f: getattr(spec, f) for f in KEY_FIELDS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stored_path(spec: ClusterSpec, root: str | Path | None = None) -> Path:
    return Path(root or user_cache_dir("clusters")) / f"calibrated-{cluster_key(spec)}.yaml"


def store(spec: ClusterSpec, root: str | Path | None = None) -> Path | None:
    """Keep `spec` (calibrated) as its cluster's newest calibration: the path, or None when a newer
    one is stored (and stays)."""
    if spec.calibration is None:
        raise ValueError("store: the spec has no calibration")
    path = stored_path(spec, root)
    current = _read(path)
    if current is not None and _when(current) > _when(spec):
        return None
    # whole or not at all (files.write_text): plan and run may read it now; never through a planted link
    return save_cluster(spec, path, follow_links=False)


def newest(spec: ClusterSpec, root: str | Path | None = None) -> tuple[ClusterSpec, str | None]:
    """`spec` with its cluster's newest calibration, and a line saying where it came from when
    that is not the spec's own (None: the spec's own calibration, or its priors, stand)."""
    path = stored_path(spec, root)
    stored = _read(path)
    if stored is None or stored.calibration is None or cluster_key(stored) != cluster_key(spec):
        return spec, None
    if spec.calibration is not None and _when(spec) >= _when(stored):
        return spec, None
    cal = stored.calibration
    note = f"the newest calibration of this cluster ({cluster_key(spec)}), stored by `orchestrator calibrate`"
    said = (f"calibration: the newest of this cluster, from {cal.source} ({plural(cal.observations, 'observation')}, "
            f"{cal.measured_at}), {path}" + (f"; newer than the spec's own ({spec.calibration.measured_at})"
                                             if spec.calibration is not None else ""))
    return spec.replace(calibration=cal.replace(note=note)), said


def _read(path: Path) -> ClusterSpec | None:
    if not os.path.lexists(path):
        return None
    try:  # this user's own file only (a shared cache folder), never through a link
        return load_cluster(path, own_only=True)
    except UserError as exc:  # a damaged or planted entry never stops a job: the spec's own figures stand
        log.warning("ignoring a stored calibration: %s", exc)
        return None


# A stamp further ahead of this clock than this is a clock that ran ahead, not a later measurement:
# ordered by it, it would win over every calibration measured after it, for ever.
CLOCK_SLACK = timedelta(days=1)


def _when(spec: ClusterSpec) -> datetime:
    """When `spec`'s calibration was measured, for ordering: unknown (no time, or one past
    CLOCK_SLACK ahead of now) orders first."""
    unknown = datetime.min.replace(tzinfo=timezone.utc)
    text = spec.calibration.measured_at if spec.calibration is not None else ""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return unknown
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return when if when <= datetime.now(timezone.utc) + CLOCK_SLACK else unknown


# ---------------------------------------------------------------------------------------------
# The job history in MLflow


@dataclass(frozen=True)
class History:
    """The observations to calibrate on, the cluster they were taken on, and what was left out."""

    observations: list[Observation]
    cluster: ClusterSpec | None  # the newest run's cluster (None: no run logged one)
    runs: int
    left_out: dict[str, int]  # why -> runs
    given: bool = False  # the cluster was given (--cluster), not read from the runs

    def summary(self) -> str:
        gone = "; ".join(f"{n} run(s) left out: {why}" for why, n in self.left_out.items())
        on = (f" on cluster {cluster_key(self.cluster)}" if self.cluster is not None
              else " on the cluster given" if self.given else "")
        said = f"{plural(len(self.observations), 'observation')} from {self.runs} run(s){on}"
        return said + (f" ({gone})" if gone else "")


def history(experiment: str, tracking_uri: str | None, cluster: ClusterSpec | None = None) -> History:
    """Every run of the MLflow experiment that logged observations, on `cluster` (by key) or,
    without one, on the cluster of the newest such run. Runs that logged no cluster (older ones)
    count for a given `cluster` and are left out otherwise."""
    from mlflow import get_tracking_uri
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    from orchestrator.tracking import bounded_requests, client as mlflow_client

    _existing_store(tracking_uri)
    # Credentials in the URI travel as MLflow's variables, never in a message.
    uri = redact_uri(tracking_uri) if tracking_uri else get_tracking_uri()
    try:  # the client too: MLflow refuses a folder (its file store) as it is made
        with bounded_requests(env=tracking_credentials(tracking_uri or "")):
            target = without_credentials(tracking_uri) if tracking_uri else uri  # the host urllib reads, unmasked
            return _history(mlflow_client(target), experiment, cluster, tracking_uri or "")
    except (MlflowException, RequestException, OSError) as exc:
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--tracking-uri {uri}: could not read the experiment's runs ({reason})") from None


def _existing_store(tracking_uri: str | None) -> None:
    """Reading history creates nothing: a sqlite URI must name an MLflow database that exists (MLflow
    would create a missing one, add its tables to any other sqlite file, and retry a folder for
    minutes)."""
    from orchestrator.config import sqlite_path, sqlite_store_problem

    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        return
    path = Path(sqlite_path(tracking_uri))
    if not path.is_file():
        raise UserError(f"--tracking-uri {tracking_uri}: no MLflow database at {path}"
                        + (" (a folder)" if path.is_dir() else ""))
    if problem := sqlite_store_problem(str(path), empty=False):
        raise UserError(f"--tracking-uri {tracking_uri}: {problem}")


def _runs(client: Any, experiment_id: str) -> Iterator[Any]:
    """Every run of the experiment, newest first, page by page (one search returns 1,000 at most)."""
    token = None
    while True:
        page = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=1000,
                                  page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _history(client: Any, experiment: str, cluster: ClusterSpec | None, tracking_uri: str = "") -> History:
    """`history` read through `client`. A run whose artifacts live on another host is left out when
    MLflow's credentials are set: MLflow's client would hand them to that host."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    from orchestrator.tracking.store import artifacts_elsewhere, credentials_set

    guarded = credentials_set(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise UserError(f"--experiment: no MLflow experiment named {experiment!r} at {redact_uri(client.tracking_uri)}")
    if found.lifecycle_stage == "deleted":  # its runs are deleted with it: say so, not "0 observations"
        raise UserError(f"--experiment: {experiment!r} is deleted at {redact_uri(client.tracking_uri)}; restore it "
                        f"(`mlflow experiments restore --experiment-id {found.experiment_id}`) to learn from its runs")
    logged = []  # (observations, cluster or None), newest run first
    left_out: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        for run in _runs(client, found.experiment_id):
            run_id = run.info.run_id
            if guarded and artifacts_elsewhere(run.info.artifact_uri, client.tracking_uri):
                left_out["artifacts on a host other than the tracking server's (not sent its credentials)"] += 1
                continue
            artifacts = {a.path for a in client.list_artifacts(run_id, OBSERVATIONS_ARTIFACT.rsplit("/", 1)[0])}
            if OBSERVATIONS_ARTIFACT not in artifacts:
                continue
            folder = Path(tmp, run_id)
            try:
                obs = load_observations(client.download_artifacts(run_id, OBSERVATIONS_ARTIFACT, str(folder)))
                spec = (ClusterSpec.load(client.download_artifacts(run_id, CLUSTER_ARTIFACT, str(folder)))
                        if CLUSTER_ARTIFACT in artifacts else None)
            except RequestException:  # the server, not the run: said for the whole history
                raise
            except (UserError, MlflowException, OSError) as exc:  # one damaged run (an artifact that is a
                # link, a FIFO) stops no other; said by the artifact's name, not the download gone with tmp
                log.warning("run %s: %s", run_id, scrub(str(exc).replace(f"{folder}/", "")))
                left_out["unreadable artifacts"] += 1
                continue
            logged.append((obs, spec))
    chosen = cluster or next((spec for _, spec in logged if spec is not None), None)
    key = cluster_key(chosen) if chosen is not None else None
    kept: list[Observation] = []
    runs = 0
    for obs, spec in logged:
        if spec is None and cluster is None and key is not None:
            left_out["no cluster logged"] += 1
        elif spec is not None and key is not None and cluster_key(spec) != key:
            left_out[f"on another cluster ({cluster_key(spec)})"] += 1
        else:
            kept += obs
            runs += 1
    return History(kept, None if cluster is not None else chosen, runs, left_out, given=cluster is not None)
