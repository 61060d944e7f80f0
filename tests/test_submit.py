"""`orchestrator submit` and `orchestrator jobs` against a real Ray head with token auth on.

One head (`ray start --head`, every port free, its own temp dir, RAY_AUTH_MODE=token) and one
`mlflow server` serve the whole module; both are stopped by process group at the end. The digits
job is submitted twice from the same config: the first runs to SUCCEEDED, the second is stopped,
and the first job's run and checkpoints must come through untouched.
"""

from __future__ import annotations

import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from live_servers import ROOT, MlflowServer, RayHead, free_port, mlflow_server, run_cli, short_tmpdir, wait_until
from mlflow.tracking import MlflowClient

from orchestrator.errors import UserError
from orchestrator.submit import build_submission

CONFIG = "configs/digits.yaml"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def head() -> Iterator[RayHead]:
    root = short_tmpdir("orch-head-")
    cluster = RayHead(root, token=secrets.token_hex(16))
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server() -> Iterator[MlflowServer]:
    with mlflow_server() as srv:
        yield srv


@dataclass
class Submitted:
    job_id: str
    stdout: str
    storage: Path
    workdir: Path


def make_project(root: Path, digits_data: Path) -> Path:
    """A project folder as a user has it: the config, and the data at its relative path."""
    shutil.copy(ROOT / CONFIG, root / "digits.yaml")
    shutil.copytree(digits_data, root / "data" / "digits")
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, digits_data: Path) -> Path:
    return make_project(tmp_path_factory.mktemp("project"), digits_data)


# ---------------------------------------------------------------------------------------------
# Packaging, without a cluster


def test_submission_packs_config_data_code_and_safe_env(
    tmp_path: Path, digits_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(make_project(project, digits_data))
    for key, value in {"MLFLOW_TRACKING_URI": "http://tracking:5000", "ORCH_JOB_POLL_S": "0.1",
                       "MLFLOW_TRACKING_PASSWORD": "hunter2", "RAY_AUTH_TOKEN": "secret-token"}.items():
        monkeypatch.setenv(key, value)
    staging = tmp_path / "staging"
    staging.mkdir()
    sub = build_submission("digits.yaml", staging=staging, overrides=["training.epochs=1"], workers=2)

    assert re.fullmatch(r"digits-cnn-[0-9a-f]{6}", sub.submission_id) and sub.job_name == sub.submission_id
    assert (staging / "digits.yaml").is_file() and list((staging / "data" / "digits").glob("*.parquet"))
    assert [Path(m).name for m in sub.runtime_env["py_modules"]] == ["orchestrator", "trainers"]
    env = sub.runtime_env["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "http://tracking:5000" and env["ORCH_JOB_POLL_S"] == "0.1"
    assert "MLFLOW_TRACKING_PASSWORD" not in env and "RAY_AUTH_TOKEN" not in env
    assert "hunter2" not in sub.entrypoint and "secret-token" not in sub.entrypoint
    assert sub.entrypoint.startswith("python -m orchestrator run digits.yaml --address auto --workers 2 ")
    assert sub.entrypoint.endswith(f"--set training.epochs=1 --set name={sub.job_name}")
    again = build_submission("digits.yaml", staging=staging)
    assert again.job_name != sub.job_name  # the same config twice: two jobs, two runs, two checkpoint dirs


def test_resume_keeps_the_job_name_under_a_new_submission_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    sub = build_submission(CONFIG, staging=tmp_path, resume="digits-cnn-0a1b2c")
    assert sub.job_name == "digits-cnn-0a1b2c"
    assert sub.submission_id.startswith("digits-cnn-0a1b2c-resume-")
    assert sub.entrypoint.endswith("--set name=digits-cnn-0a1b2c")


def test_relative_path_outside_the_project_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(UserError, match=r"^data.path: \.\./elsewhere is outside the current directory"):
        build_submission(CONFIG, staging=tmp_path, overrides=["data.path=../elsewhere"])


# ---------------------------------------------------------------------------------------------
# A real cluster


def _job_args(storage: Path, *extra: str) -> list[str]:
    return ["digits.yaml", "--set", f"checkpoint.storage_path={storage}", *extra]


def _submitted_id(stdout: str) -> str:
    match = re.search(r"^submitted (\S+) to ", stdout, re.M)
    assert match, stdout
    return match.group(1)


@pytest.fixture(scope="module")
def finished(head: RayHead, server: MlflowServer, workdir: Path) -> Submitted:
    """The digits job, submitted with --follow until it ends; its data travels in the working_dir."""
    storage = head.root / "runs"
    args = ["submit", *_job_args(storage, "--set", "training.epochs=1"), "--workers", "2",
            "--address", head.address, "--follow"]
    result = run_cli(args, env=head.env(MLFLOW_TRACKING_URI=server.uri), cwd=workdir)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return Submitted(_submitted_id(result.stdout), result.stdout, storage, workdir)


@pytest.mark.slow
def test_submit_follow_streams_logs_until_succeeded(finished: Submitted) -> None:
    assert finished.job_id.startswith("digits-cnn-")
    assert "final step: 22" in finished.stdout  # the driver's own output, streamed back


@pytest.mark.slow
def test_jobs_list_and_status_show_the_job(head: RayHead, finished: Submitted) -> None:
    listed = run_cli(["jobs", "list"], env=head.env(RAY_ADDRESS=head.address))  # address from RAY_ADDRESS
    assert listed.returncode == 0, listed.stderr
    assert re.search(rf"^{finished.job_id}\s+SUCCEEDED\s", listed.stdout, re.M), listed.stdout
    status = run_cli(["jobs", "status", finished.job_id, "--address", head.address], env=head.env())
    assert status.returncode == 0 and f"{finished.job_id}: SUCCEEDED" in status.stdout


@pytest.mark.slow
def test_submitted_run_reaches_the_tracking_server_with_proxied_artifacts(
    server: MlflowServer, finished: Submitted
) -> None:
    client = MlflowClient(server.uri)
    run = _run_named(client, finished.job_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["training.epochs"] == "1"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 23)), steps  # every step, each once
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert "config/digits.yaml" in logged, logged
    # The proxy wrote the files into the server's --artifacts-destination, not into the job's folder.
    assert list(server.artifacts.rglob("config/digits.yaml")), sorted(server.artifacts.rglob("*"))[:20]


@pytest.mark.slow
def test_second_submission_is_its_own_job_and_stop_ends_it(
    head: RayHead, server: MlflowServer, finished: Submitted
) -> None:
    client = MlflowClient(server.uri)
    first = _run_named(client, finished.job_id)
    first_points = len(client.get_metric_history(first.info.run_id, "train/loss"))
    first_checkpoints = sorted(p.name for p in (finished.storage / finished.job_id).glob("checkpoint_*"))
    assert first_checkpoints

    args = ["submit", *_job_args(finished.storage, "--set", "training.epochs=1000"),
            "--workers", "1", "--address", head.address]
    result = run_cli(args, env=head.env(MLFLOW_TRACKING_URI=server.uri), cwd=finished.workdir)
    assert result.returncode == 0, result.stderr
    second_id = _submitted_id(result.stdout)
    assert second_id != finished.job_id
    # Stop it once it has started its own MLflow run (the point where a clash would show).
    wait_until(lambda: _find_run(client, second_id) is not None, timeout_s=180, what=f"MLflow run of {second_id}")

    stopped = run_cli(["jobs", "stop", second_id, "--address", head.address], env=head.env())
    assert stopped.returncode == 0, stopped.stderr
    assert f"{second_id}: STOPPED" in stopped.stdout

    second = _find_run(client, second_id)
    assert second.info.run_id != first.info.run_id
    first_after = client.get_run(first.info.run_id)
    assert first_after.info.status == "FINISHED"
    assert len(client.get_metric_history(first.info.run_id, "train/loss")) == first_points
    assert sorted(p.name for p in (finished.storage / finished.job_id).glob("checkpoint_*")) == first_checkpoints


@pytest.mark.slow
def test_wrong_token_is_one_line_naming_the_variable(head: RayHead) -> None:
    result = run_cli(["jobs", "list", "--address", head.address], env=head.env(RAY_AUTH_TOKEN="not-the-token"))
    _assert_one_line_error(result, "rejected the token from RAY_AUTH_TOKEN")


@pytest.mark.slow
def test_missing_token_is_one_line_naming_the_variables(head: RayHead, tmp_path: Path) -> None:
    env = head.env(HOME=str(tmp_path))  # no ~/.ray/auth_token either
    env.pop("RAY_AUTH_TOKEN_PATH")
    result = run_cli(["jobs", "list", "--address", head.address], env=env)
    _assert_one_line_error(result, "requires a token; set RAY_AUTH_TOKEN")


@pytest.mark.slow
def test_unreachable_address_is_one_line(head: RayHead) -> None:
    address = f"http://127.0.0.1:{free_port()}"
    result = run_cli(["submit", CONFIG, "--address", address], env=head.env())
    _assert_one_line_error(result, f"--address {address}: cannot reach the Ray dashboard")


@pytest.mark.slow
def test_no_address_is_one_line(head: RayHead) -> None:
    result = run_cli(["jobs", "list"], env=head.env())
    _assert_one_line_error(result, "--address: no Ray cluster given")


def _assert_one_line_error(result, expected: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]


def _find_run(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name("digits")
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    return runs[0] if runs else None


def _run_named(client: MlflowClient, name: str):
    run = _find_run(client, name)
    assert run is not None, f"no MLflow run named {name}"
    return run


@pytest.mark.slow
def test_bad_resume_name_fails_before_submitting(head: RayHead) -> None:
    result = run_cli(["submit", CONFIG, "--resume", "bad name!", "--address", head.address], env=head.env())
    _assert_one_line_error(result, "name:")
