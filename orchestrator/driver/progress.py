"""The progress actor: where the training workers' events meet the driver.

Rank 0 publishes typed events (`trainers.events`), every rank registers its process and node, and
Ray Train's controller forwards worker failures (`fit.FailureForwarder`); the driver drains it every
`PROGRESS_POLL_S` and asks it for a stop, which rank 0 reads. It runs on the driver's node, so it
outlives any worker node the job loses, and it keeps only what the driver has not drained yet.
Its process imports this module: keep Ray Train (and with it Ray Data and pandas) out of it.
"""

from __future__ import annotations

from typing import Any

import ray
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
        self._given_up: str | None = None

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

    def record_failure(self, cause: str, user_error: str | None = None) -> None:
        # The last step the group reported trained (rank 0 sends every step before a checkpoint).
        self._events.append(WorkerFailed(step=self._last_step, cause=cause, user_error=user_error))
        self._given_up = self._given_up or user_error

    def given_up(self) -> str | None:
        """A worker's UserError ended an earlier group: the restarted group leaves at once."""
        return self._given_up

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
