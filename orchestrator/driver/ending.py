"""How a job ends, whatever happened: a worker group still training is asked to stop, the MLflow
run is ended with the true status and closed, the autoscaler request withdrawn and the job's lock
released. A part of `JobController` (controller.py), on the attributes it declares."""

from __future__ import annotations

import contextlib
from datetime import datetime, timezone
from typing import Any

from orchestrator import constants
from orchestrator.driver.policies import RUN_STATUS, State
from orchestrator.driver.ports import Fit, FitOutcome, Identity, Ports, Run
from orchestrator.driver.recorder import Recorder
from orchestrator.driver.replan import Replanner
from orchestrator.errors import UserError
from orchestrator.planner import OBSERVATIONS_ARTIFACT


class JobEnd:
    state: State
    ports: Ports
    fit: Fit | None
    recorder: Recorder | None
    run_log: Run | None
    identity: Identity | None
    outcome: FitOutcome | None
    model_version: str | None
    replanner: Replanner | None
    tracking_report: Any
    _requested: bool

    def _stop_live_fit(self, exc: BaseException | None) -> None:
        """The driver failed (`exc`) or was aborted (None: a second Ctrl-C, which does not wait)
        while its worker group trains: stop the group (at its next stop check, with a final
        checkpoint) before the run is closed, so it does not train on unrecorded in a process
        that outlives this call (a notebook, a service, a test session)."""
        if self.fit is None or self.fit.done():
            return
        why = ("aborted" if exc is None else "the job cannot go on" if isinstance(exc, UserError)
               else f"driver failed ({type(exc).__name__})")
        where = f"{why} at step {self.recorder.last_step if self.recorder else 0}"
        try:  # asked first: a UI that fails too (stderr a closed pipe) neither keeps them training nor is raised
            self.ports.request_stop()
        except Exception as stop_error:  # noqa: BLE001 - the original failure is the one to raise
            self._say(f"{where}; could not ask the workers to stop: {stop_error}")
            return
        self._say(f"{where}; stopping the worker group")
        if exc is not None and not self.fit.wait(constants.JOB_STOP_GRACE_S):
            self._say(f"the worker group did not stop within {constants.JOB_STOP_GRACE_S:g} s")

    def _say(self, message: str) -> None:
        """A status line while a failure is handled: the UI failing too does not replace that failure."""
        with contextlib.suppress(Exception):
            self._status(message)

    def _close(self, *, raising: bool = True, say_unsent: bool = True) -> None:
        """Withdraw the autoscaler request, end and close the run, release the lock: each whatever
        the ones before it raised (a job.json the disk had no room for left the run RUNNING, what
        MLflow had not taken unspilled). The first error is raised once all of them ran, unless
        not `raising` (a failure is being handled: it is the one to raise); the others are said.
        Where no result will follow, what MLflow did not take is said too, unless not `say_unsent`
        (an abort carries its result in `Aborted`: the CLI prints those lines from it)."""
        errors: list[tuple[str, BaseException]] = []
        for what, part in (("withdraw the autoscaler request", self._withdraw_request),
                           ("end the MLflow run", self._end_run), ("record the MLflow run", self._remember_run),
                           ("release the job's lock", self._release_lock)):
            try:
                part()
            except BaseException as exc:  # noqa: BLE001 - raised or said below, once every part ran
                errors.append((what, exc))
        for what, exc in errors[1 if raising else 0:]:
            self._say(f"could not {what}: {str(exc) or type(exc).__name__}")
        if (errors or not raising) and say_unsent and self.tracking_report is not None:  # no result, no closing lines: said here
            for line in self.tracking_report.lines():  # what MLflow did not take, the replay command
                self._say(line)
        if raising and errors:
            raise errors[0][1]

    def _withdraw_request(self) -> None:
        if self._requested:
            self._requested = False
            self.ports.autoscale.release()

    def _end_run(self) -> None:
        if self.run_log is None:
            return
        try:
            self._final_records()
        except BaseException as exc:
            if self.state is State.FINISHED:  # not recorded finished: the command fails, and the run with it
                self.state = State.STOPPED if isinstance(exc, KeyboardInterrupt) else State.FAILED
            raise
        finally:
            try:
                self.run_log.finish(RUN_STATUS[self.state if self.state.terminal else State.FAILED])
            finally:
                self.tracking_report = self.run_log.close()

    def _remember_run(self) -> None:
        """The MLflow run in job.json once it answered: a rerun stopped before it opens the run names it."""
        run_id = self.run_log.run_id if self.run_log is not None else None
        if run_id is None or run_id == self.identity.run_id:
            return
        try:
            self.identity.check_held()
        except UserError:  # taken over (said where it was found): job.json is the new holder's to write
            return
        self.identity.save_run_id(run_id)

    def _release_lock(self) -> None:
        if self.identity is not None:
            self.identity.release()

    def _final_records(self) -> None:
        rec, replanner = self.recorder, self.replanner
        if replanner is not None and replanner.observations:  # what `calibrate --experiment` learns the cluster from
            self.run_log.log_dict(self.identity.state.records["observations"], OBSERVATIONS_ARTIFACT)
        if self.state is State.FINISHED and self.outcome is not None:
            checkpoint = self.outcome.checkpoint.path if self.outcome.checkpoint is not None else None
            self.identity.mark_finished(step=rec.last_step, run_id=self.run_log.run_id,
                                        model_version=self.model_version, checkpoint=checkpoint)
        # One summary per attempt (a rerun adds its own), named by when it ended.
        ended = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.run_log.log_dict({"state": self.state.value, "final_step": rec.last_step, "restarts": rec.restarts,
                               "resizes": rec.resizes, "replan": replanner.replans if replanner else [], "ended": ended},
                              f"summary/{ended}-{self.state.value}.json")

    def _status(self, message: str) -> None:
        self.ports.ui.status(message)
