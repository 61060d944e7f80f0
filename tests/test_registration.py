"""The trained model logged to the job's run and registered (`orchestrator/driver/registration.py`),
on a real MLflow sqlite store."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_a_job_trained_further_registers_the_new_weights_and_a_retry_of_one_step_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A longer `training.max_steps` continues the same run: the model it trained to step 20 is a new
    version (it was the step-10 version again, version 1 reported as the model trained); logging
    one step's model twice (a retry after the server lost the answer) registers it once."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient
    from test_identity import job

    from orchestrator.driver.registration import log_and_register
    from trainers.models import build_model

    monkeypatch.chdir(tmp_path)  # the sqlite store's artifacts
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = job(str(tmp_path))
    config = config.model_copy(update={"tracking": config.tracking.model_copy(update={"registered_model": "m"})})
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    weights = build_model(config.model.name, config.model.kwargs).state_dict()

    def register(step: int) -> str | None:
        state = {"step": step, "model": {k: v + step for k, v in weights.items()}}
        return log_and_register(config, state, np.zeros((2, 64), np.float32), run_id=run_id, tracking_uri=uri)

    assert register(10) == "1"
    assert register(20) == "2"
    assert register(20) == "2"  # a retry
    assert {str(v.version) for v in client.search_model_versions("name='m'")} == {"1", "2"}
    loaded = mlflow.pytorch.load_model("models:/m/2").state_dict()
    assert all(torch.equal(loaded[k], v + 20) for k, v in weights.items())  # the weights trained further


def test_registering_the_model_leaves_the_run_running_for_the_driver_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver ends the run after `job.json` records the job finished: logging the model must not
    end it first (`mlflow.start_run` as a context did: a kill in between left a FINISHED run whose
    job had not finished)."""
    import numpy as np
    from mlflow.tracking import MlflowClient
    from test_identity import job

    from orchestrator.driver.registration import log_and_register
    from trainers.models import build_model

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = job(str(tmp_path))
    config = config.model_copy(update={"tracking": config.tracking.model_copy(update={"registered_model": "m"})})
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    state = {"step": 5, "model": build_model(config.model.name, config.model.kwargs).state_dict()}
    assert log_and_register(config, state, np.zeros((2, 64), np.float32), run_id=run_id, tracking_uri=uri) == "1"
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.end_time is None
    assert [m.source_run_id for m in client.search_logged_models([run.info.experiment_id])] == [run_id]


@pytest.mark.parametrize("where", ["variable", "credentials file"])
def test_a_model_is_not_logged_to_an_artifact_location_on_another_host_with_the_credentials(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's client uploads the logged model to the experiment's artifact location with the
    tracking credentials attached, whatever its host: an experiment made with an http:// location
    on another host collected MLFLOW_TRACKING_TOKEN with the model, or the user name and password
    MLflow reads from ~/.mlflow/credentials when no variable names them."""
    from types import SimpleNamespace

    import numpy as np
    from mlflow.tracking import MlflowClient
    from test_identity import job
    from test_tracking_credentials import _stub

    from orchestrator.driver.registration import log_model_now
    from trainers.models import build_model

    monkeypatch.chdir(tmp_path)
    if where == "variable":
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "s3cret")
    else:
        monkeypatch.setenv("HOME", str(tmp_path))
        (tmp_path / ".mlflow").mkdir()
        (tmp_path / ".mlflow" / "credentials").write_text("[mlflow]\nmlflow_tracking_username = bob\n"
                                                          "mlflow_tracking_password = s3cret\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = job(str(tmp_path))
    state = {"step": 10, "model": build_model(config.model.name, config.model.kwargs).state_dict()}
    said: list[str] = []
    with _stub(lambda path: {}) as (other, seen):
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("e", artifact_location=f"http://{other}/a")).info.run_id
        run = SimpleNamespace(run_id=run_id, tracking_uri=uri, wait_resolved=lambda timeout: True)
        assert log_model_now(config, state, np.zeros((2, 64), np.float32), run, status=said.append) is None
    assert seen == []
    assert said == [f"model not logged: the run's artifact location http://{other}/a/{run_id}/artifacts is on a host "
                    "other than the tracking server's, which MLflow would send the tracking credentials; set the "
                    "experiment's artifact location to the tracking server's (mlflow-artifacts:/) or log without "
                    "credentials"]
