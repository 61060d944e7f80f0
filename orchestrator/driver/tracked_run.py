"""The job's MLflow run on the tracking path: the controller's `Run` over one handle of the
`orchestrator.tracking.Tracker`, which never blocks and resolves the run when the server answers."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator import constants
from orchestrator.config import JobConfig
from orchestrator.tracking import RUN_KEY_TAG, Tracker, default_spill_dir


def open_tracker(tracking_uri: str, spill_dir: str | None) -> Tracker:
    return Tracker(tracking_uri=tracking_uri, spill_dir=Path(spill_dir) if spill_dir else default_spill_dir())


class TrackedRun:
    def __init__(self, tracker: Tracker, handle: Any) -> None:
        self.tracker, self.handle = tracker, handle

    @classmethod
    def open(cls, tracker: Tracker, job: JobConfig, identity: Any) -> TrackedRun:
        handle = tracker.open_run(experiment=job.tracking.experiment, run_key=identity.key, run_name=job.name,
                                  tags={RUN_KEY_TAG: identity.key})
        return cls(tracker, handle)

    @property
    def run_id(self) -> str | None:
        return self.handle.run_id

    @property
    def resumed(self) -> bool | None:
        return self.handle.resumed

    @property
    def tracking_uri(self) -> str:
        return self.tracker.tracking_uri

    def wait_resolved(self, timeout_s: float) -> bool:
        return self.handle.wait_resolved(timeout_s)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.tracker.log_params(self.handle, params)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tracker.set_tags(self.handle, tags)

    def log_metrics(self, metrics: Mapping[str, float], *, step: int, at_ms: int | None = None,
                    per_step: bool = False) -> None:
        self.tracker.log_metrics(self.handle, metrics, step=step, timestamp_ms=at_ms, per_step=per_step)

    def log_dict(self, data: Any, name: str) -> None:
        self.tracker.log_dict(self.handle, data, name)

    def log_text(self, text: str, name: str) -> None:
        self.tracker.log_text(self.handle, text, name)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.tracker.log_artifact(self.handle, path, artifact_path)

    def log_dataset(self, **kwargs: Any) -> None:
        self.tracker.log_dataset(self.handle, **kwargs)

    def finish(self, status: str) -> None:
        self.tracker.finish(self.handle, status)

    def close(self) -> Any:
        return self.tracker.close(constants.METRIC_CLOSE_TIMEOUT_S)

    def drain_warnings(self) -> list[str]:
        return self.tracker.drain_warnings()
