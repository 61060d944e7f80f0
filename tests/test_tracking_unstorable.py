"""Values MLflow cannot store (a lone surrogate, an integer past 64 bits, an artifact name no file
system takes), against a real sqlite store: each failed as a transient error, so the live tracker
retried it for good and every later operation waited behind it, in the job and, from its spill
file, in every later job against that server; `tracking replay` said "run the same command again".
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import yaml

from orchestrator.tracking import Tracker, replay
from tracking_fakes import URI, fake, quick  # noqa: F401 (fixtures)

OPEN = {"op": "open", "handle": "h1", "t": 1, "experiment": "e", "run_key": "k", "run_name": "job",
        "floor_key": "train/loss", "tracking_uri": "elsewhere", "resolved": None}


def _point(step: int, *, stamp: int = 2, t: float = 2) -> dict:
    return {"op": "metrics", "handle": "h1", "t": t, "points": [["train/loss", 0.5, stamp, step]], "per_step": True}


def _rows(db: Path, query: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(query).fetchall()


def test_a_spill_line_mlflow_cannot_store_is_skipped_and_the_lines_after_it_are_sent(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the store's artifacts (./mlruns beside it)
    lines = [json.dumps(OPEN), json.dumps(_point(1)), json.dumps(_point(2, stamp=10**30)),
             json.dumps(_point(2**63)), json.dumps(_point(2, t=float("nan"))),
             '{"op":"tags","handle":"h1","t":3,"tags":{"note":"\\ud800"}}',
             json.dumps({"op": "text", "handle": "h1", "t": 3, "text": "x", "name": "a/" + "b" * 300}),
             json.dumps(_point(3)), json.dumps({"op": "finish", "handle": "h1", "t": 10**30, "status": "FAILED"}),
             json.dumps({"op": "finish", "handle": "h1", "t": 4, "status": "FINISHED"})]
    spill = tmp_path / "job.jsonl"
    spill.write_text("\n".join(lines) + "\n")
    db = tmp_path / "mlflow.db"
    result = replay(spill, f"sqlite:///{db}")
    assert (result.points, result.unreadable) == (2, 5)
    assert [r for r in result.refusals if "at most 255 bytes" in r] and len(result.refusals) == 1
    assert replay(spill, f"sqlite:///{db}").points == 0  # all of it taken: nothing is left to retry
    assert sorted(_rows(db, "SELECT step FROM metrics")) == [(1,), (3,)]
    assert _rows(db, "SELECT status FROM runs") == [("FINISHED",)]


def test_a_config_value_that_is_no_utf8_is_logged_escaped_and_holds_nothing_up(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    tracker = Tracker(f"sqlite:///{db}", spill_dir=tmp_path / "spill")
    try:
        run = tracker.open_run(experiment="e", run_key="k", run_name="job")
        lone = yaml.safe_load('"\\udcff"')  # YAML makes one; so does a path's undecodable byte
        run.log_params({"data": f"/data/{lone}.parquet"})
        run.set_tags({"note": lone})
        run.log_metrics({"train/loss": 0.5}, step=1)
        run.finish("FINISHED")
    finally:
        report = tracker.close(timeout_s=60)
    assert (report.waiting_points, report.waiting_operations, report.spill_file) == (0, 0, None)
    assert _rows(db, "SELECT key, value FROM params") == [("data", "/data/\\udcff.parquet")]
    assert ("note", "\\udcff") in _rows(db, "SELECT key, value FROM tags")


def test_a_spill_lines_run_key_that_would_break_the_search_filter_is_skipped(tmp_path: Path, monkeypatch) -> None:
    """A quote in it made MLflow refuse the run's lookup: the replay stopped there, for good, and the
    file's other runs were never sent."""
    monkeypatch.chdir(tmp_path)
    planted = {**OPEN, "handle": "h0", "run_key": "k' AND tags.x = 'y"}
    lines = [planted, {**_point(1), "handle": "h0"}, OPEN, _point(1)]
    spill = tmp_path / "job.jsonl"
    spill.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = replay(spill, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert (result.points, result.unreadable) == (1, 1)
    assert [r for r in result.refusals if "no run is known for handle h0" in r] and len(result.refusals) == 1


def test_a_step_past_64_bits_logged_live_is_left_out_and_holds_nothing_up(tmp_path: Path) -> None:
    """The read-back side skipped such a line, but the live tracker sent it: MLflow failed the request,
    retried for good, and every later point and the run's status waited behind it in the spill file."""
    db = tmp_path / "mlflow.db"
    tracker = Tracker(f"sqlite:///{db}", spill_dir=tmp_path / "spill")
    try:
        run = tracker.open_run(experiment="e", run_key="k", run_name="job")
        run.log_metrics({"train/loss": 0.5}, step=2**63)
        run.log_metrics({"train/loss": 0.5}, step=2, timestamp_ms=float("inf"))
        run.log_metrics({"train/loss": 0.5}, step=1)
        run.finish("FINISHED")
    finally:
        report = tracker.close(timeout_s=60)
    assert (report.waiting_points, report.waiting_operations, report.spill_file) == (0, 0, None)
    assert _rows(db, "SELECT step FROM metrics") == [(1,)]
    assert _rows(db, "SELECT status FROM runs") == [("FINISHED",)]


def test_an_artifact_name_that_is_no_utf8_is_spilled_as_a_line_the_replay_reads(tmp_path: Path, fake) -> None:
    """A config file's name with an undecodable byte (the run logs it as config/<name>): the tracker
    wrote its text and artifact lines with the lone surrogate, which the read-back side skipped as
    unreadable, so what waited in the spill file was never sent."""
    lone = yaml.safe_load('"\\udcff"')
    source = tmp_path / f"cfg{lone}.yaml"
    source.write_text("a: 1\n")
    fake.down = True
    tracker = Tracker(URI, spill_dir=tmp_path / "spill")
    try:
        run = tracker.open_run(experiment="e", run_key="k", run_name="job")
        run.log_text("a: 1\n", f"config/{source.name}")
        run.log_artifact(source, f"more{lone}")
    finally:
        report = tracker.close(timeout_s=0.2)
    fake.down = False
    result = replay(report.spill_file, URI)
    assert (result.unreadable, result.operations) == (0, 3)
    assert sorted(fake.run("k").artifacts) == ["config/cfg\\udcff.yaml", "more\\udcff/cfg\\udcff.yaml"]
