"""A sqlite tracking URI that names an existing file is used only when the file is an MLflow store:
MLflow adds its tables to any sqlite file it is given, so `tracking replay`, a job's
tracking_uri (or the default ./mlflow.db) pointed at an application's own database altered it. A
missing file is created, and an MLflow store is used again, as before."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from live_servers import ROOT, base_env, run_cli

from orchestrator.config import load_config, tracking_uri_problem
from orchestrator.errors import UserError
from orchestrator.tracking import replay
from orchestrator.tracking.store import Store

DIGITS = ROOT / "configs" / "digits.yaml"
REFUSED = "is an sqlite database but no MLflow store"


def _app_db(path: Path) -> Path:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
        db.execute("INSERT INTO customers VALUES (1, 'ann')")
    return path


def _spill(folder: Path) -> Path:
    """A spill file by hand: a run's open and one metric point."""
    path = folder / "spill" / "job.jsonl"
    path.parent.mkdir(exist_ok=True)
    lines = [{"op": "open", "handle": "h1", "t": 1, "experiment": "e", "run_key": "k", "run_name": "job",
              "floor_key": "train/loss", "tracking_uri": "elsewhere", "resolved": None},
             {"op": "metrics", "handle": "h1", "t": 2, "points": [["train/loss", 0.5, 2, 1]], "per_step": True}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_existing_sqlite_file_that_is_no_mlflow_store_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    app = _app_db(tmp_path / "app.db")
    text = tmp_path / "notes.db"
    text.write_text("x" * 4096)
    before = {p: _digest(p) for p in (app, text)}
    spill = _spill(tmp_path)
    for path, says in ((app, REFUSED), (text, "is no sqlite database")):
        uri = f"sqlite:///{path}"
        with pytest.raises(UserError, match=f"^tracking.tracking_uri: {path} {says}"):
            load_config(DIGITS, [f"tracking.tracking_uri={uri}"])
        with pytest.raises(UserError, match=f"^--tracking-uri: {path} {says}"):
            replay(spill, uri)
        with pytest.raises(UserError, match=f"^{path} {says}"):  # the tracker's store, opened from Python
            Store(uri, timeout_s=5)
    result = run_cli(["tracking", "replay", str(spill), "--tracking-uri", f"sqlite:///{app}"], env=base_env())
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(f"error: --tracking-uri: {app} {REFUSED}") and result.stderr.count("\n") == 1
    assert {p: _digest(p) for p in (app, text)} == before
    assert not (tmp_path / "spill" / "job.jsonl.offset").exists()


def test_the_default_store_is_checked_before_a_job_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.cli.train import check_job_files

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    job = load_config(DIGITS)
    check_job_files(job)  # no ./mlflow.db: MLflow creates it
    before = _digest(_app_db(tmp_path / "mlflow.db"))
    with pytest.raises(UserError, match=f"^tracking.tracking_uri: mlflow.db {REFUSED}"):
        check_job_files(job)
    assert _digest(tmp_path / "mlflow.db") == before


def test_a_missing_file_is_created_and_an_mlflow_store_is_used_again(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the store's artifacts (./mlruns beside it)
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    assert tracking_uri_problem(uri) is None and not db.exists()
    assert replay(_spill(tmp_path), uri).points == 1  # created, as the demo's first run does
    assert db.is_file() and tracking_uri_problem(uri) is None
    load_config(DIGITS, [f"tracking.tracking_uri={uri}"])
    again = Store(uri, timeout_s=5).open_run(experiment="e", run_key="k", run_name="job", handle="h2",
                                             floor_key="train/loss", start_ms=10)
    assert again.resumed and again.last_steps == {"train/loss": 1}  # a rerun continues the same run
    empty = tmp_path / "empty.db"
    empty.touch()  # an empty file holds nothing of anyone's: MLflow may make its store there
    assert tracking_uri_problem(f"sqlite:///{empty}") is None


def test_a_database_file_that_cannot_be_created_is_one_line_at_once(tmp_path: Path) -> None:
    # MLflow retried its "unable to open database file" for two minutes, four warning lines a try,
    # before `tracking replay` (or the job's tracker) said so
    spill = _spill(tmp_path)
    for path, says in ((tmp_path / f"{'x' * 300}.db", "File name too long"),
                       (spill / "mlflow.db", "Not a directory")):
        with pytest.raises(UserError, match=rf"^--tracking-uri: cannot create the database file .*\({says}\)$"):
            replay(spill, f"sqlite:///{path}")
    assert not (tmp_path / "spill" / "job.jsonl.offset").exists()
