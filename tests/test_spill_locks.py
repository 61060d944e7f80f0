"""The spill file's send lock and its removal when every line was sent: one sender at a time,
whatever the interleaving of a finishing job, a replay and a new job (forced here with events)."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from orchestrator.tracking import spill, spill_lock


def test_a_sender_waiting_on_a_removed_lock_file_never_holds_it_beside_a_new_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "server-key.jsonl"
    path.write_bytes(b"")  # every byte sent: remove_if_sent deletes it, with its lock file
    a_holds, b_waits, go_on, b_moved = (threading.Event() for _ in range(4))
    outcome: list[str] = []
    real_fully_sent, sleeps = spill.fully_sent, []

    def finishing_job_checks(p: Path) -> bool:  # the finishing job holds the lock: the replay comes now
        a_holds.set()
        assert b_waits.wait(10)
        return real_fully_sent(p)

    def replay_polls(_: float) -> None:
        sleeps.append(1)
        if len(sleeps) == 1:  # the replay waits on the finishing job's lock file
            b_waits.set()
            assert go_on.wait(10)
        elif not b_moved.is_set():
            outcome.append("waits")
            b_moved.set()

    def replay() -> None:
        with spill.file_lock(path, 10.0) as held:
            outcome.append("holds" if held else "gave up")
            b_moved.set()

    monkeypatch.setattr(spill, "fully_sent", finishing_job_checks)
    monkeypatch.setattr(spill_lock.time, "sleep", replay_polls)
    finishing = threading.Thread(target=spill.remove_if_sent, args=(path,))
    finishing.start()
    assert a_holds.wait(10)
    replaying = threading.Thread(target=replay)
    replaying.start()
    finishing.join(10)
    assert not path.exists()
    with spill.file_lock(path, 0.0) as new_job_holds:  # a new job locks the lock file at the path now
        assert new_job_holds
        go_on.set()
        assert b_moved.wait(10)
        assert outcome == ["waits"]  # not "holds": two senders at once
    replaying.join(10)
    assert outcome == ["waits", "holds"]


def test_lines_a_running_job_appends_while_the_sent_file_is_removed_are_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "server-key.jsonl"
    old = spill.encode({"op": "tag", "handle": "h", "key": "k", "value": "v"})
    path.write_bytes(old)
    progress = spill.Progress(offset=len(old))
    progress.save(path)  # every byte sent: the finishing job removes the file
    line = {"op": "tag", "handle": "h2", "key": "k", "value": "new"}
    writer_locks, real_flock, real_fully_sent = threading.Event(), spill.fcntl.flock, spill.fully_sent

    def flock(file: object, how: int) -> None:
        if how == spill.fcntl.LOCK_SH:
            writer_locks.set()  # the new job has the file open; its line follows, before or after the removal
        real_flock(file, how)

    def new_job_appends_meanwhile(p: Path) -> bool:
        sent = real_fully_sent(p)
        appending.start()
        assert writer_locks.wait(10)
        return sent

    writer = spill.SpillWriter(path)
    appending = threading.Thread(target=writer.append, args=([line],))
    monkeypatch.setattr(spill.fcntl, "flock", flock)
    monkeypatch.setattr(spill, "fully_sent", new_job_appends_meanwhile)
    spill.remove_if_sent(path)
    appending.join(10)
    writer.close()
    assert path.exists() and spill.encode(line) in path.read_bytes()
    assert not real_fully_sent(path)


def nfs_flock(real: Any) -> Any:
    """flock as an NFS client does it (emulated with byte-range locks the server checks against the
    open mode): an exclusive lock needs the file open to write, a shared one open to read (EBADF)."""

    def flock(file: Any, how: int) -> None:
        mode = fcntl.fcntl(file.fileno(), fcntl.F_GETFL) & os.O_ACCMODE
        if (how & fcntl.LOCK_EX and mode == os.O_RDONLY) or (how & fcntl.LOCK_SH and mode == os.O_WRONLY):
            raise OSError(errno.EBADF, "Bad file descriptor")
        real(file, how)

    return flock


def sent_file(path: Path, *lines: dict[str, Any]) -> None:
    """Every line of the file at `path` sent (its progress record at its end)."""
    with path.open("ab") as f:
        f.write(b"".join(spill.encode(line) for line in lines))
    spill.Progress(offset=path.stat().st_size).save(path)


def test_on_nfs_a_sent_file_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The remover locked the file opened only to read: on NFS that exclusive lock always failed, so no
    spill file was ever removed there (a home directory on NFS holds the default spill_dir)."""
    monkeypatch.setattr(fcntl, "flock", nfs_flock(fcntl.flock))
    path = tmp_path / "server-key.jsonl"
    sent_file(path, {"op": "tag", "handle": "h", "key": "k", "value": "v"})
    assert spill.remove_if_sent(path) and not path.exists()


def test_on_nfs_a_running_jobs_file_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's shared lock, on a file opened only to write, failed on NFS without a word: nothing
    kept a remover from deleting the file it appends to."""
    monkeypatch.setattr(fcntl, "flock", nfs_flock(fcntl.flock))
    path = tmp_path / "server-key.jsonl"
    writer = spill.SpillWriter(path)
    writer.append([{"op": "tag", "handle": "h", "key": "k", "value": "v"}])
    try:
        sent_file(path)  # a replay sent what it wrote so far; the job runs on
        assert not spill.remove_if_sent(path) and path.exists()
    finally:
        writer.close()


def test_removing_a_sent_file_keeps_the_copies_a_running_tracker_staged_since(tmp_path: Path) -> None:
    """The whole artifacts folder went with a sent file: a tracker of the same key (a rerun) that had
    staged a copy for its first line, not yet written to a new file at that name, lost the artifact."""
    path = tmp_path / "server-key.jsonl"
    sent_file(path, {"op": "tag", "handle": "h", "key": "k", "value": "v"})
    files = spill.artifacts_dir(path)
    for name, age_s in (("leftover", 60), ("running", -60)):  # staged before, and after, its last line
        (files / name).mkdir(parents=True)
        (files / name / "config.yaml").write_text(name)
        when = path.stat().st_mtime - age_s
        os.utime(files / name, (when, when))
    assert spill.remove_if_sent(path) and not path.exists()
    assert [p.name for p in files.iterdir()] == ["running"]
