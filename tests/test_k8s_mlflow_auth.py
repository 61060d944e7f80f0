"""MLflow as deploy/k8s runs it, for real on 127.0.0.1: `mlflow server --app-name basic-auth` with
the deployment's basic_auth.ini (its database URI pointed at a temporary sqlite file instead of
PostgreSQL) after the init container's setup_auth.py. Nobody writes without signing in, the jobs'
user writes its own runs but cannot touch the admin's, and a changed Secret changes the password.

The auth app needs Flask-WTF (MLflow's [auth] extra, installed in the server image and in the
project's dev extras).
"""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_servers import BIN, base_env, free_port, http_ok, short_tmpdir, start, stop, wait_until

ROOT = Path(__file__).resolve().parents[1]
TRACKING = ROOT / "deploy" / "k8s" / "base" / "tracking"
ADMIN, ADMIN_PASSWORD = "admin", "admin-Pa55word-for-tests"
JOBS, JOBS_PASSWORD = "ray-jobs", "jobs-Pa55word-for-tests"


def server_env(root: Path, **extra: str) -> dict[str, str]:
    ini = (TRACKING / "basic_auth.ini").read_text()
    assert "database_uri = postgresql://" in ini
    config = root / "basic_auth.ini"
    config.write_text(ini.replace(ini.split("database_uri = ")[1].split("\n")[0], f"sqlite:///{root / 'auth.db'}"))
    return base_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_AUTH_CONFIG_PATH=str(config),
                    MLFLOW_AUTH_ADMIN_USERNAME=ADMIN, MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD,
                    MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret-key", **extra)


def setup_users(root: Path, password: str) -> subprocess.CompletedProcess:
    env = server_env(root, MLFLOW_TRACKING_USERNAME=JOBS, MLFLOW_TRACKING_PASSWORD=password)
    return subprocess.run([str(BIN / "python"), str(TRACKING / "setup_auth.py")], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Path]]:
    root = short_tmpdir("orch-mlflow-auth-")
    first = setup_users(root, JOBS_PASSWORD)
    assert first.returncode == 0 and f"MLflow user {JOBS}: created" in first.stdout, first.stderr[-2000:]
    port = free_port()
    args = [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = start(args, log=root / "server.log", env=server_env(root), cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{uri}/health"), timeout_s=90, what="mlflow basic-auth server", log=root / "server.log")
        yield uri, root
    finally:
        stop(proc)


def call(uri: str, endpoint: str, body: dict, user: tuple[str, str] | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(user).encode()).decode()
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def test_nobody_writes_without_signing_in(server: tuple[str, Path]) -> None:
    uri, _ = server
    assert call(uri, "experiments/create", {"name": "anonymous"})[0] == 401
    assert call(uri, "experiments/create", {"name": "guessing"}, (JOBS, "wrong"))[0] == 401
    assert call(uri, "experiments/create", {"name": "guessing"}, (ADMIN, "admin"))[0] == 401


def test_the_jobs_user_writes_its_own_runs_but_not_the_admins(server: tuple[str, Path]) -> None:
    uri, _ = server
    jobs, admin = (JOBS, JOBS_PASSWORD), (ADMIN, ADMIN_PASSWORD)
    status, created = call(uri, "experiments/create", {"name": "digits"}, jobs)
    assert status == 200
    status, run = call(uri, "runs/create", {"experiment_id": created["experiment_id"]}, jobs)
    assert status == 200
    assert call(uri, "runs/log-metric", {"run_id": run["run"]["info"]["run_id"], "key": "loss", "value": 0.5,
                                          "timestamp": 0, "step": 1}, jobs)[0] == 200
    status, theirs = call(uri, "experiments/create", {"name": "production"}, admin)
    assert status == 200
    assert call(uri, "experiments/delete", {"experiment_id": theirs["experiment_id"]}, jobs)[0] == 403
    assert call(uri, "runs/create", {"experiment_id": theirs["experiment_id"]}, jobs)[0] == 403
    assert call(uri, "registered-models/create", {"name": "prod-model"}, admin)[0] == 200
    assert call(uri, "registered-models/rename", {"name": "prod-model", "new_name": "x"}, jobs)[0] == 403


def test_a_new_secret_replaces_the_jobs_password(server: tuple[str, Path]) -> None:
    uri, root = server
    again = setup_users(root, "rotated-Pa55word")
    assert again.returncode == 0 and "updated (password)" in again.stdout, again.stderr[-2000:]
    assert call(uri, "experiments/search", {"max_results": 1}, (JOBS, JOBS_PASSWORD))[0] == 401
    assert call(uri, "experiments/search", {"max_results": 1}, (JOBS, "rotated-Pa55word"))[0] == 200
