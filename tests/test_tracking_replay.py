"""Spill files and `tracking replay` with an in-memory store (tracking_fakes.py): each line is
sent once however often replay runs, a torn last line waits while a writer has the file open (and
is ended once none has), unreadable lines are skipped and said once. The tracker itself is in test_tracking.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tracking_fakes import URI, FakeStore, fake, quick, spill_dir, spill_while_down  # noqa: F401 (fixtures)

from orchestrator.errors import UserError
from orchestrator.tracking import replay, store
from orchestrator.tracking.spill import SpillWriter, fully_sent, send_file, spill_path
from orchestrator.tracking.writer import Writer


def test_close_spills_and_replay_sends_each_line_once_however_often_it_runs(fake: FakeStore, spill_dir: Path) -> None:
    report = spill_while_down(fake, spill_dir, "k", range(30))
    path = spill_path(spill_dir, URI, "k")
    assert report.spill_file == path and (report.waiting_points, report.waiting_operations) == (30, 3)
    assert report.replay_command == f"orchestrator tracking replay {path} --tracking-uri {URI}"
    assert fake.runs == {}

    fake.down, calls = True, fake.calls
    with pytest.raises(UserError, match="run the same command again"):
        replay(path, URI)
    fake.down = False
    result = replay(path, URI)
    assert (result.points, result.operations) == (30, 3) and not result.incomplete
    assert replay(path, URI).points == 0  # twice in a row: nothing sent again
    assert fake.opens == 1 and fake.run("k").steps() == list(range(30)) and fake.run("k").status == "FINISHED"
    assert fake.calls > calls


def test_replay_that_died_halfway_resends_at_most_one_batch_and_creates_one_run(fake: FakeStore,
                                                                               spill_dir: Path) -> None:
    spill_while_down(fake, spill_dir, "k", range(2500))  # three batches of points after the open
    path = spill_path(spill_dir, URI, "k")
    writer = Writer(fake)
    original = fake.log_metrics

    def stored_but_no_answer(run_id: str, points: list) -> None:
        original(run_id, points)
        raise ConnectionError("the replay dies here")

    fake.log_metrics = stored_but_no_answer  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        send_file(path, writer)
    fake.log_metrics = original  # type: ignore[method-assign]
    result = replay(path, URI)  # a new process: the run comes from the progress record, not a second create
    assert fake.opens == 1 and fake.run("k").steps() == list(range(2500))
    assert result.points == 2500  # the first batch again (MLflow kept one copy), then the rest


def _point_line(path: Path, step: int) -> bytes:
    handle = path.read_text().split('"handle":"')[1].split('"')[0]
    return (b'{"op":"metrics","handle":"%s","t":1,"points":[["train/loss",0.5,2000000,%d]],"per_step":true}\n'
            % (handle.encode(), step))


def test_the_rest_of_a_file_goes_where_its_start_went(fake: FakeStore, spill_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A replay that died halfway, run again with another server: the recorded runs are not that
    server's, so every later line was refused and dropped, and the file taken for sent (1,500
    points and the run's status in neither store). Now it is one line naming both; nothing moves."""
    spill_while_down(fake, spill_dir, "k", range(2500))
    path = spill_path(spill_dir, URI, "k")
    other = FakeStore("http://127.0.0.1:9/other")
    monkeypatch.setattr(store, "Store", lambda uri, *, timeout_s: other if uri == other.tracking_uri else fake)
    original, batches = fake.log_metrics, []

    def first_batch_then_gone(run_id: str, points: list) -> None:
        if batches:
            raise ConnectionError("the server is gone")
        batches.append(original(run_id, points))

    fake.log_metrics = first_batch_then_gone  # type: ignore[method-assign]
    with pytest.raises(UserError, match="run the same command again"):
        replay(path, URI)
    offset = path.with_name(path.name + ".offset")
    recorded = offset.read_bytes()
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: its first \d+ bytes were sent to {URI}, not "
                                        rf"{other.tracking_uri}: send the rest there \(--tracking-uri {URI}\), or "
                                        rf"delete {re.escape(str(offset))} to send the whole file to "):
        replay(path, other.tracking_uri)
    assert other.runs == {} and offset.read_bytes() == recorded and not fully_sent(path)
    fake.log_metrics = original  # type: ignore[method-assign]
    assert replay(path, URI).points == 1500
    assert fake.run("k").steps() == list(range(2500)) and fake.run("k").status == "FINISHED" and fully_sent(path)


def test_a_spill_file_removed_and_written_anew_is_not_taken_for_sent(fake: FakeStore, spill_dir: Path) -> None:
    """A sent file removed by hand (its progress record left beside it), then written anew by the
    job's next run while the server was down: the old offset, inside the new file, had its open line
    and first bytes taken for sent and every later line dropped ("no run is known"). Now the record
    is refused as one that is not this file's, and the file is sent whole once it is deleted."""
    spill_while_down(fake, spill_dir, "k", range(30))
    path = spill_path(spill_dir, URI, "k")
    assert replay(path, URI).points == 30
    path.unlink()
    spill_while_down(fake, spill_dir, "k", range(30, 130))
    record = path.with_name(path.name + ".offset")
    with pytest.raises(UserError, match=rf"^{re.escape(str(record))}: not a progress record \(the file's first "
                                        "line is not the one sent: the file was replaced\); delete it"):
        replay(path, URI)
    record.unlink()
    assert replay(path, URI).points == 100 and fake.run("k").steps() == list(range(130))


def test_replay_leaves_a_torn_last_line_and_sends_lines_appended_later(fake: FakeStore, spill_dir: Path) -> None:
    spill_while_down(fake, spill_dir, "k", range(5))
    path = spill_path(spill_dir, URI, "k")
    line = _point_line(path, 99)
    live = SpillWriter(path)
    live.append([])  # a job that has the file open, still writing this line
    with open(path, "ab") as f:
        f.write(line[:20])
    result = replay(path, URI)
    assert result.incomplete and not result.done.ended and fake.run("k").steps() == list(range(5))
    assert result.lines(path)[-1] == "an incomplete last line is left for a later replay: a running job is writing the file"
    with open(path, "ab") as f:
        f.write(line[20:])
    live.close()
    assert replay(path, URI).points == 1 and fake.run("k").steps() == [*range(5), 99]


@pytest.mark.parametrize("cut", [20, -1], ids=["mid-line", "all but the newline"])
def test_a_torn_last_line_no_writer_can_finish_is_ended_and_read(fake: FakeStore, spill_dir: Path, cut: int) -> None:
    """A job that died mid-line (nothing has the file open) left its spill file waiting for good:
    every replay said the incomplete line was left for later. Now it is ended (one newline appended,
    nothing rewritten) and read: sent when whole, unreadable otherwise; the file is then fully sent."""
    spill_while_down(fake, spill_dir, "k", range(5))
    path = spill_path(spill_dir, URI, "k")
    torn = path.read_bytes() + _point_line(path, 99)[:cut]
    path.write_bytes(torn)
    result = replay(path, URI)
    assert not result.incomplete and result.done.ended and path.read_bytes() == torn + b"\n"
    assert (result.points, result.unreadable) == ((6, 0) if cut == -1 else (5, 1))
    assert fake.run("k").steps() == [*range(5), *([99] if cut == -1 else [])]
    assert "the incomplete last line of a job that is no longer writing the file was ended" in " ".join(result.lines(path))
    assert fully_sent(path)
    again = replay(path, URI)
    assert (again.points, again.unreadable, again.incomplete, again.done.ended) == (0, 0, False, False)


def test_a_writer_that_dies_drops_its_hold_and_its_torn_line_is_ended(fake: FakeStore, spill_dir: Path) -> None:
    """The writer's shared lock is the kernel's: a process killed mid-line no longer holds it."""
    spill_while_down(fake, spill_dir, "k", range(2))
    path = spill_path(spill_dir, URI, "k")
    script = ("import sys; from pathlib import Path; from orchestrator.tracking.spill import SpillWriter\n"
              "w = SpillWriter(Path(sys.argv[1])); w.append([])\n"
              "open(sys.argv[1], 'ab').write(b'{\"op\":\"met'); print('torn', flush=True); sys.stdin.read()")
    writer = subprocess.Popen([sys.executable, "-c", script, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "torn\n"
        assert replay(path, URI).incomplete  # alive: it may still finish the line
    finally:
        writer.kill()
        writer.wait()
    result = replay(path, URI)
    assert result.done.ended and not result.incomplete and result.unreadable == 1 and fully_sent(path)


def test_replay_skips_lines_that_are_not_operations_and_sends_the_rest(fake: FakeStore, spill_dir: Path) -> None:
    spill_while_down(fake, spill_dir, "k", range(3))
    path = spill_path(spill_dir, URI, "k")
    with open(path, "a") as f:  # JSON nested past the decoder's recursion limit, not JSON, not an operation
        f.write("[" * 100_000 + "]" * 100_000 + "\n" + "not json\n" + '{"op": "rm -rf"}\n')
    result = replay(path, URI)
    assert result.unreadable == 3 and fake.run("k").steps() == list(range(3))
    first_end = len(path.read_bytes().split(b"]\n")[0]) + 2
    assert f"3 unreadable lines were skipped (the first ends at byte {first_end})" in result.lines(path)


def test_unreadable_and_malformed_lines_are_skipped_and_said(fake: FakeStore, spill_dir: Path) -> None:
    spill_while_down(fake, spill_dir, "k", range(2))
    path = spill_path(spill_dir, URI, "k")
    lines = path.read_bytes().splitlines(keepends=True)
    handle = next(iter(path.read_text().splitlines())).split('"handle":"')[1].split('"')[0]
    broken = [b"not json\n", b'{"op":"metrics","handle":"%s","t":1}\n' % handle.encode(),
              b'{"op":"metrics","handle":"%s","t":1,"points":[["k"]],"per_step":false}\n' % handle.encode()]
    path.write_bytes(b"".join(lines[:2] + broken + lines[2:]))
    result = replay(path, URI)
    assert fake.run("k").steps() == [0, 1] and fake.run("k").status == "FINISHED"
    assert result.unreadable == 3 and not result.refusals  # a point that is no (key, value, ms, step): unreadable


@pytest.mark.parametrize("staged", ["{victim}", "../../victim.txt", "{hexdir}/victim.txt", "0" * 32 + "/..", 7])
def test_a_planted_file_line_never_uploads_or_deletes_a_file_outside_its_copies(
        fake: FakeStore, spill_dir: Path, tmp_path: Path, staged: object) -> None:
    """A spill line is read back from disk: one naming a file outside the artifacts folder (absolute,
    ../, or through a symbolic link planted in the folder) is dropped as malformed, the file untouched."""
    spill_while_down(fake, spill_dir, "k", range(2))
    path = spill_path(spill_dir, URI, "k")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    hexdir = path.with_suffix(".artifacts") / ("a" * 32)
    hexdir.parent.mkdir(exist_ok=True)
    hexdir.symlink_to(tmp_path, target_is_directory=True)
    if isinstance(staged, str):
        staged = staged.format(victim=victim, hexdir="a" * 32)
    handle = path.read_text().split('"handle":"')[1].split('"')[0]
    lines = path.read_text().splitlines(keepends=True)
    line = json.dumps({"op": "file", "handle": handle, "t": 1, "staged": staged, "artifact_path": "x",
                       "new_run_only": False})
    path.write_text("".join(lines[:2]) + line + "\n" + "".join(lines[2:]))
    result = replay(path, URI)
    assert victim.read_text() == "precious\n" and hexdir.is_symlink()
    assert not fake.run("k").artifacts and fake.run("k").steps() == [0, 1]
    assert result.unreadable == 1 if staged == 7 else any("malformed" in r for r in result.refusals)


def test_a_text_or_file_line_cannot_name_an_artifact_outside_its_run(fake: FakeStore, spill_dir: Path) -> None:
    spill_while_down(fake, spill_dir, "k", range(1))
    path = spill_path(spill_dir, URI, "k")
    handle = path.read_text().split('"handle":"')[1].split('"')[0]
    lines = path.read_text().splitlines(keepends=True)
    planted = [json.dumps({"op": "text", "handle": handle, "t": 1, "text": "x", "name": name}) + "\n"
               for name in ("../../other-run/x.txt", "/abs.txt", "ok/fine.txt")]
    path.write_text("".join(lines[:2] + planted + lines[2:]))
    result = replay(path, URI)
    assert list(fake.run("k").artifacts) == ["ok/fine.txt"] and sum("malformed" in r for r in result.refusals) == 2


def test_replay_of_a_missing_or_other_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such spill file"):
        replay(tmp_path / "nope.jsonl", URI)
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(UserError, match="not a spill file"):
        replay(tmp_path / "notes.txt", URI)
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(UserError, match=r"folder.jsonl: not a regular file \(a spill file is one\)$"):
        replay(tmp_path / "folder.jsonl", URI)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.jsonl", "notes.txt"]


@pytest.mark.parametrize("record", [b'{"offset": 1', b"\xff", b"[" * 100_000, b'{"offset": 1}',
                                    b'{"offset": 1e400, "runs": {}}', b'{"offset": -5, "runs": {}}',
                                    b'{"offset": 99999999999999999999999, "runs": {}}', b'{"offset": 5, "runs": {"h": 5}}',
                                    b'{"offset": 5, "runs": {"h": {"x": 1}}}', b'{"offset": true, "runs": {}}'])
def test_a_damaged_progress_record_is_one_line_and_kept(fake: FakeStore, spill_dir: Path, record: bytes) -> None:
    spill_while_down(fake, spill_dir, "k", range(3))
    path = spill_path(spill_dir, URI, "k")
    offset = path.with_name(path.name + ".offset")
    offset.write_bytes(record)
    with pytest.raises(UserError, match=rf"^{re.escape(str(offset))}: not a progress record \(.*\); delete it to send"):
        replay(path, URI)
    assert offset.read_bytes() == record and fake.runs == {}


def test_a_progress_record_past_the_end_of_a_replaced_file_is_one_line(fake: FakeStore, spill_dir: Path) -> None:
    """A spill file removed by hand and written anew by a later outage (its progress record left):
    every line was taken for sent, `sent 0 metric points` and exit 0, and no later run sent it."""
    spill_while_down(fake, spill_dir, "k", range(30))
    path = spill_path(spill_dir, URI, "k")
    replay(path, URI)
    path.unlink()
    spill_while_down(fake, spill_dir, "k", range(30, 33))
    with pytest.raises(UserError, match=r"\.offset: not a progress record \(offset \d+ is past the file's end, "
                                        r"\d+ bytes: the file was replaced\); delete it to send"):
        replay(path, URI)
    path.with_name(path.name + ".offset").unlink()
    assert replay(path, URI).points == 3 and fake.run("k").steps() == list(range(33))


@pytest.mark.parametrize("sibling", [".offset", ".lock"])
def test_a_folder_in_place_of_a_progress_record_or_lock_is_one_line(fake: FakeStore, spill_dir: Path,
                                                                      sibling: str) -> None:
    spill_while_down(fake, spill_dir, "k", range(3))
    path = spill_path(spill_dir, URI, "k")
    path.with_name(path.name + sibling).mkdir()
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}{sibling}: cannot (read|open) the "):
        replay(path, URI)
    assert fake.runs == {}


@pytest.mark.parametrize("where", ["open line", "progress record"])
def test_an_artifact_uri_read_back_from_disk_is_never_where_artifacts_go(tmp_path: Path, where: str) -> None:
    """A recorded resolution (an open line's `resolved`, the progress record's runs) is read back from
    disk: its artifact URI pointing at a local folder (or another host) must not be written to; the
    store's own answer for that run is."""
    from orchestrator.tracking.spill import Progress
    from orchestrator.tracking.store import Store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    real = Store(uri, timeout_s=5).open_run(experiment="e", run_key="k", run_name="job", handle="h0",
                                            floor_key="train/loss", start_ms=1)
    victim = tmp_path / "home"
    victim.mkdir()
    resolved = dict(real.to_json(), artifact_uri=victim.as_uri())
    path = tmp_path / "spill" / "planted.jsonl"
    path.parent.mkdir()
    open_line = {"op": "open", "handle": "h1", "t": 1, "experiment": "e", "run_key": "k", "run_name": "job",
                 "floor_key": "train/loss", "tracking_uri": uri, "resolved": resolved if where == "open line" else None}
    text_line = {"op": "text", "handle": "h1", "t": 2, "text": "echo pwned\n", "name": ".bashrc", "new_run_only": False}
    path.write_text("".join(json.dumps(line) + "\n" for line in (open_line, text_line)))
    if where == "progress record":
        Progress(0, {"h1": resolved}).save(path)

    result = replay(path, uri)

    assert result.operations == 1 and not result.refusals
    assert not list(victim.iterdir())
    assert (Path(real.artifact_uri.removeprefix("file://")) / ".bashrc").read_text() == "echo pwned\n"


def test_links_planted_beside_a_spill_file_are_never_written_through(fake: FakeStore, spill_dir: Path,
                                                                      tmp_path: Path) -> None:
    """In a shared spill_dir, a link at the progress record's staging name, the lock or the spill file
    itself must not make a replay (or a tracker) overwrite, append to or create the link's target."""
    spill_while_down(fake, spill_dir, "k", range(2))
    path = spill_path(spill_dir, URI, "k")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    staging = path.with_name(path.name + ".offset.tmp")
    staging.symlink_to(victim)
    assert replay(path, URI).points == 2
    assert victim.read_text() == "precious\n"

    lock, created = path.with_name(path.name + ".lock"), tmp_path / "created-by-lock"
    lock.unlink()
    lock.symlink_to(created)
    with pytest.raises(UserError, match="cannot open the send lock"):
        replay(path, URI)
    assert not created.exists()

    planted = spill_dir / "planted.jsonl"
    planted.symlink_to(victim)
    with pytest.raises(OSError):
        SpillWriter(planted).append([{"op": "tags", "handle": "h", "t": 1, "tags": {}}])
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("fifo", [".jsonl", ".jsonl.offset"])
def test_a_fifo_planted_in_a_shared_spill_dir_is_passed_over_not_waited_on(spill_dir: Path, fifo: str) -> None:
    """A FIFO at a spill file's name (beside a planted record naming its first line) or at a progress
    record's blocked `pending_files`, the sender of every job on that server, for good."""
    import os
    import threading

    from orchestrator.tracking.spill import pending_files

    path = spill_path(spill_dir, URI, "k")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"op": "tags"}\n')
    path.with_name(path.name + ".offset").write_text(json.dumps({"offset": 0, "runs": {}, "head": "0" * 16}))
    planted = path.with_suffix(fifo)
    planted.unlink()
    os.mkfifo(planted)
    found: list[list[Path]] = []
    sender = threading.Thread(target=lambda: found.append(pending_files(spill_dir, URI)), daemon=True)
    sender.start()
    sender.join(10)
    if sender.is_alive():  # let it go: a writer opens the FIFO and closes it
        os.close(os.open(planted, os.O_WRONLY))
    assert not sender.is_alive() and found == [[]]


def test_a_file_another_user_planted_at_a_spill_files_name_is_never_written(spill_dir: Path, monkeypatch) -> None:
    """A world-writable file another user planted at this user's (predictable) spill file name was
    appended to: whatever the job logged went into a file that user reads; a replay ended its line."""
    import os

    from orchestrator.tracking.spill import _end_dead_line

    path = spill_path(spill_dir, URI, "k")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"torn")
    path.chmod(0o666)
    monkeypatch.setattr(os, "geteuid", lambda: path.stat().st_uid + 1)  # the file is now another user's
    with pytest.raises(PermissionError, match="owned by another user"):
        SpillWriter(path).append([{"op": "params", "handle": "h", "t": 1, "params": {"lr": "0.1"}}])
    assert not _end_dead_line(path) and path.read_bytes() == b"torn"
