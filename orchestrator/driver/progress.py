"""The progress actor: where the training workers' events meet the driver.

Rank 0 publishes typed events (`trainers.events`), every rank registers its process and node, and
Ray Train's controller forwards worker failures (`FailureForwarder`); the driver drains it every
`PROGRESS_POLL_S` and asks it for a stop, which rank 0 reads. It runs on the driver's node, so it
outlives any worker node the job loses, and it keeps only what the driver has not drained yet.
"""

from __future__ import annotations

from typing import Any

import ray
import ray.train
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from trainers.events import CheckpointSaved, Event, GroupStarted, StepsDone, WorkerFailed


NAMESPACE = "orchestrator"


def actor_name(job_key: str) -> str:
    return f"progress-{job_key}"


@ray.remote(num_cpus=0)
class ProgressActor:
    def __init__(self) -> None:
        self._events: list[Event] = []
        self._workers: dict[int, dict[str, Any]] = {}
        self._last_step = 0
        self._stop = False

    def publish(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, GroupStarted):  # a new worker group: forget ranks it no longer has
                self._workers = {r: w for r, w in self._workers.items() if r < event.workers}
                self._last_step = event.step
            elif isinstance(event, (StepsDone, CheckpointSaved)):
                self._last_step = max(self._last_step, event.step)
        self._events.extend(events)

    def register_worker(self, rank: int, pid: int, node_id: str) -> None:
        self._workers[rank] = {"pid": pid, "node_id": node_id}

    def record_failure(self, cause: str) -> None:
        # The last step the group reported trained (rank 0 sends every step before a checkpoint).
        self._events.append(WorkerFailed(step=self._last_step, cause=cause))

    def drain(self) -> tuple[list[Event], dict[int, dict[str, Any]]]:
        events, self._events = self._events, []
        return events, dict(self._workers)

    def workers(self) -> dict[int, dict[str, Any]]:
        return dict(self._workers)

    def request_stop(self) -> None:
        self._stop = True

    def clear_stop(self) -> None:
        self._stop = False

    def stop_requested(self) -> bool:
        return self._stop


def start_actor(job_key: str) -> Any:
    """The job's progress actor, on this (the driver's) node, under a name tools can find."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ProgressActor.options(name=actor_name(job_key), namespace=NAMESPACE, scheduling_strategy=here).remote()


def find_actor(job_key: str) -> Any:
    """The progress actor of the running job with this identity key (for tools and tests)."""
    return ray.get_actor(actor_name(job_key), namespace=NAMESPACE)


class ActorProgress:
    """The driver's side: drain events, ask for and clear a stop."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def drain(self) -> tuple[list[Event], dict[int, dict[str, Any]]]:
        return ray.get(self.actor.drain.remote())

    def request_stop(self) -> None:
        self.actor.request_stop.remote()

    def clear_stop(self) -> None:
        ray.get(self.actor.clear_stop.remote())


class FailureForwarder(ray.train.UserCallback):
    """Runs in the Ray Train controller when a worker group fails, before the controller restarts
    it: tells the driver why (the restarted rank 0 only knows where it resumed from), and has the
    autoscaling coordinator look at the nodes now, so an elastic restart after a lost node sizes on
    the nodes that are left."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        from orchestrator.autoscale import refresh_cluster_view

        causes = [f"rank {rank}: {describe_error(exc)}" for rank, exc in sorted(worker_exceptions.items())]
        self.progress.record_failure.remote("; ".join(causes))
        refresh_cluster_view()


def describe_error(exc: BaseException) -> str:
    """The exception's type and first line, short enough for an MLflow tag."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}"[:300]


def kill_actor(actor: Any, job_key: str) -> None:
    """Kill the progress actor and wait until its name is free: the same job run again from this
    process (a rerun after a stop) names its actor alike."""
    import time

    from orchestrator import constants

    ray.kill(actor)
    deadline = time.monotonic() + constants.ACTOR_RELEASE_S
    while time.monotonic() < deadline:
        try:
            ray.get_actor(actor_name(job_key), namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.05)
