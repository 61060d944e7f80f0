"""`orchestrator submit` and `orchestrator jobs` against a real Ray head with token auth on.

One head and one `mlflow server` serve the whole module; both are stopped by process group at the
end. The head is started by the commands of docs/cluster-jobs.md ("Starting a head for
`orchestrator submit`") as written, from `.venv/bin/ray` with the venv NOT on PATH (the case where
a job used to run under the system Python), and the doc's first job is submitted as written. A
second job from the same config is stopped, and the first job's run and checkpoints must come
through untouched; two more fail on purpose (no usable Python; data missing on the head) and
must say so in their exit codes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import psutil
from live_servers import (BIN, ROOT, MlflowServer, RayHead, doc_blocks, free_port, is_loopback, listeners, make_project,
                          mlflow_server, run_cli, shell_lines, short_tmpdir, wait_until)
from mlflow.tracking import MlflowClient

CONFIG = "configs/digits.yaml"
DOC = ROOT / "docs" / "cluster-jobs.md"
SECTION = "## Starting a head for `orchestrator submit`"
PASSWORD = "pw-" + secrets.token_hex(4)  # in the submitting shell's tracking URI; must never reach the cluster
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[RayHead, MlflowServer]]:
    """The head, started as the doc says, and the tracking server, side by side (each takes ~20 s)."""
    root = short_tmpdir("orch-head-")
    cluster = RayHead(root, token="")
    # The pool exits first and so waits for the server to have started (or failed) before the
    # stack stops whatever did start.
    with ExitStack() as stack, ThreadPoolExecutor(max_workers=1) as pool:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        stack.callback(cluster.stop)
        tracking = pool.submit(stack.enter_context, mlflow_server())
        cluster.start_documented(doc_blocks(DOC, SECTION)[0])
        yield cluster, tracking.result()


@pytest.fixture(scope="module")
def head(servers: tuple[RayHead, MlflowServer]) -> RayHead:
    return servers[0]


@pytest.fixture(scope="module")
def server(servers: tuple[RayHead, MlflowServer]) -> MlflowServer:
    return servers[1]


@dataclass
class Submitted:
    job_id: str
    stdout: str
    stderr: str
    storage: Path
    listed: str


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, digits_data: Path) -> Path:
    return make_project(tmp_path_factory.mktemp("project"), digits_data)


# ---------------------------------------------------------------------------------------------
# A real cluster


def _job_args(storage: Path, *extra: str) -> list[str]:
    return ["digits.yaml", "--set", f"checkpoint.storage_path={storage}", *extra]


def _submitted_id(stdout: str) -> str:
    match = re.search(r"^submitted (\S+) to ", stdout, re.M)
    assert match, stdout
    return match.group(1)


def _run_documented(block: str, head: RayHead, env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """Each command of a doc block as written, in bash, after the block's exports; only the
    documented dashboard port is replaced by this head's."""
    script = shell_lines(block).replace("127.0.0.1:8265", head.address.removeprefix("http://"))
    lines = [line for line in script.splitlines() if line.strip() and not line.startswith("#")]
    exports = [line for line in lines if line.startswith("export ")]
    return [subprocess.run(["bash", "-ec", "\n".join([*exports, line])], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
            for line in lines if not line.startswith("export ")]


@pytest.fixture(scope="module")
def finished(head: RayHead, server: MlflowServer) -> Submitted:
    """The doc's first job and `jobs list`, as written, from a shell whose tracking URI carries a password."""
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{server.port}"
    submitted, listed = _run_documented(doc_blocks(DOC, SECTION)[1], head, head.env(MLFLOW_TRACKING_URI=uri))
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    assert (listed.returncode, listed.stderr) == (0, "")  # no warning from Ray or MLflow on a `jobs` call
    return Submitted(_submitted_id(submitted.stdout), submitted.stdout, submitted.stderr,
                     head.root / "orchestrator-runs", listed.stdout)


@pytest.mark.slow
def test_documented_job_runs_under_rays_python_and_says_succeeded(finished: Submitted) -> None:
    assert finished.job_id.startswith("digits-cnn-")
    # The head's shell has no venv on PATH; its python3 lacks Ray. The job found Ray's own Python.
    assert f"orchestrator: running the job under {BIN}/python" in finished.stdout, finished.stdout[:3000]
    assert "final step: 20" in finished.stdout  # the driver's own output, streamed back
    *notes, last = finished.stderr.strip().splitlines()
    assert last == f"job {finished.job_id}: SUCCEEDED; exit code 0"
    assert all(line.startswith("note: ") for line in notes), notes  # nothing else on stderr
    assert re.search(rf"^{finished.job_id}\s+SUCCEEDED\s", finished.listed, re.M), finished.listed


@pytest.mark.slow
def test_tracking_password_never_reaches_the_cluster(head: RayHead, server: MlflowServer, finished: Submitted) -> None:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})
    info = client.get_job_info(finished.job_id)
    shipped = json.dumps({"runtime_env": info.runtime_env, "entrypoint": info.entrypoint, "metadata": info.metadata})
    assert info.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == server.uri
    assert PASSWORD not in shipped and PASSWORD not in client.get_job_logs(finished.job_id)
    assert "credentials in a URI are not shipped" in finished.stderr
    assert PASSWORD not in finished.stdout + finished.stderr


@pytest.mark.slow
def test_jobs_list_and_status_show_the_job(head: RayHead, finished: Submitted) -> None:
    listed = run_cli(["jobs", "list"], env=head.env(RAY_ADDRESS=head.address))  # address from RAY_ADDRESS
    assert (listed.returncode, listed.stderr) == (0, "")  # no warning from Ray or MLflow on a `jobs` call
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
    assert run.data.params["training.max_steps"] == "20"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 21)), steps  # every step, each once
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert "config/digits.yaml" in logged, logged
    # The proxy wrote the files into the server's --artifacts-destination, not into the job's folder.
    assert list(server.artifacts.rglob("config/digits.yaml")), sorted(server.artifacts.rglob("*"))[:20]


@pytest.mark.slow
def test_second_submission_is_its_own_job_and_stop_ends_it(
    head: RayHead, server: MlflowServer, finished: Submitted, workdir: Path
) -> None:
    client = MlflowClient(server.uri)
    first = _run_named(client, finished.job_id)
    first_points = len(client.get_metric_history(first.info.run_id, "train/loss"))
    first_checkpoints = sorted(p.name for p in (finished.storage / finished.job_id).glob("checkpoint_*"))
    assert first_checkpoints

    args = ["submit", *_job_args(finished.storage, "--set", "training.epochs=1000", "--set", "resources.profile=false"),
            "--workers", "1", "--address", head.address]
    result = run_cli(args, env=head.env(MLFLOW_TRACKING_URI=server.uri), cwd=workdir)
    assert result.returncode == 0, result.stderr
    second_id = _submitted_id(result.stdout)
    assert second_id != finished.job_id
    # Stop it once it has started its own MLflow run (the point where a clash would show).
    wait_until(lambda: _find_run(client, second_id) is not None, timeout_s=180, what=f"MLflow run of {second_id}")

    stopped = run_cli(["jobs", "stop", second_id, "--address", head.address], env=head.env())
    assert stopped.returncode == 0, stopped.stderr
    assert f"{second_id}: STOPPED" in stopped.stdout
    followed = run_cli(["jobs", "logs", second_id, "--follow", "--address", head.address], env=head.env())
    assert followed.returncode == 3, followed.stderr
    assert re.search(rf"^job {second_id}: STOPPED( \(.*\))?; exit code 3$", followed.stderr, re.M), followed.stderr
    # the command that resumes it goes to the same cluster (--address as given, never its credentials)
    assert (f"resume with: orchestrator submit digits.yaml --resume {second_id} --address {head.address} "
            "--workers 1") in followed.stdout

    second = _find_run(client, second_id)
    assert second.info.run_id != first.info.run_id
    first_after = client.get_run(first.info.run_id)
    assert first_after.info.status == "FINISHED"
    assert len(client.get_metric_history(first.info.run_id, "train/loss")) == first_points
    assert sorted(p.name for p in (finished.storage / finished.job_id).glob("checkpoint_*")) == first_checkpoints


@pytest.mark.slow
def test_job_without_a_usable_python_fails_in_one_line_and_follow_exits_1(head: RayHead, workdir: Path) -> None:
    env = head.env(ORCH_PYTHON="/nonexistent/python")  # ORCH_* travels with the job
    result = run_cli(["submit", "digits.yaml", "--address", head.address, "--follow"], env=env, cwd=workdir)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error: no Python on this node can run the job (/nonexistent/python: not found)" in result.stdout
    assert re.search(r"^job \S+: FAILED \(.*\); exit code 1$", result.stderr.strip().splitlines()[-1]), result.stderr


@pytest.mark.slow
def test_job_whose_data_is_missing_on_the_head_fails_and_follow_exits_1(head: RayHead, workdir: Path) -> None:
    # An absolute path is not shipped: the head must have it, and this one does not.
    args = ["submit", "digits.yaml", "--set", "data.dataset=null", "--set", "data.path=/nonexistent/digits",
            "--workers", "1", "--address", head.address, "--follow"]
    result = run_cli(args, env=head.env(), cwd=workdir)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"^error: data\.path: .*/nonexistent/digits", result.stdout, re.M), result.stdout[-3000:]
    assert "Traceback" not in result.stdout
    assert re.search(r"^job \S+: FAILED \(.*\); exit code 1$", result.stderr.strip().splitlines()[-1]), result.stderr


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
    assert "~/.ray/auth_token is read" in result.stderr  # where a token taken from the head goes
    (tmp_path / "token").write_text("\n")  # a token file written empty: said, not taken for no file
    result = run_cli(["jobs", "list", "--address", head.address], env={**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")})
    _assert_one_line_error(result, f"requires a token (RAY_AUTH_TOKEN_PATH ({tmp_path / 'token'}, an empty file)); set")


@pytest.mark.slow
def test_unreachable_address_is_one_line(head: RayHead) -> None:
    address = f"http://127.0.0.1:{free_port()}"
    result = run_cli(["submit", CONFIG, "--address", address], env=head.env())
    _assert_one_line_error(result, f"--address {address}: cannot reach the Ray dashboard")


@pytest.mark.slow
def test_the_documented_head_listens_on_loopback_only(head: RayHead) -> None:
    """Every server of the head started as docs/cluster-jobs.md says (GCS, raylet, dashboard, its
    agents, the client server) listens on 127.0.0.1: a neighbour on the network reaches none."""
    assert head.proc is not None
    seen = listeners([p for p in psutil.process_iter() if _group(p) == head.proc.pid])  # `ray start`'s daemons
    names = set(seen.values())
    assert {"gcs_server", "raylet"} <= names, f"the head's servers were never seen listening: {seen}"
    exposed = {addr: name for addr, name in seen.items() if not is_loopback(addr[0])}
    assert not exposed, f"listening off loopback: {exposed}"


def _group(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except OSError:
        return None


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
    _assert_one_line_error(result, "--resume: must use only letters")


def test_resuming_a_name_the_cluster_never_ran_says_so() -> None:
    # A typo in --resume NAME trained a new job from step 0 without a word.
    from types import SimpleNamespace

    from orchestrator.ray_jobs import JOB_KEY
    from orchestrator.submit import _unknown_resume

    jobs = SimpleNamespace(list=lambda: [SimpleNamespace(metadata={JOB_KEY: "digits-cnn-1a2b3c"}),
                                         SimpleNamespace(metadata=None)])
    assert _unknown_resume(jobs, None) == () and _unknown_resume(jobs, "digits-cnn-1a2b3c") == ()
    (note,) = _unknown_resume(jobs, "digits-cnn-1a2b3d")
    assert note.startswith("--resume digits-cnn-1a2b3d: no job of that name was submitted to this cluster")
