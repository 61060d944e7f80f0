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
import warnings
from collections.abc import Callable, Mapping
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
# Points rank 0 keeps in memory while the server is down; older ones go to the spill file.
MAX_PENDING_POINTS = 500_000
LOG_BATCH_ENDPOINT = "/api/2.0/mlflow/runs/log-batch"
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

    def log_dataset(self, *, name: str, uri: str, rows: int, schema: dict[str, str]) -> None:
        """A dataset entry (MLflow's run inputs) for the Parquet data the job reads."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.types import ColSpec, Schema

        spec = Schema([ColSpec(type="string", name=f"{col}: {dtype}") for col, dtype in schema.items()])
        with warnings.catch_warnings():  # a local path matches two equivalent source types
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri)
        dataset = MetaDataset(source, name=name, schema=spec)
        entity = dataset._to_mlflow_entity()
        tags = [InputTag("mlflow.data.context", "training"), InputTag("rows", str(rows))]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(entity, tags=tags)])

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
    experiment_id = exp.experiment_id if exp else mlflow_client.create_experiment(
        experiment, artifact_location=_artifacts_beside_db(tracking_uri),
        # Open in the UI's "Model training" view (MLflow 3 defaults new experiments to GenAI).
        tags={"mlflow.experimentKind": "custom_model_development"},
    )
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


def _artifacts_beside_db(tracking_uri: str | None) -> str | None:
    """A sqlite store keeps its artifacts in ./mlruns beside the database, wherever it runs from.

    MLflow's own default is ./mlruns of the current directory, which differs between a driver,
    a submitted job and `mlflow ui`; servers (http URIs) choose their own artifact root.
    """
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    return (db.parent / "mlruns").resolve().as_uri()


# ---------------------------------------------------------------------------------------------
# Rank 0: buffered, retried metric logging


class MetricBuffer:
    """Queue metric points and send them from one background thread; never raise into training.

    Only that thread talks to MLflow, so a batch is neither sent twice nor dropped by a race with
    `close`. Each request to a tracking server is bounded (TRACKING_REQUEST_TIMEOUT_S, without
    MLflow's own retries, which last minutes), so a down server is noticed within seconds and
    retried on this buffer's back-off; a warning says how many points wait.
    """

    def __init__(
        self,
        *,
        tracking_uri: str | None,
        run_id: str,
        skip_through_step: int | None = None,
        spill_dir: str | Path = ".",
        flush_every_s: float | None = None,
        max_pending: int = MAX_PENDING_POINTS,
    ) -> None:
        self._client = client(tracking_uri)
        self._send = _batch_sender(self._client)
        self._run_id = run_id
        self._skip_through = -1 if skip_through_step is None else skip_through_step
        self._spill_dir = Path(spill_dir)
        self._flush_every = constants.METRIC_FLUSH_S if flush_every_s is None else flush_every_s
        self._max_pending = max_pending
        self._pending: list[Metric] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._deadline = 0.0
        self._failures = 0
        self._warned_at = 0
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def add(self, metrics: Mapping[str, float], *, step: int, timestamp_ms: int | None = None) -> None:
        """Queue one step (logged now, or at `timestamp_ms`); steps already in the run (before a
        restart) are not logged again."""
        if step <= self._skip_through:
            return
        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        points = []
        for key, value in metrics.items():
            try:
                points.append(Metric(key, float(value), now, step))
            except (TypeError, ValueError):
                log.debug("metric %s=%r is not a number; not logged", key, value)
        with self._lock:
            self._pending.extend(points)
            overflow = len(self._pending) - self._max_pending
        if overflow > 0:  # a server down for days must not exhaust rank 0's memory: spill the older half
            self._spill(overflow + self._max_pending // 2)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self, timeout_s: float) -> bool:
        """Have the sender thread send what waits now; True once nothing waits (within timeout_s).

        Rank 0 calls it before reporting a checkpoint, so that every step up to a checkpoint is in
        MLflow when a failure makes the job resume from it (the steps after are trained again)."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.pending

    def _run(self) -> None:
        while True:
            if not self._closing.is_set():
                self._wake.wait(self._backoff() if self._failures else self._flush_every)
                self._wake.clear()
            sent_all = self._flush()
            if self._closing.is_set():
                left = self._deadline - time.monotonic()
                if sent_all or left <= 0:
                    return
                time.sleep(min(self._backoff(), left))

    def _backoff(self) -> float:
        return min(constants.TRACKING_RETRY_BASE_S * 2 ** max(self._failures - 1, 0), constants.TRACKING_RETRY_MAX_S)

    def _flush(self) -> bool:
        """Send batches until none wait (True) or one fails (False)."""
        sent = 0
        while batch := self._next_batch():
            try:
                self._send(self._run_id, batch)
            except Exception as exc:  # noqa: BLE001 - any transport or server error means "retry later"
                self._note_failure(exc)
                return False
            with self._lock:
                # A spill (memory cap, or close giving up) may have taken these points meanwhile:
                # then they are sent and in the file, never lost.
                if self._pending and self._pending[0] is batch[0]:
                    del self._pending[: len(batch)]
            sent += len(batch)
        self.sent += sent
        if self._failures and sent:
            log.warning("MLflow is back: sent %d buffered metric points", sent)
        self._failures = self._warned_at = 0
        return True

    def _next_batch(self) -> list[Metric]:
        with self._lock:
            return self._pending[:BATCH_LIMIT]

    def _note_failure(self, exc: Exception) -> None:
        self._failures += 1
        waiting = self.pending
        if self._failures == 1 or waiting >= 2 * max(self._warned_at, 1):
            log.warning("MLflow unreachable (%s: %s); %d metric points wait to be sent (retrying)",
                        type(exc).__name__, str(exc).strip().split("\n")[0][:160], waiting)
            self._warned_at = waiting

    def close(self, timeout_s: float | None = None) -> Path | None:
        """Send what waits; if the server stays down past `timeout_s`, spill to a local file."""
        timeout_s = constants.METRIC_CLOSE_TIMEOUT_S if timeout_s is None else timeout_s
        self._deadline = time.monotonic() + timeout_s
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout_s + constants.TRACKING_REQUEST_TIMEOUT_S + 1)
        return self._spill() if self.pending else None

    def _spill(self, count: int | None = None) -> Path:
        """Append the oldest `count` waiting points (all by default) to the run's spill file."""
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        path = self._spill_dir / f"unsent-metrics-{self._run_id}.jsonl"
        with self._lock, open(path, "a") as f:
            points = self._pending[: len(self._pending) if count is None else count]
            for m in points:
                f.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n")
            del self._pending[: len(points)]
        log.warning("MLflow did not take %d metric points; they are in %s "
                    "(send them later with `orchestrator tracking replay %s`)", len(points), path, path)
        return path


def _batch_sender(mlflow_client: MlflowClient) -> Callable[[str, list[Metric]], None]:
    """log_batch; for a tracking server, one bounded request without MLflow's own retries."""
    store = getattr(getattr(mlflow_client, "_tracking_client", None), "store", None)
    host_creds = getattr(store, "get_host_creds", None)
    if host_creds is None:  # a local store (sqlite, files), or an MLflow whose internals moved
        return lambda run_id, metrics: mlflow_client.log_batch(run_id, metrics=metrics)
    from mlflow.protos.service_pb2 import LogBatch
    from mlflow.utils.proto_json_utils import message_to_json
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    def send(run_id: str, metrics: list[Metric]) -> None:
        body = message_to_json(LogBatch(run_id=run_id, metrics=[m.to_proto() for m in metrics]))
        response = http_request(host_creds(), LOG_BATCH_ENDPOINT, "POST", max_retries=0,
                                timeout=constants.TRACKING_REQUEST_TIMEOUT_S, json=json.loads(body))
        verify_rest_response(response, LOG_BATCH_ENDPOINT)

    return send


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
