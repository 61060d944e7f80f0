"""The job's run as the driver writes to it (RunHandle), and what closing the tracker reports."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.tracking import ops
from orchestrator.tracking.ops import ResolvedRun

if TYPE_CHECKING:
    from orchestrator.tracking.tracker import Tracker


class RunHandle:
    """One MLflow run, known locally by `handle` until the server answers.

    Every write returns at once: it is queued, in order, for the tracker's sender thread. The
    reads (`run_id`, `resumed`, `resume_floor`, `resolution`) are None until the run is resolved.
    """

    def __init__(self, tracker: Tracker, handle: str) -> None:
        self._tracker = tracker
        self.handle = handle
        self._resolution: ResolvedRun | None = None
        self._resolved = threading.Event()

    # -- reads, once resolved ----------------------------------------------------------------

    @property
    def resolution(self) -> ResolvedRun | None:
        return self._resolution

    @property
    def run_id(self) -> str | None:
        return self._resolution.run_id if self._resolution else None

    @property
    def resumed(self) -> bool | None:
        return self._resolution.resumed if self._resolution else None

    @property
    def resume_floor(self) -> int | None:
        """The last step the resumed run had for the floor key (``train/loss``)."""
        return self._resolution.floor if self._resolution else None

    def wait_resolved(self, timeout_s: float) -> bool:
        return self._resolved.wait(timeout_s)

    def _resolve(self, run: ResolvedRun) -> None:
        self._resolution = run
        self._resolved.set()

    # -- writes, queued ----------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params (a flattened config): secret-named keys masked, URIs without credentials. A key
        the run already has keeps its value."""
        self._tracker._put(ops.params_op(self.handle, params))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._tracker._put(ops.tags_op(self.handle, tags))

    def set_description(self, text: str) -> None:
        """The Markdown shown at the top of the run page."""
        self.set_tags({ops.DESCRIPTION_TAG: text})

    def log_metrics(self, metrics: Mapping[str, float], *, step: int, timestamp_ms: int | None = None,
                    per_step: bool = False) -> None:
        """Points at `step`, stamped `timestamp_ms` (default: now). `per_step` points (the
        training loop's) at or below the resumed run's floor are dropped when sent."""
        op = ops.metrics_op(self.handle, metrics, step=step, timestamp_ms=timestamp_ms, per_step=per_step)
        if op is not None:
            self._tracker._put(op)

    def log_dict(self, data: Any, name: str, *, new_run_only: bool = False) -> None:
        """`data` as JSON at artifact path `name` (``config/resolved.json``), taken now."""
        self.log_text(ops.dict_text(data), name, new_run_only=new_run_only)

    def log_text(self, text: str, name: str, *, new_run_only: bool = False) -> None:
        self._tracker._put(ops.text_op(self.handle, text, name, new_run_only=new_run_only))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, *,
                     new_run_only: bool = False) -> None:
        """The file as it is now (copied at once: the caller may delete it); a missing file is
        warned about, not raised."""
        staged = self._tracker._stage(Path(path))
        if staged is not None:
            self._tracker._put(ops.file_op(self.handle, staged, artifact_path, new_run_only=new_run_only))

    def log_dataset(self, *, name: str, uri: str, rows: int, schema: Mapping[str, str],
                    new_run_only: bool = True) -> None:
        """A dataset input (MLflow's run inputs) for the data the job reads."""
        self._tracker._put(ops.dataset_op(self.handle, name=name, uri=uri, rows=rows, schema=schema,
                                          new_run_only=new_run_only))

    def finish(self, status: str = "FINISHED") -> None:
        """End the run FINISHED, FAILED or KILLED (the end time is now, whenever it is sent)."""
        self._tracker._put(ops.finish_op(self.handle, status))


@dataclass(frozen=True)
class CloseReport:
    """What `Tracker.close` sent, and what waits on disk with the command that sends it."""

    sent_points: int
    sent_operations: int
    waiting_points: int  # of this run, in the spill file
    waiting_operations: int
    spill_file: Path | None  # None when nothing waits (of this run, or of an earlier run of the job)
    replay_command: str | None
    other_replay_commands: tuple[str, ...]  # earlier jobs' spill files for this server not sent yet
    warnings: tuple[str, ...]  # raised since the last drain_warnings()

    def lines(self) -> list[str]:
        """What the driver prints at the end of the job: the warnings not drained yet, then what waits."""
        return [*self.warnings, *self.summary()]

    def summary(self) -> list[str]:
        lines = []
        if self.spill_file is not None and (self.waiting_points or self.waiting_operations):
            lines.append(f"MLflow did not take {self.waiting_points} metric points and {self.waiting_operations} "
                         f"other operations; they are in {self.spill_file}. Send them with: {self.replay_command}")
        elif self.spill_file is not None:
            lines.append(f"tracking data of an earlier run of this job waits in {self.spill_file}. "
                         f"Send it with: {self.replay_command}")
        return lines + [f"unsent tracking data of an earlier job: {command}" for command in self.other_replay_commands]
