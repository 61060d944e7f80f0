"""The trained model, logged to the job's MLflow run and registered, once training finished."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from orchestrator import constants
from orchestrator.tracking import bounded_requests
from orchestrator.redact import redact_uri
from orchestrator.tracking.ops import describe
from orchestrator.tracking.store import artifacts_elsewhere, credentials_set
from orchestrator.driver.ports import FitOutcome, Prepared
from orchestrator.driver.fit import read_checkpoint

log = logging.getLogger(__name__)


def requirements() -> list[str]:
    """What the logged model needs to load, known here (MLflow would otherwise spend seconds
    inferring it in a subprocess, and warn about torch's local version label)."""
    import mlflow
    import numpy
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", f"numpy=={numpy.__version__}"]


def register_model(prepared: Prepared, outcome: FitOutcome, run: Any, *, status: Any = None) -> str | None:
    """Log the trained model with an input example; register it under the configured name.
    Returns the version, or None (no name configured, or the tracking server could not take it:
    then the same command, run again, logs and registers it)."""
    if outcome.checkpoint is None:
        return None
    return log_model_now(prepared.job, lambda: outcome.checkpoint, lambda: prepared.data.example, run, status=status)


def log_model_now(job: Any, checkpoint: Callable[[], Any], example: Callable[[], Any], run: Any, *,
                  status: Any = None) -> str | None:
    """`log_and_register` within bounded requests; a tracking server that cannot take it is said.
    The final `checkpoint` (a Ray Train checkpoint, made from the path job.json records) and the input
    `example` are made and read under the same guard: either one gone or damaged since training
    leaves the job trained and FINISHED, its model not logged and said, its checkpoints as they are."""
    if not run.wait_resolved(constants.TRACKING_REQUEST_TIMEOUT_S):
        _tell(status, "model not logged: the tracking server is unreachable; run the same command again once it "
                      "is back to log and register it")
        return None
    try:
        state, rows = _read(checkpoint, example)
        with bounded_requests():
            return log_and_register(job, state, rows, run_id=run.run_id, tracking_uri=run.tracking_uri)
    except Unreadable as exc:  # a rerun meets the same files: no "run it again"
        _tell(status, f"trained, but the model was not logged: {exc}")
        return None
    except ArtifactsElsewhere as exc:  # a rerun meets the same location: no "run it again"
        _tell(status, f"model not logged: {exc}")
        return None
    except Exception as exc:  # noqa: BLE001 - training is done and checkpointed; this is recoverable
        _tell(status, f"model not logged ({describe(exc)}); run the same command again to log and register it")
        return None


class Unreadable(Exception):
    """What the model is logged from (the final checkpoint, the input example) cannot be read now."""


def _read(checkpoint: Callable[[], Any], example: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    try:
        state = read_checkpoint(checkpoint())
    except Exception as exc:  # noqa: BLE001 - missing, truncated, unreadable: all said the same way
        raise Unreadable(f"its final checkpoint cannot be read ({describe(exc)})") from exc
    try:
        return state, example()
    except Exception as exc:  # noqa: BLE001 - the data files, read again for a finished job's model
        raise Unreadable(f"its input example cannot be read from data.paths ({describe(exc)})") from exc


def _tell(status: Any, message: str) -> None:
    if status is None:
        log.warning("%s", message)
    else:  # shown by the UI: logged at INFO, or the CLI's log handler said it twice
        log.info("%s", message)
        status(message)


class ArtifactsElsewhere(Exception):
    """The run's artifacts go to another host than the tracking server: not sent the credentials."""


# On the logged model and its version: the training step whose weights they hold.
STEP_TAG = "orchestrator.step"


def log_and_register(job: Any, state: dict[str, Any], example: Any, *, run_id: str, tracking_uri: str) -> str | None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from trainers.models import build_model

    client = MlflowClient(tracking_uri)
    step = str(state.get("step", ""))
    # This step's model registered already (logged before the server lost the answer). A run trained
    # further (a longer training.max_steps) has new weights: they are a new version.
    for version in client.search_model_versions(f"run_id='{run_id}'"):
        if version.tags.get(STEP_TAG) == step:
            return str(version.version)
    model = build_model(job.model.name, job.model.kwargs)
    model.load_state_dict(state["model"])
    model.eval()
    run = client.get_run(run_id)
    if credentials_set(tracking_uri) and artifacts_elsewhere(run.info.artifact_uri, tracking_uri):
        # MLflow's client hands the tracking credentials to whatever host the artifact location names
        raise ArtifactsElsewhere(f"the run's artifact location {redact_uri(run.info.artifact_uri)} is on a host other "
                                 "than the tracking server's, which MLflow would send the tracking credentials; "
                                 "set the experiment's artifact location to the tracking server's "
                                 "(mlflow-artifacts:/) or log without credentials")
    fail_torn_models(client, run)
    mlflow.set_tracking_uri(tracking_uri)
    # Into the run by its id, not `start_run`: leaving that context ends the run FINISHED before the
    # driver records the job finished in job.json; the driver ends the run, last. The logged model
    # goes to the run's experiment (without an active run MLflow would put it in the default one).
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    info = mlflow.pytorch.log_model(model, name="model", input_example=example, pip_requirements=requirements(),
                                    tags={STEP_TAG: step}, run_id=run_id)
    if not job.tracking.registered_model:
        return None
    return str(mlflow.register_model(info.model_uri, job.tracking.registered_model, tags={STEP_TAG: step}).version)


def fail_torn_models(client: Any, run: Any) -> None:
    """The run's logged models left PENDING: a driver killed inside `log_model`, before MLflow marked
    the model READY (or FAILED, had it raised). Their artifacts may be partial; they are marked FAILED,
    as MLflow would have, not deleted (only the driver holding the job's lock logs the run's model)."""
    # the status is checked here: a filter on it matches nothing on a sqlite store (MLflow 3.17)
    for model in client.search_logged_models([run.info.experiment_id],
                                             filter_string=f"source_run_id = '{run.info.run_id}'"):
        if str(model.status) == "PENDING":
            client.finalize_logged_model(model.model_id, "FAILED")
