"""Running one job: the real ports (Ray, Ray Train, the tracking path, the autoscaler) wired into
the `JobController`. `run_job` is what `orchestrator run`, the tests and the benchmarks call."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from orchestrator import autoscale, constants
from orchestrator.config import JobConfig
from orchestrator.driver import data as job_data
from orchestrator.driver.controller import JobController
from orchestrator.driver.ports import FitOutcome, JobResult, Ports, Prepared, ProgressUnanswered
from orchestrator.driver.identity import JobIdentity, claim, finished_as_configured
from orchestrator.driver.sizing import Sizing, Workers, autoscale_enabled, size_job, wants_gpu

log = logging.getLogger(__name__)


class SilentUI:
    """A UI that shows nothing (library use, tests): statuses still go to the log."""

    def status(self, message: str) -> None:
        log.info("%s", message)

    def sized(self, prepared: Prepared, sizing: Sizing, resumed: bool | None) -> None:
        pass

    def progress(self, step: int, total: int, info: dict[str, float]) -> None:
        pass


@dataclass
class _Autoscaler:
    """The Ray autoscaler, asked on behalf of one job."""

    requester: str
    use_gpu: bool
    cpus_per_worker: float
    ttl_s: float

    def enabled(self, job: JobConfig) -> bool:
        return autoscale_enabled(job)

    def request(self, workers: int) -> None:
        bundles = autoscale.worker_bundles(workers, use_gpu=self.use_gpu, cpus_per_worker=self.cpus_per_worker)
        autoscale.request(self.requester, bundles, ttl_s=self.ttl_s)

    def arrived(self) -> int:
        return autoscale.slots_available(use_gpu=self.use_gpu, cpus_per_worker=self.cpus_per_worker)

    def release(self) -> None:
        autoscale.release(self.requester)


@dataclass
class RayPorts:
    """The controller's ports on a real Ray cluster and tracking server."""

    job: JobConfig
    workers: int | None
    config_path: str | None
    new_run: bool
    ui: Any
    identity: JobIdentity | None = None
    actor: Any = None
    tracker: Any = None
    run: Any = None
    scaler: _Autoscaler | None = field(default=None, repr=False)
    pending_drain: Any = field(default=None, repr=False)  # a drain the progress actor has not answered yet

    def ports(self) -> Ports:
        return Ports(claim=self.claim, prepare=self.prepare, size=self.size, open_run=self.open_run,
                     start_fit=self.start_fit, drain=self.drain, request_stop=self.request_stop,
                     clear_stop=self.clear_stop, register=self.register, ui=self.ui, autoscale=self,
                     slots=self.slots, register_finished=self.register_finished)

    # -- PREPARING ---------------------------------------------------------------------------------

    def claim(self) -> JobIdentity:
        # The data first: a bad column or path fails in a second, before anything is written. A job
        # finished with this very config reads no data: torch's import and the model's pass on the
        # meta device made 3 of the 4 seconds a rerun took to say it is complete.
        if self.new_run or not finished_as_configured(self.job):
            rows = job_data.check_data(self.job)
            log.info("data: %d rows in %s", rows, ", ".join(self.job.data.paths))
        self.identity = claim(self.job, new_run=self.new_run)
        return self.identity

    def prepare(self) -> Prepared:
        from orchestrator.ray_session import connect_ray

        self.tracker = _open_tracker(self.job)  # opens its store in the background meanwhile
        connect_ray(self.job.ray.address)
        use_gpu = wants_gpu(self.job)
        datasets = job_data.load_datasets(self.job)
        per_epoch = job_data.steps_per_epoch(datasets.train_rows, self.job.training.global_batch_size)
        r = self.job.resources
        timeout = constants.AUTOSCALE_TIMEOUT_S if r.autoscale_timeout_s is None else r.autoscale_timeout_s
        self.scaler = _Autoscaler(f"orchestrator-{self.identity.key}", use_gpu, r.cpus_per_worker,
                                  timeout + constants.AUTOSCALE_REQUEST_TTL_S)
        return Prepared(self.job, use_gpu, datasets, per_epoch, job_data.total_steps(self.job, per_epoch))

    # -- SIZING / AWAITING_WORKERS -----------------------------------------------------------------

    def size(self, prepared: Prepared, max_workers: int | None) -> Sizing:
        samples = prepared.total_steps * self.job.training.global_batch_size
        return size_job(self.job, workers=self.workers, use_gpu=prepared.use_gpu, total_samples=samples,
                        max_workers=max_workers)

    def enabled(self, job: JobConfig) -> bool:
        return self.scaler is not None and self.scaler.enabled(job)

    def request(self, workers: int) -> None:
        self.scaler.request(workers)

    def arrived(self) -> int:
        return self.scaler.arrived()

    def release(self) -> None:
        self.scaler.release()

    def slots(self) -> int:
        return self.scaler.arrived() if self.scaler is not None else 0

    # -- RUNNING -------------------------------------------------------------------------------------

    def open_run(self, prepared: Prepared, sizing: Sizing, identity: JobIdentity) -> Any:
        from orchestrator.driver.run_record import initial_records
        from orchestrator.driver.tracked_run import TrackedRun

        self.run = TrackedRun.open(self.tracker, prepared.job, identity)  # its owner, the controller, closes it
        initial_records(self.run, prepared, sizing, config_path=self.config_path)
        return self.run

    def start_fit(self, prepared: Prepared, sizing: Sizing, workers: Workers) -> Any:
        from orchestrator.driver.fit import RayFit, build_trainer
        from orchestrator.driver.progress import start_actor

        if self.actor is None:
            self.actor = start_actor(self.identity.key)
        if not isinstance(workers, int):  # elastic: Ray Train sizes the group on the coordinator's view
            from orchestrator.autoscale import refresh_cluster_view

            refresh_cluster_view()  # count the workers the driver saw arrive, not those of 20 s ago
        self.identity.check_ray_snapshot()  # each fit reads it back: a file planted since the claim too
        from orchestrator.driver.pruning import prune_after_fit

        run_dir, keep_last = self.identity.run_dir, prepared.job.checkpoint.keep_last
        trainer = build_trainer(prepared, sizing, workers, progress=self.actor, run_dir=run_dir)
        return RayFit(trainer, after=lambda: prune_after_fit(run_dir, keep_last=keep_last))

    def drain(self) -> tuple[list[Any], dict[int, dict[str, Any]]]:
        # One not answered in time is awaited again, not sent again: the events it takes when the
        # actor gets to it would be lost.
        if self.pending_drain is None:
            self.pending_drain = self.actor.drain.remote()
        answer = _answer(self.pending_drain, "answer a drain")
        self.pending_drain = None
        return answer

    def request_stop(self) -> None:
        self.actor.request_stop.remote()

    def clear_stop(self) -> None:
        _answer(self.actor.clear_stop.remote(), "clear the stop")

    def register(self, prepared: Prepared, outcome: FitOutcome, run: Any) -> str | None:
        from orchestrator.driver.registration import register_model

        return register_model(prepared, outcome, run, status=self.ui.status)

    def register_finished(self, identity: JobIdentity) -> str | None:
        """Log and register the model of a job that finished while the tracking server was down."""
        import ray.train

        from orchestrator.driver.data import input_example
        from orchestrator.driver.registration import log_model_now
        from orchestrator.driver.tracked_run import TrackedRun

        tracker = _open_tracker(self.job)  # sends what an earlier run left in its spill first
        run = TrackedRun.open(tracker, self.job, identity)
        try:
            recorded = identity.state.finished["checkpoint"]  # job.json's: made a Checkpoint under the guard
            version = log_model_now(self.job, lambda: ray.train.Checkpoint(recorded), lambda: input_example(self.job),
                                    run, status=self.ui.status)
            if version is not None:
                identity.mark_model(version, run.run_id)
            return version
        finally:
            # Opening the finished run set it RUNNING again; the job is complete whatever became of the model.
            run.finish("FINISHED")
            for line in run.close().lines():
                self.ui.status(line)

    def close(self) -> None:
        if self.tracker is not None and self.run is None:  # the job ended before its run was opened
            self.tracker.close(constants.TRACKING_CLOSE_TIMEOUT_S)
        if self.actor is not None:
            from orchestrator.driver.progress import kill_actor

            kill_actor(self.actor, self.identity.key)
            self.actor = None


def _answer(ref: Any, what: str) -> Any:
    """The progress actor's answer, within `PROGRESS_ANSWER_S`; ProgressUnanswered otherwise."""
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        return ray.get(ref, timeout=constants.PROGRESS_ANSWER_S)
    except GetTimeoutError:
        raise ProgressUnanswered(f"the progress actor did not {what} within {constants.PROGRESS_ANSWER_S:g} s "
                                 "(its node lost, or the actor stuck)") from None


def _open_tracker(job: JobConfig) -> Any:
    from orchestrator.driver.run_record import resolve_tracking_uri
    from orchestrator.driver.tracked_run import open_tracker

    return open_tracker(resolve_tracking_uri(job), job.tracking.spill_dir)


def run_job(job: JobConfig, *, workers: int | None = None, config_path: str | None = None, ui: Any = None,
            stop: threading.Event | None = None, new_run: bool = False) -> JobResult:
    """Run (or resume) `job` to the end, a stop, or a failure; see `JobController`."""
    ports = RayPorts(job.localized(), workers, config_path, new_run, ui or SilentUI())
    controller = JobController(ports.job, ports.ports(), workers=workers, stop=stop)
    try:
        return controller.run()
    finally:
        ports.close()
