"""What a job ended with, as the `JobResult` the controller returns: built from what the controller
holds at its end (pure: no port is called)."""

from __future__ import annotations

from typing import Any

from orchestrator.driver.policies import State
from orchestrator.driver.ports import FitOutcome, Identity, JobResult, Prepared, Run
from orchestrator.driver.recorder import Recorder
from orchestrator.driver.sizing import Workers, most


def job_result(state: State, *, identity: Identity | None, prepared: Prepared | None, recorder: Recorder | None,
               outcome: FitOutcome | None, run_log: Run | None, model_version: str | None, workers: Workers,
               replans: list[dict[str, Any]], tracking: Any, global_batch: int) -> JobResult:
    if identity is not None and identity.complete and prepared is None:
        finished = dict(identity.state.finished or {})
        return JobResult(State.FINISHED, run_id=finished.get("run_id"), final_step=finished.get("step", 0),
                         model_version=model_version or finished.get("model_version"),
                         already_complete=finished)
    rec = recorder
    checkpoint = outcome.checkpoint if outcome is not None else None
    group = rec.group if rec else None
    # Stopped before the run was opened: the job stands where its checkpoint is, in the run it had.
    run_id = run_log.run_id if run_log else identity.run_id if identity else None
    step = rec.last_step if rec else identity.checkpoint_step if identity else 0
    return JobResult(
        state, run_id=run_id, final_step=step,
        metrics=final_metrics(recorder, outcome, global_batch),
        checkpoint_path=checkpoint.path if checkpoint is not None else None, model_version=model_version,
        workers=group.workers if group else most(workers) if workers else 0,
        restarts=rec.restarts if rec else 0, resizes=rec.resizes if rec else 0, replans=replans,
        tracking=tracking, groups=list(rec.groups) if rec else [],
        failures=list(rec.failures) if rec else [],
    )


def final_metrics(recorder: Recorder | None, outcome: FitOutcome | None, global_batch: int) -> dict[str, Any]:
    """The last loss and evaluation, and the steady step time and rate (not the last step's,
    which may hold a checkpoint or an epoch's start)."""
    metrics = {**(recorder.last_metrics if recorder else {}), **(outcome.metrics if outcome else {})}
    for key in ("train/step_time_s", "train/samples_per_s", "train/lr", "train/epoch"):
        metrics.pop(key, None)
    if metrics.get("observed_step_time_s"):
        metrics["samples_per_s"] = global_batch / metrics["observed_step_time_s"]
    return metrics
