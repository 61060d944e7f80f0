"""MLflow tracking that cannot stop training: every write the driver makes, through one
non-blocking, bounded path that spills to local disk.

The driver is the only process that talks to MLflow (rank 0 hands its metric points, with their
step and original timestamp, to the driver). One `Tracker` per job run, in the driver::

    tracker = Tracker(tracking_uri, spill_dir=spill_dir)        # starts the sender thread
    run = tracker.open_run(experiment="default", run_key=run_key(job.name, job.checkpoint.storage_path),
                           run_name=job.name)                   # a RunHandle; resolved later
    try:
        run.log_params(flatten(job.to_dict()))                  # secrets masked (redact.redact)
        run.set_tags({...}); run.set_description(markdown)
        run.log_artifact(config_path, "config", new_run_only=True)
        run.log_dict(job.to_dict(), "config/resolved.json")
        run.log_dataset(name=..., uri=..., rows=..., schema={...})   # new_run_only=True by default
        run.log_metrics({"train/loss": 0.3}, step=12, timestamp_ms=t, per_step=True)  # rank 0's points
        for line in tracker.drain_warnings(): console.print(line)     # "did not answer... N wait", "answers again"
        run.finish("FINISHED")                                  # or FAILED / KILLED
    finally:
        report = tracker.close()                                # TRACKING_CLOSE_TIMEOUT_S
        for line in report.lines(): console.print(line)         # names the spill file and the replay command

Guarantees:

- Every RunHandle method returns at once (a lock held for a few list operations; an artifact file
  is copied at call time; past `max_queued` (TRACKING_MAX_QUEUED) operations and points the oldest
  are written to the spill file). Nothing waits on the network, whatever the server does.
- One background thread sends, in call order, with each request bounded
  (TRACKING_REQUEST_TIMEOUT_S, no MLflow retries) and retried with back-off while the server is
  down or stalled. It first sends the spill files an earlier job left for the same server.
- The run is resolved lazily: `run.run_id`, `run.resumed`, `run.resume_floor` (the last step of
  ``train/loss`` in a resumed run), `run.resolution` (a `ResolvedRun`: also the run's params, tags
  and last step per metric at open) are None until the server answers; `run.wait_resolved(s)`
  waits for it. At send time, `per_step` points at or below the floor are dropped (a resumed job
  never logs a step twice, even when it resumed during an outage), and `new_run_only` operations
  are dropped for a resumed run.
- `close(timeout_s)` sends what it can within the timeout, spills the rest and returns a
  `CloseReport` (sent and waiting counts, the spill file, the exact `orchestrator tracking replay
  FILE --tracking-uri URI` command with the URI redacted, warnings not yet drained).
- `replay(path, tracking_uri)` (the CLI's ``tracking replay``) sends a spill file's unsent complete
  lines exactly once, however often it runs; see `orchestrator.tracking.spill`. A file replayed
  after a later run of the job logged to MLflow (another spill_dir, the server spelled otherwise)
  only adds what the run lacks (its steps before the later driver's first, tags and artifacts the
  run has not got); the run's status and values stay the later driver's (`ResolvedRun.stale`).

`default_spill_dir()` is ``$XDG_CACHE_HOME/orchestrator/tracking`` (else
``~/.cache/orchestrator/tracking``); `run_key(job_name, storage_path)` is a job's identity (the
``orchestrator.run_key`` tag); `client(uri)` is a plain MlflowClient for reads and for model
registration (unbounded: MLflow's own retries).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from orchestrator.tracking.handle import CloseReport, RunHandle
from orchestrator.tracking.ops import RUN_KEY_TAG, ResolvedRun, run_key
from orchestrator.tracking.spill import default_spill_dir
from orchestrator.tracking.spill_replay import ReplayResult, replay
from orchestrator.tracking.tracker import Tracker

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["RUN_KEY_TAG", "CloseReport", "ReplayResult", "ResolvedRun", "RunHandle", "Tracker", "bounded_requests",
           "client", "default_spill_dir", "replay", "run_key"]


def client(tracking_uri: str | None) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


@contextmanager
def bounded_requests(env: Mapping[str, str] | None = None) -> Iterator[None]:
    """MLflow's REST calls in this block fail within seconds instead of retrying for minutes
    (its default: 7 retries, 120 s timeout each); `env` adds variables for the block (credentials
    taken out of a tracking URI, `orchestrator.redact.tracking_credentials`)."""
    from orchestrator import constants

    values = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(constants.TRACKING_REQUEST_TIMEOUT_S)), **(env or {})}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
