"""The job's MLflow run on the tracking path: the controller's `Run` over a `RunHandle` of the
`orchestrator.tracking.Tracker`, which never blocks and resolves the run when the server answers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from urllib.parse import quote, urlencode
from pathlib import Path
from typing import Any

from orchestrator import constants
from orchestrator.config import JobConfig
from orchestrator.tracking import CloseReport, RunHandle, Tracker, default_spill_dir


def open_tracker(tracking_uri: str, spill_dir: str | None) -> Tracker:
    # The driver shows the tracker's warnings and its close report on the console (status lines).
    return Tracker(tracking_uri, spill_dir=Path(spill_dir) if spill_dir else default_spill_dir(), log_warnings=False)


class TrackedRun:
    def __init__(self, tracker: Tracker, handle: RunHandle) -> None:
        self.tracker, self.handle = tracker, handle
        self._description, self._linked = "", True  # nothing to link until a description is set

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
    def resume_floor(self) -> int | None:
        """The last training step the resumed run holds (None: a new run, or not resolved yet)."""
        return self.handle.resume_floor

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
        self._description, self._linked = text, False
        self.handle.set_description(text)

    def _link_chart(self) -> None:
        """Once the run has an id: the description gains a link to predicted and observed step time
        on one chart and one scale (MLflow's metric page takes several metric keys)."""
        resolution = self.handle.resolution
        if self._linked or resolution is None:
            return
        self._linked = True
        self.handle.set_description(f"{self._description}\n\n[Predicted vs observed step time, one chart]"
                                    f"({step_time_chart(resolution.run_id, resolution.experiment_id)})")

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
        """What the tracking path has to say (the driver calls this at every poll; the chart link is
        added to the description here too, once the run is known)."""
        self._link_chart()
        return self.tracker.drain_warnings()


# The prediction's metrics beside the observation's, for one chart.
STEP_TIME_KEYS = ("plan/observed_step_time_s", "plan/predicted_step_time_s", "plan/predicted_step_time_low_s",
                  "plan/predicted_step_time_high_s")


def step_time_chart(run_id: str, experiment_id: str) -> str:
    """The MLflow UI's metric page for this run with the step-time keys plotted together."""
    query = {"runs": json.dumps([run_id]), "metric": json.dumps(STEP_TIME_KEYS[0]),
             "experiments": json.dumps([experiment_id]), "plot_metric_keys": json.dumps(list(STEP_TIME_KEYS)),
             "plot_layout": "{}", "x_axis": "step", "y_axis_scale": "linear", "line_smoothness": "1",
             "show_point": "true", "deselected_curves": "[]", "last_linear_y_axis_range": "[]"}
    return "#/metric?" + urlencode(query, quote_via=quote)
