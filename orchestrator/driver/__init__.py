"""The driver: one job from its config to a trained, registered model.

`run_job` wires the real ports into the `JobController` (controller.py), the state machine that
prepares, sizes, launches and follows the job; `policies` holds its pure decisions, `recorder`
what it writes about the job, `identity` the job's lock and recorded state. The controller and
its policies import neither Ray nor MLflow; `run_job` (job.py) brings them in when called.
"""

from typing import Any

from orchestrator.driver.controller import JobController
from orchestrator.driver.ports import JobResult, Ports
from orchestrator.driver.policies import State

__all__ = ["JobController", "JobResult", "Ports", "State", "find_actor", "run_job"]


def __getattr__(name: str) -> Any:
    if name == "run_job":
        from orchestrator.driver.job import run_job

        return run_job
    if name == "find_actor":
        from orchestrator.driver.progress import find_actor

        return find_actor
    raise AttributeError(name)
