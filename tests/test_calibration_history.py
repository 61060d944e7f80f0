"""`orchestrator calibrate --experiment` reads an MLflow history and writes nothing there: a sqlite
URI that names no MLflow database is one line (MLflow created a missing one, added its ~60 tables to
any other sqlite file, and retried a folder for minutes); every page of runs is read (one search
returned the newest 1,000); a run whose artifact cannot be read (a link, a FIFO) is left out alone
(it stopped the whole history, naming no run)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.calibrations import _runs, history
from orchestrator.errors import UserError
from orchestrator.planner import OBSERVATIONS_ARTIFACT, ClusterSpec, save_observations
from test_planner_cli import _observations

SPEC = ClusterSpec(nodes=2, gpus_per_node=2, intra_node_GBps=16, inter_node_GBps=1.25)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_sqlite_uri_that_names_no_mlflow_database_is_one_line_and_nothing_is_written(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    (tmp_path / "text.db").write_text("x" * 4096)
    (tmp_path / "folder.db").mkdir()
    (tmp_path / "empty.db").touch()  # an empty database: no history to read, and nothing to create
    cases = {"missing.db": "no MLflow database at", "folder.db": "(a folder)", "text.db": "is no sqlite database",
             "other.db": "is an sqlite database but no MLflow store \\(it lacks MLflow.s tables alembic_version, "
                         "experiments, runs\\)", "empty.db": "lacks MLflow.s tables"}
    before = {p.name: _digest(p) for p in tmp_path.iterdir() if p.is_file()}
    for name, says in cases.items():
        with pytest.raises(UserError, match=rf"^--tracking-uri sqlite:///{tmp_path}/{name}: .*{says}"):
            history("jobs", f"sqlite:///{tmp_path / name}", SPEC)
    assert {p.name: _digest(p) for p in tmp_path.iterdir() if p.is_file()} == before
    assert not (tmp_path / "missing.db").exists()


def test_a_store_mlflow_refuses_to_open_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # MlflowClient itself refuses a folder (its file store, in maintenance since MLflow 3.7): it was
    # made outside the try that makes MLflow's errors one line, and calibrate --experiment ended in a traceback
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(UserError, match=rf"^--tracking-uri {tmp_path}/mlruns: could not read the experiment's runs "
                                        r"\(The filesystem tracking backend"):
        history("jobs", str(tmp_path / "mlruns"), SPEC)


class _Page(list):
    """MLflow's PagedList: a list with the next page's token."""

    def __init__(self, items: list, token: str | None) -> None:
        super().__init__(items)
        self.token = token


def test_every_page_of_runs_is_read() -> None:
    total = 2_345

    class Pages:
        def search_runs(self, ids: list[str], *, order_by: list[str], max_results: int, page_token: str | None):
            start = int(page_token or 0)
            end = min(start + max_results, total)
            return _Page([SimpleNamespace(n=n) for n in range(start, end)], str(end) if end < total else None)

    assert [r.n for r in _runs(Pages(), "1")] == list(range(total))


def test_a_run_whose_artifact_cannot_be_read_is_left_out_alone(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("jobs", artifact_location=(tmp_path / "artifacts").as_uri())
    runs = []
    for i, obs in enumerate((_observations()[:5], _observations()[5:], _observations()[:3])):
        runs.append(run := client.create_run(experiment).info.run_id)
        path = save_observations(obs, tmp_path / f"run{i}" / "observations.json")
        client.log_artifact(run, str(path), OBSERVATIONS_ARTIFACT.rsplit("/", 1)[0])
    logged = tmp_path / "artifacts" / runs[2] / "artifacts" / OBSERVATIONS_ARTIFACT
    logged.unlink()
    os.mkfifo(logged)  # reading it would block: never opened as a file
    found = history("jobs", uri, SPEC)
    assert (len(found.observations), found.runs, found.left_out) == (9, 2, {"unreadable artifacts": 1})
    client.delete_experiment(experiment)
    with pytest.raises(UserError, match=r"^--experiment: 'jobs' is deleted at sqlite:///.*; restore it"):
        history("jobs", uri, SPEC)


def test_an_experiment_whose_runs_logged_no_observations_says_so(tmp_path: Path) -> None:
    """Runs shorter than a worker group's first observation log the cluster but no observations:
    calibrate said `no run logged the cluster it ran on; give --cluster FILE`, and with --cluster,
    `no observations; give --observations FILE or --experiment NAME` (the experiment was given)."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from orchestrator.calibrations import CLUSTER_ARTIFACT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("short", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment).info.run_id
    SPEC.save(tmp_path / "cluster.json")
    client.log_artifact(run, str(tmp_path / "cluster.json"), CLUSTER_ARTIFACT.rsplit("/", 1)[0])
    SPEC.save(tmp_path / "cluster.yaml")
    for extra in ([], ["--cluster", "cluster.yaml"]):
        proc = subprocess.run([sys.executable, "-m", "orchestrator", "calibrate", "--experiment", "short",
                               "--tracking-uri", uri, *extra], capture_output=True, text=True, cwd=tmp_path,
                              timeout=120)
        assert proc.returncode == 2 and proc.stderr == (
            f"error: --experiment short: no run of it logged observations ({OBSERVATIONS_ARTIFACT}: a worker group "
            "logs them once it has trained 25 steps); train longer, or give --observations FILE\n"), proc.stderr
        assert proc.stdout == f"short: 0 observations from 0 run(s){' on the cluster given' if extra else ''}\n"
    assert not (tmp_path / "cluster.calibrated.yaml").exists()


def test_a_run_with_a_malformed_observations_artifact_is_named_by_run_and_artifact(caplog) -> None:
    # The warning named the download in a temporary folder gone by the time it was read
    # ("run r: /tmp/tmpab12/r/plan/observations.json: ..."), not the run's artifact.
    import json

    from orchestrator.calibrations import _history

    good = json.dumps([o.to_dict() for o in _observations()[:4]])
    nan = json.loads(good)
    nan[1]["step_time_s"] = float("nan")
    logged = {"good": good, "nan": json.dumps(nan), "scalar": "42"}

    class Client:
        tracking_uri = "sqlite:///mlflow.db"

        def get_experiment_by_name(self, name: str):
            return SimpleNamespace(experiment_id="1", lifecycle_stage="active")

        def search_runs(self, ids: list[str], **_: object):
            return _Page([SimpleNamespace(info=SimpleNamespace(run_id=r)) for r in logged], None)

        def list_artifacts(self, run_id: str, folder: str):
            return [SimpleNamespace(path=OBSERVATIONS_ARTIFACT)]

        def download_artifacts(self, run_id: str, path: str, dst: str) -> str:
            (Path(dst) / path).parent.mkdir(parents=True, exist_ok=True)
            (Path(dst) / path).write_text(logged[run_id])
            return str(Path(dst) / path)

    found = _history(Client(), "jobs", SPEC)
    assert (len(found.observations), found.runs, found.left_out) == (4, 1, {"unreadable artifacts": 2})
    assert [r.getMessage() for r in caplog.records] == [
        f"run nan: {OBSERVATIONS_ARTIFACT}: observations[1].step_time_s: must be finite, got nan",
        f"run scalar: {OBSERVATIONS_ARTIFACT}: observations[0]: expected a mapping, got int"]


@pytest.mark.parametrize("token", [True, False])
def test_runs_whose_artifacts_live_on_another_host_are_not_read_with_the_credentials(
        token: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow's client sends MLFLOW_TRACKING_TOKEN (or the basic-auth pair) with every HTTP artifact
    # request, to whatever host the run's artifact location names: anyone allowed to create an
    # experiment could collect them through `orchestrator calibrate --experiment`.
    import json

    from orchestrator.calibrations import _history

    for name in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    if token:
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "s3cret")
    locations = {"own": "mlflow-artifacts:/1/own/artifacts", "s3": "s3://bucket/1/s3/artifacts",
                 "http": "http://evil.example/artifacts", "proxied": "mlflow-artifacts://evil.example:5000/1/x",
                 "same": "http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/1/same"}
    listed: list[str] = []
    logged = json.dumps([o.to_dict() for o in _observations()[:2]])

    class Client:
        tracking_uri = "http://127.0.0.1:5000"

        def get_experiment_by_name(self, name: str):
            return SimpleNamespace(experiment_id="1", lifecycle_stage="active")

        def search_runs(self, ids: list[str], **_: object):
            return _Page([SimpleNamespace(info=SimpleNamespace(run_id=r, artifact_uri=u)) for r, u in locations.items()],
                         None)

        def list_artifacts(self, run_id: str, folder: str):
            listed.append(run_id)
            return [SimpleNamespace(path=OBSERVATIONS_ARTIFACT)]

        def download_artifacts(self, run_id: str, path: str, dst: str) -> str:
            (Path(dst) / path).parent.mkdir(parents=True, exist_ok=True)
            (Path(dst) / path).write_text(logged)
            return str(Path(dst) / path)

    found = _history(Client(), "jobs", SPEC, "http://127.0.0.1:5000")
    if token:
        assert listed == ["own", "s3", "same"] and found.runs == 3
        assert found.left_out == {"artifacts on a host other than the tracking server's (not sent its credentials)": 2}
    else:  # no credentials to hand over: every run is read
        assert listed == list(locations) and found.runs == 5 and not found.left_out


def test_a_tracking_uri_with_an_at_sign_in_its_path_is_read_from_the_host_urllib_reads() -> None:
    # `http://h:5000/p@x` has a path holding '@': the client was made from the URI as shown, masked
    # (`http://***@x`), and asked host `x`. Messages still show it masked.
    from test_tracking_credentials import _stub

    answer = {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such experiment"}
    with _stub(lambda path: answer, status=404) as (host, seen), \
            pytest.raises(UserError, match=r"^--experiment: no MLflow experiment named 'jobs' at http://\*\*\*@x$"):
        history("jobs", f"http://{host}/p@x")
    assert [path.split("?")[0] for _, path, _ in seen] == ["/p@x/api/2.0/mlflow/experiments/get-by-name"]
