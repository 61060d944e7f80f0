"""The trained model logged to the job's run and registered (`orchestrator/driver/registration.py`),
on a real MLflow sqlite store."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from tracking_fakes import URI, FakeStore, fake  # noqa: F401 (fixture: fake)


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


def test_a_logged_model_left_pending_by_a_driver_killed_inside_log_model_is_marked_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL inside MLflow's `log_model` left its logged model PENDING (MLflow sets READY or FAILED
    only when it returns or raises) beside the rerun's READY one, looking in progress forever."""
    import numpy as np
    from mlflow.tracking import MlflowClient
    from test_identity import job

    from orchestrator.driver.registration import STEP_TAG, log_and_register
    from trainers.models import build_model

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = job(str(tmp_path))
    client = MlflowClient(uri)
    experiment = client.create_experiment("e")
    run_id, other = (client.create_run(experiment).info.run_id for _ in range(2))
    torn = client.create_logged_model(experiment, name="model", source_run_id=run_id, tags={STEP_TAG: "5"})
    busy = client.create_logged_model(experiment, name="model", source_run_id=other)  # another run's: not ours
    state = {"step": 5, "model": build_model(config.model.name, config.model.kwargs).state_dict()}
    log_and_register(config, state, np.zeros((2, 64), np.float32), run_id=run_id, tracking_uri=uri)
    statuses = {m.model_id: str(m.status) for m in client.search_logged_models([experiment])}
    assert statuses.pop(torn.model_id) == "FAILED" and statuses.pop(busy.model_id) == "PENDING"
    assert list(statuses.values()) == ["READY"]

@pytest.mark.parametrize("where", ["variable", "credentials file"])
def test_a_model_is_not_logged_to_an_artifact_location_on_another_host_with_the_credentials(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's client uploads the logged model to the experiment's artifact location with the
    tracking credentials attached, whatever its host: an experiment made with an http:// location
    on another host collected MLFLOW_TRACKING_TOKEN with the model, or the user name and password
    MLflow reads from ~/.mlflow/credentials when no variable names them."""

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
    checkpoint = _checkpoint(tmp_path / "ckpt", {"step": 10, "model": build_model(config.model.name,
                                                                              config.model.kwargs).state_dict()})
    said: list[str] = []
    with _stub(lambda path: {}) as (other, seen):
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("e", artifact_location=f"http://{other}/a")).info.run_id
        run = SimpleNamespace(run_id=run_id, tracking_uri=uri, wait_resolved=lambda timeout: True)
        example = np.zeros((2, 64), np.float32)
        assert log_model_now(config, lambda: checkpoint, lambda: example, run, status=said.append) is None
    assert seen == []
    assert said == [f"model not logged: the run's artifact location http://{other}/a/{run_id}/artifacts is on a host "
                    "other than the tracking server's, which MLflow would send the tracking credentials; set the "
                    "experiment's artifact location to the tracking server's (mlflow-artifacts:/) or log without "
                    "credentials"]


def _checkpoint(folder: Path, state: dict) -> object:
    import ray.train

    from trainers.checkpoint import write

    return ray.train.Checkpoint(str(write(folder, state, step=state["step"])))


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_final_checkpoint_gone_or_damaged_at_registration_leaves_the_job_finished(damage: str, tmp_path: Path) -> None:
    """The final checkpoint was read outside the guard that turns a registration failure into a
    warning: one deleted or truncated after training failed the trained job (its run FAILED, a
    traceback). Now the job finishes, says why the model was not logged, and its files stay."""
    from driver_fakes import FakeFit, World, finished_fit
    from test_controller import job, run

    from orchestrator.driver.ports import FitOutcome
    from orchestrator.driver.registration import register_model

    checkpoint = _checkpoint(tmp_path / "checkpoint_000010", {"step": 10, "model": {}})
    state_file = tmp_path / "checkpoint_000010" / "state.pt"
    if damage == "missing":
        state_file.unlink()
    else:
        state_file.write_bytes(state_file.read_bytes()[:20])
    left = sorted((p.name, p.read_bytes()) for p in (tmp_path / "checkpoint_000010").iterdir())
    world = World(job(), [FakeFit(finished_fit().batches, FitOutcome({"step": 10}, checkpoint))])
    world.run.wait_resolved = lambda timeout_s: True
    world._register = lambda prepared, outcome, run_log: register_model(prepared, outcome, run_log,
                                                                       status=world.ui.status)
    controller = run(world)
    assert controller.result.state.value == "finished" and world.run.status == "FINISHED"
    assert world.identity.finished == {"step": 10, "run_id": "run-1", "model_version": None}
    said = [m for m in world.ui.statuses if "not logged" in m]
    assert len(said) == 1 and said[0].startswith("trained, but the model was not logged: its final checkpoint "
                                                 "cannot be read (CorruptCheckpoint: ")
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "checkpoint_000010").iterdir()) == left


@pytest.mark.parametrize("recorded", ["moved/ckpt", 123])
def test_a_complete_jobs_owed_model_whose_recorded_checkpoint_is_no_path_is_said_not_raised(
    fake: FakeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded: object
) -> None:
    """job.json's final checkpoint (edited, or a folder gone relative) made Ray Train's Checkpoint
    raise outside the guard that turns a model-logging failure into a warning: a traceback."""
    from test_identity import job

    from orchestrator.driver import data
    from orchestrator.driver.identity import claim
    from orchestrator.driver.job import RayPorts

    config = job(str(tmp_path))
    config = config.model_copy(update={"tracking": config.tracking.model_copy(update={
        "registered_model": "m", "tracking_uri": URI, "spill_dir": str(tmp_path / "spill")})})
    identity = claim(config)
    identity.mark_finished(step=10, run_id=None, model_version=None, checkpoint=recorded)
    monkeypatch.setattr(data, "input_example", lambda job: None)
    said: list[str] = []
    try:
        assert RayPorts(config, None, None, False, SimpleNamespace(status=said.append)).register_finished(identity) is None
    finally:
        identity.release()
    assert [m for m in said if "not logged" in m][0].startswith(
        "trained, but the model was not logged: its final checkpoint cannot be read (")
    assert fake.run(identity.key).status == "FINISHED"
