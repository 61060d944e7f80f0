"""The job's MLflow run on the tracking path: the controller's `Run` over a `RunHandle` of the
`orchestrator.tracking.Tracker`, which never blocks and resolves the run when the server answers."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator import constants
from orchestrator.config import JobConfig
from orchestrator.tracking import CloseReport, RunHandle, Tracker, default_spill_dir


def open_tracker(tracking_uri: str, spill_dir: str | None) -> Tracker:
    return Tracker(tracking_uri, spill_dir=Path(spill_dir) if spill_dir else default_spill_dir())


class TrackedRun:
    def __init__(self, tracker: Tracker, handle: RunHandle) -> None:
        self.tracker, self.handle = tracker, handle

    @classmethod
    def open(cls, tracker: Tracker, job: JobConfig, identity: Any) -> TrackedRun:
        return cls(tracker, tracker.open_run(experiment=job.tracking.experiment, run_key=identity.key,
                                             run_name=job.name))

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
        self.handle.log_params(params)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.handle.set_tags(tags)

    def set_description(self, text: str) -> None:
        self.handle.set_description(text)

    def log_metrics(self, metrics: Mapping[str, float], *, step: int, at_ms: int | None = None,
                    per_step: bool = False) -> None:
        self.handle.log_metrics(metrics, step=step, timestamp_ms=at_ms, per_step=per_step)

    def log_dict(self, data: Any, name: str, *, new_run_only: bool = False) -> None:
        self.handle.log_dict(data, name, new_run_only=new_run_only)

    def log_text(self, text: str, name: str, *, new_run_only: bool = False) -> None:
        self.handle.log_text(text, name, new_run_only=new_run_only)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.handle.log_artifact(path, artifact_path)

    def log_dataset(self, **kwargs: Any) -> None:
        self.handle.log_dataset(**kwargs)

    def finish(self, status: str) -> None:
        self.handle.finish(status)

    def close(self) -> CloseReport:
        return self.tracker.close(constants.TRACKING_CLOSE_TIMEOUT_S)

    def drain_warnings(self) -> list[str]:
        return self.tracker.drain_warnings()
