"""MLflow behind a small interface: one run per job, written only by the driver and rank 0.

The driver owns the run (params, tags, artifacts, model, status); rank 0 streams per-step
metrics into it through a `MetricBuffer`, which never blocks training: points are queued, sent in
batches from a background thread, retried with back-off while the server is down, and written to a
local JSON-lines file if it never comes back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from orchestrator import constants

log = logging.getLogger(__name__)

RUN_KEY_TAG = "orchestrator.run_key"
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
# Metric keys MLflow stores per step; MLflow caps one log_batch at 1000 metrics.
BATCH_LIMIT = 1000
# Param names that may carry credentials; never written to MLflow.
SECRET_HINTS = ("password", "secret", "token", "access_key", "credential")


def run_key(job_name: str, storage_path: str) -> str:
    """Identity of one job: the same name and checkpoint storage resume the same run."""
    return hashlib.sha256(f"{os.path.abspath(storage_path)}::{job_name}".encode()).hexdigest()[:16]


def client(tracking_uri: str | None) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


@dataclass
class JobRun:
    """The MLflow run of one job, as seen from the driver."""

    client: MlflowClient
    run_id: str
    experiment_id: str
    resumed: bool
    tracking_uri: str = field(default="")

    def log_params(self, params: Mapping[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        items = [
            Param(k, str(v)[:MAX_PARAM_LEN])
            for k, v in params.items()
            if k not in existing and not any(h in k.lower() for h in SECRET_HINTS)
        ]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def last_step(self, key: str) -> int | None:
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=None)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def start_job_run(
    *, tracking_uri: str | None, experiment: str, job_name: str, storage_path: str
) -> JobRun:
    """Resume the job's run (same name + storage) or create it."""
    mlflow_client = client(tracking_uri)
    exp = mlflow_client.get_experiment_by_name(experiment)
    experiment_id = exp.experiment_id if exp else mlflow_client.create_experiment(experiment)
    key = run_key(job_name, storage_path)
    found = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
        mlflow_client.update_run(run_id, status="RUNNING")
        resumed = True
    else:
        run = mlflow_client.create_run(experiment_id, run_name=job_name, tags={RUN_KEY_TAG: key})
        run_id, resumed = run.info.run_id, False
    uri = mlflow_client.tracking_uri
    return JobRun(mlflow_client, run_id, experiment_id, resumed, uri)


# ---------------------------------------------------------------------------------------------
# Rank 0: buffered, retried metric logging


class MetricBuffer:
    """Queue metric points and send them from a background thread; never raise into training."""

    def __init__(
        self,
        *,
        tracking_uri: str | None,
        run_id: str,
        skip_through_step: int | None = None,
        spill_dir: str | Path = ".",
        flush_every_s: float | None = None,
    ) -> None:
        self._client = client(tracking_uri)
        self._run_id = run_id
        self._skip_through = -1 if skip_through_step is None else skip_through_step
        self._spill_dir = Path(spill_dir)
        self._flush_every = constants.METRIC_FLUSH_S if flush_every_s is None else flush_every_s
        self._pending: list[Metric] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._failures = 0
        self._warned_at = 0
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def add(self, metrics: Mapping[str, float], *, step: int) -> None:
        """Queue one step; steps already in the run (before a restart) are not logged again."""
        if step <= self._skip_through:
            return
        now = int(time.time() * 1000)
        with self._lock:
            self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self._backoff() if self._failures else self._flush_every)
            self._wake.clear()
            self._flush_once()

    def _backoff(self) -> float:
        return min(constants.TRACKING_RETRY_BASE_S * 2 ** (self._failures - 1), constants.TRACKING_RETRY_MAX_S)

    def _flush_once(self) -> bool:
        with self._lock:
            batch = self._pending[:BATCH_LIMIT]
        if not batch:
            return True
        try:
            self._client.log_batch(self._run_id, metrics=batch)
        except Exception as exc:  # noqa: BLE001 - any transport error means "retry later"
            self._failures += 1
            waiting = self.pending
            if waiting >= 2 * max(self._warned_at, 1) or self._failures == 1:
                log.warning("MLflow unreachable (%s); %d metric points wait to be sent", type(exc).__name__, waiting)
                self._warned_at = waiting
            return False
        with self._lock:
            del self._pending[: len(batch)]
        self.sent += len(batch)
        if self._failures:
            log.warning("MLflow is back; sent %d buffered metric points", len(batch))
        self._failures = 0
        self._warned_at = 0
        return True

    def close(self, timeout_s: float = 30.0) -> Path | None:
        """Send what waits; if the server stays down past `timeout_s`, spill to a local file."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            if not self._flush_once():
                time.sleep(min(self._backoff(), max(deadline - time.monotonic(), 0)))
        if not self.pending:
            return None
        return self._spill()

    def _spill(self) -> Path:
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        path = self._spill_dir / f"unsent-metrics-{self._run_id}.jsonl"
        with self._lock, open(path, "a") as f:
            for m in self._pending:
                f.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n")
            count = len(self._pending)
            self._pending.clear()
        log.warning(
            "MLflow never came back: %d metric points written to %s "
            "(replay with `orchestrator tracking replay %s`)", count, path, path,
        )
        return path


def replay(path: str | Path, *, tracking_uri: str | None) -> int:
    """Send a spilled metrics file to its run; returns the number of points sent."""
    path = Path(path)
    run_id = path.stem.removeprefix("unsent-metrics-")
    points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    metrics = [Metric(p["key"], p["value"], p["timestamp"], p["step"]) for p in points]
    mlflow_client = client(tracking_uri)
    for i in range(0, len(metrics), BATCH_LIMIT):
        mlflow_client.log_batch(run_id, metrics=metrics[i : i + BATCH_LIMIT])
    return len(metrics)


def use_tracking_uri(uri: str | None) -> None:
    if uri:
        mlflow.set_tracking_uri(uri)
