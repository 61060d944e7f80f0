"""The driver as an explicit state machine, in the spirit of Ray Train V2's `TrainController`:

    PREPARING -> SIZING -> [AWAITING_WORKERS] -> RUNNING <-> RESIZING -> FINISHED | STOPPED | FAILED

`step()` performs one state's work and returns the next state; `run()` steps until a terminal
state and, whatever happens, ends the MLflow run it opened with the true status, withdraws the
autoscaler request and releases the job's lock. Everything outside (Ray, the trainer, the
tracking server, the autoscaler, the clock) comes in through `Ports`, so unit tests drive every
transition with fakes in milliseconds. Decisions come from the pure `policies`.
"""

from __future__ import annotations

import threading
from typing import Any

from orchestrator import constants
from orchestrator.config import JobConfig, WorkerRange
from orchestrator.driver.ending import JobEnd
from orchestrator.driver.policies import (
    GiveUp,
    KeepWaiting,
    State,
    StopReason,
    after_fit,
    beyond_cluster,
    diverged,
    group_kind,
    poll_again,
    stop_to_request,
    wait_decision,
)
from orchestrator.driver.ports import (
    Aborted,
    Fit,
    FitOutcome,
    Identity,
    JobResult,
    Ports,
    Prepared,
    ProgressUnanswered,
    Run,
)
from orchestrator.driver.recorder import Recorder
from orchestrator.driver.replan import Replanner
from orchestrator.driver.result import job_result
from orchestrator.driver.sizing import Sizing, Workers, elastic_bounds, fixed_workers, least_workers
from orchestrator.errors import UserError, worker_user_error
from trainers.events import (
    CheckpointSaved,
    Evaluated,
    Event,
    GroupStarted,
    StepsDone,
    SystemSample,
    WorkerFailed,
    WorkerWarning,
)


class JobController(JobEnd):
    def __init__(self, job: JobConfig, ports: Ports, *, workers: int | None = None,
                 stop: threading.Event | None = None) -> None:
        self.job, self.ports, self.workers_flag = job, ports, workers
        self.stop_event = stop or threading.Event()
        self.state = State.PREPARING
        self.identity: Identity | None = None
        self.prepared: Prepared | None = None
        self.sizing: Sizing | None = None
        self.run_log: Run | None = None
        self.recorder: Recorder | None = None
        self.fit: Fit | None = None
        self.outcome: FitOutcome | None = None
        self.workers: Workers = 0
        self.stop_requested: StopReason | None = None
        self.resize_to: int | None = None
        self.resize_reason = ""
        self.replanner: Replanner | None = None
        self.model_version: str | None = None
        self._waiting_since: float | None = None
        self._autoscale_record: dict[str, Any] | None = None
        self._sizing_before: Sizing | None = None
        self.tracking_report: Any = None
        self._wanted = 0
        self._requested = False
        self._last_arrived = -1
        self._misses = 0  # polls in a row the progress actor did not answer
        # ...of those, the ones since the fit ended: its last events, or a resize's cleared stop, awaited that often
        self._misses_at_end = 0

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> JobResult:
        try:
            while not self.state.terminal:
                self.state = self.step()
        except BaseException as exc:
            aborted = isinstance(exc, KeyboardInterrupt)  # a second Ctrl-C: abort without waiting for a checkpoint
            self.state = State.STOPPED if aborted else State.FAILED
            try:
                self._stop_live_fit(None if aborted else exc)
            finally:
                # the failure being handled is the one raised; an abort's result says what MLflow did not take
                self._close(raising=False, say_unsent=not aborted)
            if aborted:  # with the result: the CLI prints its closing lines
                raise Aborted(self._result()) from exc
            raise
        self._close()
        return self._result()

    def step(self) -> State:
        handler = {State.PREPARING: self._prepare, State.SIZING: self._size, State.AWAITING_WORKERS: self._await,
                   State.RUNNING: self._running, State.RESIZING: self._resize}[self.state]
        return handler()

    # -- states -----------------------------------------------------------------------------------

    def _prepare(self) -> State:
        self.identity = self.ports.claim()
        if self.identity.complete:  # nothing to train: said so, nothing touched but a model owed
            if self.identity.model_pending:
                self.model_version = self.ports.register_finished(self.identity)
            return State.FINISHED
        self.prepared = self.ports.prepare()
        return State.SIZING

    def _size(self) -> State:
        from orchestrator.driver.sizing import sizes_before_autoscaling

        assert self.prepared is not None
        if self.stop_event.is_set():
            return State.STOPPED  # asked while preparing (data, profile, network probe): nothing started, no run
        scaler = self.ports.autoscale
        if scaler is None or not scaler.enabled(self.prepared.job):
            r = self.job.resources
            if why := beyond_cluster(least=least_workers(self.job, self.workers_flag), slots=self.ports.slots(),
                                     use_gpu=self.prepared.use_gpu, cpus_per_worker=r.cpus_per_worker):
                raise UserError(why)
            return self._launch(self.ports.size(self.prepared, None))
        if sizes_before_autoscaling(self.job, self.workers_flag):
            self.sizing = self.ports.size(self.prepared, None)
            if self.stop_event.is_set():
                return State.STOPPED  # asked while profiling and planning: no node requested
        r = self.job.resources
        self._wanted = (fixed_workers(self.job, self.workers_flag) or (self.sizing.most if self.sizing else None)
                        or (r.workers.max if isinstance(r.workers, WorkerRange) else 1))
        scaler.request(self._wanted)
        self._requested = True
        self._waiting_since = self.ports.clock()
        return State.AWAITING_WORKERS

    def _await(self) -> State:
        assert self.prepared is not None and self._waiting_since is not None
        if self.stop_event.is_set():
            return State.STOPPED  # nothing trained yet, no run opened
        r = self.job.resources
        timeout = constants.AUTOSCALE_TIMEOUT_S if r.autoscale_timeout_s is None else r.autoscale_timeout_s
        arrived = self.ports.autoscale.arrived()
        waited = self.ports.clock() - self._waiting_since
        decision = wait_decision(wanted=self._wanted, arrived=arrived, least=least_workers(self.job, self.workers_flag),
                                 waited_s=waited, timeout_s=timeout)
        if arrived != self._last_arrived:
            self._last_arrived = arrived
            kind = "GPU workers" if self.prepared.use_gpu else "CPU workers"
            self.ports.ui.status(f"autoscaler: {min(arrived, self._wanted)}/{self._wanted} {kind} available "
                                 f"({waited:.0f} s of {timeout:g} s)")
        if isinstance(decision, KeepWaiting):
            self.ports.sleep(min(constants.AUTOSCALE_POLL_S, max(timeout - waited, 0.0)))
            return State.AWAITING_WORKERS
        if isinstance(decision, GiveUp):
            raise UserError(decision.reason)
        self._autoscale_record = {"wanted": self._wanted, "arrived": decision.workers,
                                  "shortfall": decision.shortfall, "waited_s": round(waited, 1)}
        if self.sizing is None or decision.shortfall:
            self._sizing_before = self.sizing
            self.sizing = self.ports.size(self.prepared, decision.workers)
            if decision.shortfall:
                self.ports.ui.status(f"autoscaler: {decision.workers} of {self._wanted} workers arrived; sized on "
                                     f"those. {self.sizing.explanation}")
        return self._launch(self.sizing)

    def _launch(self, sizing: Sizing) -> State:
        assert self.prepared is not None and self.identity is not None
        if self.stop_event.is_set():
            return State.STOPPED  # asked while profiling and planning: still no run, no workers
        self.identity.check_held()  # lost while sizing or waiting for nodes: start nothing beside its new holder
        self.sizing, self.workers = sizing, sizing.workers
        self.run_log = self.ports.open_run(self.prepared, sizing, self.identity)
        self.replanner = Replanner(self.job, sizing, identity=self.identity, run_log=self.run_log,
                                   slots=self.ports.slots, status=self._status)
        self.recorder = Recorder(self.run_log, status=self._status, global_batch=self.job.training.global_batch_size,
                                 counts=self.identity.state.counts, save_counts=self.identity.save_counts,
                                 log_every=self.job.training.log_every, step=self.identity.checkpoint_step)
        if self._autoscale_record is not None:
            self._log_autoscale()
        self.ports.ui.sized(self.prepared, sizing, self.run_log.resumed)
        self.fit = self.ports.start_fit(self.prepared, sizing, self.workers)
        return State.RUNNING

    def _running(self) -> State:
        assert self.fit is not None and self.prepared is not None
        done = self.fit.done()  # read before draining: every event of a finished fit is in this drain
        drained = self._poll()
        self._misses_at_end = self._misses_at_end + 1 if done and not drained else 0
        if poll_again(fit_done=done, drained=drained, misses=self._misses_at_end,
                      limit=constants.PROGRESS_MISSES_AT_END):
            self.ports.sleep(constants.PROGRESS_POLL_S)
            return State.RUNNING
        self.outcome = self.fit.outcome()
        reached = self.recorder.fit_ended(self.outcome.metrics)
        self.replanner.note_observation(self.recorder.group)
        completed = reached >= self.prepared.total_steps
        state = after_fit(error=self.outcome.error is not None, stop=self.stop_requested, completed=completed)
        if state is State.FAILED and self.outcome.error is not None:
            raise worker_user_error(self.outcome.error) or self.outcome.error
        if state is State.FAILED:
            raise RuntimeError(f"the worker group stopped at step {self.recorder.last_step} of "
                               f"{self.prepared.total_steps} without an error")
        if state is State.FINISHED:
            self.model_version = self.ports.register(self.prepared, self.outcome, self.run_log)
        return state

    def _resize(self) -> State:
        assert self.resize_to is not None and self.prepared is not None and self.sizing is not None
        if not self.stop_event.is_set():
            self.identity.check_held()  # lost while the stop was cleared again: start no group beside its new holder
            try:
                self.ports.clear_stop()
            except ProgressUnanswered as exc:  # asked again: the new group would read the old stop and leave
                self._missed(exc)
                self._misses_at_end += 1
                if self._misses_at_end > constants.PROGRESS_MISSES_AT_END:  # nothing else ends this state
                    raise RuntimeError(f"{exc}, {self._misses_at_end} times in a row, for a resize at step "
                                       f"{self.recorder.last_step}; run the same command again to resume there") from None
                self.ports.sleep(constants.PROGRESS_POLL_S)
                return State.RESIZING
        bounds = elastic_bounds(self.job, self.sizing)
        assert bounds is not None
        self.workers = (bounds[0], self.resize_to)
        self.resize_to, self.stop_requested = None, None
        if self.stop_event.is_set():
            return State.STOPPED  # asked as the group stopped for the resize, at a checkpoint: no new group
        self.fit = self.ports.start_fit(self.prepared, self.sizing, self.workers)
        return State.RUNNING

    # -- while running ------------------------------------------------------------------------------

    def _poll(self) -> bool:
        """One poll; False where the progress actor did not answer (nothing drained)."""
        assert self.recorder is not None and self.prepared is not None
        self.identity.check_held()  # another driver took the job over: stop before both train it
        try:
            events, ranks = self.ports.drain()
            self._misses = 0
        except ProgressUnanswered as exc:
            self._missed(exc)
            events, ranks = [], {}
        for event in events:
            self._handle(event)
        self.recorder.run_known()
        self.recorder.locate(ranks)
        if (resize := self.replanner.check(self.recorder, self.prepared.total_steps)) is not None:
            self.resize_to = resize.workers
            self.resize_reason = f"{resize.reason} (stopped at step {self.recorder.last_step})"
        for warning in self.run_log.drain_warnings():
            self._status(warning)
        self._remember_run()
        self.ports.ui.progress(self.recorder.last_step, self.prepared.total_steps, self._progress_info())
        wanted = stop_to_request(user_stop=self.stop_event.is_set(), resize_to=self.resize_to,
                                 requested=self.stop_requested)
        if wanted is not None:
            self.stop_requested = wanted
            self.ports.request_stop()
        return self._misses == 0

    def _missed(self, exc: ProgressUnanswered) -> None:
        """The progress actor did not answer in time (its node lost, the actor stuck): a missed poll,
        said once, asked again at the next, while a stop is still acted on."""
        self._misses += 1
        if self._misses == 1:
            self._status(f"{exc}; progress is not shown until it answers, a stop is still acted on")

    def _handle(self, event: Event) -> None:
        rec = self.recorder
        if isinstance(event, StepsDone):
            rec.steps(event)
            if (bad := diverged(event.points)) is not None:  # the run ends FAILED, the workers stop
                raise UserError(f"train/loss: {bad.metrics['train/loss']} at step {bad.step}: training diverged; "
                                "lower training.lr, set training.grad_clip, or look for NaN values in the data")
        elif isinstance(event, GroupStarted):
            self.replanner.note_observation(self.recorder.group)
            kind = group_kind(groups_before=rec.groups_started, resize_pending=bool(self.resize_reason),
                              failed_before=rec.failure_pending)
            rec.group_started(event, kind, resize_reason=self.resize_reason)
            self.resize_reason = ""
            if self._requested:  # Ray Train keeps its own request from here on
                self.ports.autoscale.release()
                self._requested = False
        elif isinstance(event, Evaluated):
            rec.evaluated(event)
        elif isinstance(event, CheckpointSaved):
            rec.checkpoint(event)
        elif isinstance(event, SystemSample):
            rec.system(event)
        elif isinstance(event, WorkerWarning):
            rec.warning(event)
        elif isinstance(event, WorkerFailed):
            rec.failed(event)
            if event.user_error is not None:  # bad input: the restarted group leaves at once (given_up)
                raise UserError(event.user_error)

    # -- records and the result (stopping the workers and closing: JobEnd, in ending.py) ------------

    def _log_autoscale(self) -> None:
        record = self._autoscale_record
        self.run_log.set_tags({f"autoscale.{k}": v for k, v in record.items()})
        if record["shortfall"]:
            self.run_log.set_tags({"autoscale.replan": f"{record['arrived']} of {record['wanted']} workers arrived: "
                                                       f"{self.sizing.explanation}"})
            before = self._sizing_before
            if before is not None and before.plan is not None:
                self.run_log.log_dict(before.plan.to_dict(), "plan/plan_before_autoscale.json")

    def _progress_info(self) -> dict[str, float]:
        info = dict(self.recorder.last_metrics)
        group = self.recorder.group
        if group is not None and group.observed_step_time_s:
            # The group's median step rate: the figure a user can compare runs by.
            info["train/samples_per_s"] = self.job.training.global_batch_size / group.observed_step_time_s
        return info

    def _result(self) -> JobResult:
        return job_result(self.state, identity=self.identity, prepared=self.prepared, recorder=self.recorder,
                          outcome=self.outcome, run_log=self.run_log, model_version=self.model_version,
                          workers=self.workers, replans=self.replanner.replans if self.replanner else [],
                          tracking=self.tracking_report, global_batch=self.job.training.global_batch_size)
