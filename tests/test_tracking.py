"""The tracker with an in-memory store (tracking_fakes.py): calls never block on a stalled or
down server, the queue is bounded and spills, warnings say what waits, earlier jobs' spills are
sent first. Spill files and `tracking replay` are in test_tracking_replay.py; the same behaviours
against a real `mlflow server` in test_tracking_server.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from tracking_fakes import (  # noqa: F401 (fixtures: fake, quick, spill_dir, tracker)
    URI, FakeStore, fake, log_steps, quick, spill_dir, spill_while_down, tracker, wait_for,
)

from orchestrator.errors import UserError
from orchestrator.tracking import Tracker, default_spill_dir, replay
from orchestrator.tracking.ops import describe
from orchestrator.tracking.spill import Progress, SpillWriter, fully_sent, spill_path


def test_calls_return_while_the_store_is_stalled_and_then_everything_arrives(fake: FakeStore, tracker: Tracker,
                                                                             tmp_path: Path) -> None:
    fake.released.clear()  # the sender thread blocks inside its first request, for as long as the test wants
    run = tracker.open_run(experiment="e", run_key="k", run_name="job")
    plot = tmp_path / "scaling.png"
    plot.write_text("plot v1")
    run.log_params({"training.lr": 0.1, "tracking.password": "hunter2", "uri": "http://me:pw@host/x"})
    run.set_tags({"phase": "one"})
    run.log_artifact(plot, "plan")
    plot.write_text("plot v2")  # the copy was taken at call time
    run.log_dict({"a": 1}, "config/resolved.json")
    run.log_dataset(name="digits", uri="/data", rows=10, schema={"x": "float"})
    log_steps(run, range(50))
    run.set_tags({"phase": "two"})
    run.finish("KILLED")
    assert run.run_id is None and fake.calls == 0  # everything above returned while the store held the thread
    fake.released.set()
    report = tracker.close(timeout_s=5)
    got = fake.run("k")
    assert run.run_id == got.run_id and run.resumed is False
    assert got.steps() == list(range(50)) and [p[2] for p in got.points] == [1_000_000 + s for s in range(50)]
    assert got.params == {"training.lr": "0.1", "tracking.password": "***", "uri": "http://host/x"}
    assert got.tags["phase"] == "two" and got.status == "KILLED"
    assert got.artifacts == {"plan/scaling.png": "plot v1", "config/resolved.json": '{\n  "a": 1\n}'}
    assert got.datasets == ["digits"]
    assert report.spill_file is None and report.sent_points == 50 and not tracker.spill_file.exists()


def test_queue_is_bounded_the_oldest_spill_and_go_before_the_queue(fake: FakeStore, spill_dir: Path) -> None:
    fake.down = True
    tracker = Tracker(URI, spill_dir=spill_dir, max_queued=20)
    run = tracker.open_run(experiment="e", run_key="k", run_name="job")
    log_steps(run, range(100))
    assert tracker.queued_in_memory <= 20 and tracker.waiting == 101  # the open operation and 100 points
    assert not fully_sent(tracker.spill_file)  # the other 81 or more are there, while the job runs
    fake.down = False
    report = tracker.close(timeout_s=5)
    assert fake.run("k").steps() == list(range(100))  # once each, in the order logged: the file first
    assert report.spill_file is None
    assert any("now wait in" in w for w in report.warnings)


def test_a_run_resumed_during_an_outage_drops_steps_at_or_below_its_floor(fake: FakeStore, spill_dir: Path) -> None:
    first = Tracker(URI, spill_dir=spill_dir)
    log_steps(first.open_run(experiment="e", run_key="k", run_name="job"), range(10), value=1.0)
    first.close(timeout_s=5)
    fake.down = True
    second = Tracker(URI, spill_dir=spill_dir)
    run = second.open_run(experiment="e", run_key="k", run_name="job")
    log_steps(run, range(5, 15), value=2.0)  # resumed from a checkpoint at step 4: steps 5-9 trained again
    run.log_metrics({"restarts": 1}, step=5)  # a driver point, not per step: kept
    run.log_dict({"new": True}, "config/new.json", new_run_only=True)
    fake.down = False
    second.close(timeout_s=5)
    got = fake.run("k")
    assert run.resumed is True and run.resume_floor == 9
    assert got.steps() == list(range(15))
    assert [p[1] for p in got.points if p[0] == "train/loss"] == [1.0] * 10 + [2.0] * 5
    assert got.steps("restarts") == [5] and "config/new.json" not in got.artifacts


def test_warnings_say_the_server_is_down_with_what_waits_and_when_it_is_back(fake: FakeStore, tracker: Tracker) -> None:
    fake.down = True
    run = tracker.open_run(experiment="e", run_key="k", run_name="job")
    log_steps(run, range(3))
    wait_for(lambda: any("did not take" in w for w in tracker._warnings))
    fake.down = False
    wait_for(lambda: any("answers again" in w for w in tracker._warnings))
    drained = tracker.drain_warnings()
    assert "operations and metric points wait to be sent (retrying)" in drained[0]
    assert any("answers again: sent 4 operations and metric points" in w for w in drained)
    assert tracker.drain_warnings() == []


def test_a_sqlite_store_that_refuses_a_write_is_said_by_its_error_not_by_how_it_arose() -> None:
    # The sqlite file deleted (or made read-only) mid-run: the warning and the "model not logged"
    # line gave only SQLAlchemy's first line, a remark about autoflush, not the error.
    exc = ValueError("(raised as a result of Query-invoked autoflush; consider using a session.no_autoflush block "
                     "if this flush is occurring prematurely)\n(sqlite3.OperationalError) attempt to write a "
                     "readonly database\n[SQL: INSERT INTO metrics ...]")
    assert describe(exc) == "ValueError: (sqlite3.OperationalError) attempt to write a readonly database"


def test_a_refused_operation_is_dropped_and_the_rest_still_goes(fake: FakeStore, tracker: Tracker) -> None:
    fake.refuse.add("log_params")
    run = tracker.open_run(experiment="e", run_key="k", run_name="job")
    run.log_params({"a": 1})
    log_steps(run, range(3))
    report = tracker.close(timeout_s=5)
    assert fake.run("k").steps() == [0, 1, 2] and fake.run("k").params == {}
    assert any("params operation could not be sent" in w for w in report.warnings)


def test_the_refused_operations_of_one_request_are_one_line(fake: FakeStore, tracker: Tracker) -> None:
    # The sqlite file deleted after a run spilled: its rerun replayed the spill into a fresh store
    # and said "a metrics operation could not be sent (... Run with id=... not found); dropped" 152
    # times, once per operation of each request it split to find the refused ones.
    fake.refuse.add("log_metrics")
    run = tracker.open_run(experiment="e", run_key="k", run_name="job")
    log_steps(run, range(3))
    report = tracker.close(timeout_s=5)
    assert [w for w in report.warnings if "could not be sent" in w] == [
        "MLflow: 3 operations could not be sent (MLflow refused it: MlflowException: log_metrics refused); dropped"]


def test_a_new_tracker_sends_an_earlier_jobs_spill_before_its_own_run(fake: FakeStore, spill_dir: Path) -> None:
    spill_while_down(fake, spill_dir, "earlier", range(10))
    earlier = spill_path(spill_dir, URI, "earlier")
    tracker = Tracker(URI, spill_dir=spill_dir)
    run = tracker.open_run(experiment="e", run_key="now", run_name="job")
    assert run.wait_resolved(5)
    assert list(fake.runs.values())[0].run_key == "earlier"  # created first
    report = tracker.close(timeout_s=5)
    assert fake.run("earlier").steps() == list(range(10)) and fully_sent(earlier)
    assert report.other_replay_commands == ()


def test_a_damaged_earlier_spill_is_said_once_not_per_line(fake: FakeStore, spill_dir: Path,
                                                           caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    spill_while_down(fake, spill_dir, "earlier", range(3))
    earlier = spill_path(spill_dir, URI, "earlier")
    sent_lines, garbage = earlier.stat().st_size, b"\x00\xff garbage\n"
    with open(earlier, "ab") as f:
        f.write(garbage * 5000)
    saves: list[int] = []
    save = Progress.save
    monkeypatch.setattr(Progress, "save", lambda self, path: (saves.append(self.offset), save(self, path))[1])
    tracker = Tracker(URI, spill_dir=spill_dir)
    with caplog.at_level(logging.WARNING):
        tracker.open_run(experiment="e", run_key="now", run_name="job").finish()
        report = tracker.close(timeout_s=5)
    assert fake.run("earlier").steps() == list(range(3)) and fully_sent(earlier)
    # progress recorded once past the garbage, not once per line (5,000 renames outran the 5 s close)
    assert saves.count(earlier.stat().st_size) == 1 and len(saves) < 10, len(saves)
    said = [w for w in report.warnings if "unreadable" in w]
    assert said == [f"MLflow: {earlier}: 5000 unreadable lines were skipped (the first ends at byte "
                    f"{sent_lines + len(garbage)})"]
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 1


def test_other_servers_spills_are_left_alone(fake: FakeStore, spill_dir: Path) -> None:
    spill_while_down(fake, spill_dir, "k", range(3))
    other = Tracker("http://127.0.0.1:10/another", spill_dir=spill_dir)
    other.open_run(experiment="e", run_key="k2", run_name="job").finish()
    other.close(timeout_s=5)
    assert [r.run_key for r in fake.runs.values()] == ["k2"]


def test_spill_files_are_named_by_server_and_run_key_in_the_cache(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_spill_dir() == tmp_path / "orchestrator" / "tracking"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_spill_dir() == Path.home() / ".cache" / "orchestrator" / "tracking"
    a = spill_path(tmp_path, "http://user:secret@host:5000/", "k")
    assert a == spill_path(tmp_path, "http://host:5000", "k")  # credentials are not part of the name
    assert a != spill_path(tmp_path, "http://host:5000", "k2") and "secret" not in str(a)
    assert a.name.split("-")[0] != spill_path(tmp_path, "http://other:5000", "k").name.split("-")[0]


def test_an_unwritable_spill_dir_is_a_one_line_error_at_open(fake: FakeStore, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    tracker = Tracker(URI, spill_dir=tmp_path / "a-file" / "spill")
    with pytest.raises(UserError, match=r"^tracking.spill_dir: cannot write to .*a-file/spill"):
        tracker.open_run(experiment="e", run_key="k", run_name="job")
    tracker.close(timeout_s=0)


def test_a_spill_that_cannot_be_written_keeps_the_operations_in_memory(
    fake: FakeStore, spill_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.down = True
    tracker = Tracker(URI, spill_dir=spill_dir, max_queued=5)
    run = tracker.open_run(experiment="e", run_key="k", run_name="job")

    def disk_full(self, ops: list) -> int:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr("orchestrator.tracking.spill.SpillWriter.append", disk_full)
        log_steps(run, range(20))  # no call raises into the caller
        assert tracker.queued_in_memory == 21
    fake.down = False
    report = tracker.close(timeout_s=5)
    assert fake.run("k").steps() == list(range(20))
    assert sum("No space left on device" in w for w in report.warnings) == 1  # said once, not per call


def test_a_spill_write_that_failed_once_still_gives_the_file_its_open_line(
    fake: FakeStore, spill_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run opened while the server was up; the first spill hit a full disk, later ones went
    through and the server stayed down to the end: the file must still say which run its lines
    belong to, or a replay drops every one of them."""
    tracker = Tracker(URI, spill_dir=spill_dir, max_queued=10)
    run = tracker.open_run(experiment="e", run_key="k", run_name="job")
    assert run.wait_resolved(5)
    fake.down = True
    original, failures = SpillWriter.append, [OSError(28, "No space left on device")]

    def full_once(self: SpillWriter, ops: list) -> int:
        if failures:
            raise failures.pop()
        return original(self, ops)

    monkeypatch.setattr(SpillWriter, "append", full_once)
    log_steps(run, range(40))
    run.finish()
    report = tracker.close(timeout_s=0.2)
    assert not failures and report.spill_file is not None and report.waiting_points == 40
    fake.down = False
    result = replay(report.spill_file, URI)
    assert not result.refusals and fake.run("k").steps() == list(range(40)) and fake.run("k").status == "FINISHED"


def test_an_operation_after_close_once_the_sent_spill_file_is_gone_keeps_its_open_line(
        fake: FakeStore, spill_dir: Path) -> None:
    """The run spilled during an outage, everything went once the server was back and close removed
    the sent file; an operation after close started a new file without the open line, so no replay
    could tell its run and it was dropped ("no run is known for handle")."""
    fake.down = True
    tracker = Tracker(URI, spill_dir=spill_dir, max_queued=10)
    run = tracker.open_run(experiment="e", run_key="k", run_name="job")
    log_steps(run, range(30))
    path = spill_path(spill_dir, URI, "k")
    assert path.exists()
    fake.down = False
    run.finish()
    assert tracker.close(timeout_s=5).spill_file is None and not path.exists()
    run.set_tags({"late": "yes"})  # after close: straight to the spill file
    result = replay(path, URI)
    assert not result.refusals and result.operations == 1 and fake.run("k").tags == {"late": "yes"}
    assert fake.opens == 1  # the run as resolved, recorded in the new file's open line


def test_a_spill_writer_whose_write_failed_reopens_and_ends_the_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    writer = SpillWriter(path)
    writer.append([{"op": "tags", "handle": "h", "t": 1, "tags": {"a": "1"}}])
    with open(path, "ab") as f:
        f.write(b'{"op":"ta')  # what a full disk let through of the next write

    class Full:
        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            raise OSError(28, "No space left on device")

    writer._file = Full()  # type: ignore[assignment]
    with pytest.raises(OSError):
        writer.append([{"op": "tags", "handle": "h", "t": 2, "tags": {"a": "2"}}])
    writer.append([{"op": "tags", "handle": "h", "t": 3, "tags": {"a": "3"}}])
    writer.close()
    lines = path.read_bytes().splitlines()
    assert lines[1] == b'{"op":"ta' and json.loads(lines[2])["t"] == 3


def test_a_second_ctrl_c_while_close_waits_for_the_server_still_spills_what_waits(
    fake: FakeStore, spill_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At the end of a job during an outage close() waits up to TRACKING_CLOSE_TIMEOUT_S; a second
    Ctrl-C then (the CLI raises KeyboardInterrupt) must not lose the queue held in memory."""
    fake.down = True
    tracker = Tracker(URI, spill_dir=spill_dir, log_warnings=False)  # as the driver's: no caller shows it now
    run = tracker.open_run(experiment="e", run_key="k", run_name="job")
    log_steps(run, range(50))
    run.finish()

    def interrupted_join(timeout: float | None = None) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tracker._thread, "join", interrupted_join)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        tracker.close(timeout_s=30)
    assert tracker.queued_in_memory == 0 and tracker.spill_file is not None and tracker.spill_file.exists()
    assert any("orchestrator tracking replay" in r.getMessage() for r in caplog.records)
    fake.down = False
    replay(tracker.spill_file, URI)
    assert fake.run("k").steps() == list(range(50)) and fake.run("k").status == "FINISHED"


def test_a_complete_job_whose_owed_model_still_fails_leaves_its_run_finished(
    fake: FakeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rerun of a complete job reopens its run to log the model (which sets it RUNNING); when the
    model cannot be logged this time either, the run must end FINISHED again, not stay RUNNING."""
    from test_identity import job

    from orchestrator.driver import data, fit, registration
    from orchestrator.driver.identity import claim
    from orchestrator.driver.job import RayPorts, SilentUI

    config = job(str(tmp_path))
    config = config.model_copy(update={"tracking": config.tracking.model_copy(update={
        "registered_model": "m", "tracking_uri": URI, "spill_dir": str(tmp_path / "spill")})})
    identity = claim(config)
    first = Tracker(URI, spill_dir=tmp_path / "spill")
    run = first.open_run(experiment=config.tracking.experiment, run_key=identity.key, run_name=config.name)
    run.finish("FINISHED")
    first.close(timeout_s=5)
    identity.mark_finished(step=10, run_id=run.run_id, model_version=None, checkpoint=str(tmp_path / "ckpt"))
    identity.release()
    monkeypatch.setattr(registration, "log_model_now", lambda *args, **kwargs: None)
    monkeypatch.setattr(fit, "read_checkpoint", lambda checkpoint: {})
    monkeypatch.setattr(data, "input_example", lambda job: None)
    identity = claim(config)
    assert identity.complete and identity.model_pending
    try:
        assert RayPorts(config, None, None, False, SilentUI()).register_finished(identity) is None
    finally:
        identity.release()
    assert fake.run(identity.key).status == "FINISHED"


def test_a_tracker_whose_caller_shows_its_warnings_does_not_log_them_too(fake: FakeStore, spill_dir: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    # The driver prints drain_warnings() and the close report as status lines; the CLI's log
    # handler printed each a second time ("WARNING orchestrator.tracking.tracker: ...").
    fake.down = True
    tracker = Tracker(URI, spill_dir=spill_dir, log_warnings=False)
    with caplog.at_level(logging.WARNING):
        log_steps(tracker.open_run(experiment="e", run_key="k", run_name="job"), range(5))
        report = tracker.close(timeout_s=0.5)
    assert report.spill_file is not None and any("orchestrator tracking replay" in line for line in report.lines())
    assert not [r for r in caplog.records if r.name.startswith("orchestrator.tracking")]


def test_a_spill_held_by_a_replay_is_not_blamed_on_the_server(fake: FakeStore, spill_dir: Path) -> None:
    from orchestrator.tracking.tracker import Busy

    tracker = Tracker(URI, spill_dir=spill_dir, log_warnings=False)
    tracker._failed(Busy("/spill/x.jsonl is being sent by another process"))
    tracker._failed(ConnectionRefusedError("refused"))  # the same outage: not said again
    said = tracker.drain_warnings()
    tracker.close(timeout_s=0.5)
    assert len(said) == 1
    first = said[0]
    assert first.startswith("MLflow: /spill/x.jsonl is being sent by another process; ") and "did not take" not in first


def test_a_proxys_too_large_answer_is_a_refusal_not_retried_for_good() -> None:
    # nginx before MLflow answers an over-limit body with 413 and an HTML page; MLflow's client
    # reads that as a 500, which the tracker retried for good, every later operation stuck behind it.
    import http.server
    import threading

    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException

    from orchestrator.tracking.store import BoundedRestStore, is_refusal

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            code = 413 if self.path.endswith("/runs/log-batch") else 502
            self.send_response(code)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html><body>nope</body></html>")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store = BoundedRestStore(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=5)
        with pytest.raises(MlflowException) as too_large:
            store.log_batch("r1", metrics=[Metric("m", 1.0, 0, 0)], params=[], tags=[])
        assert is_refusal(too_large.value) and "HTTP 413 (payload too large)" in str(too_large.value)
        with pytest.raises(MlflowException) as bad_gateway:
            store.set_tag("r1", RunTag("k", "v"))
        assert not is_refusal(bad_gateway.value)  # a proxy whose server is down: retried
    finally:
        server.shutdown()
        server.server_close()



def test_a_rerun_with_a_changed_param_says_so_in_a_tag(fake: FakeStore, spill_dir: Path) -> None:
    """MLflow refuses a param's new value, so a rerun continuing the run to training.max_steps=60
    kept showing 40 (its config/resolved.json said 60): the change is a tag."""
    for max_steps in (40, 60, 60):
        tracker = Tracker(URI, spill_dir=spill_dir)
        tracker.open_run(experiment="e", run_key="k", run_name="job").log_params(
            {"training.max_steps": max_steps, "training.lr": 0.1})
        tracker.close(timeout_s=5)
        got = fake.run("k")
        assert got.params == {"training.max_steps": "40", "training.lr": "0.1"}
        assert got.tags.get("params.changed") == (None if max_steps == 40 else "training.max_steps: 40 -> 60")
