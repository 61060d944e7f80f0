"""The job lock's lease on object storage whose writes are not atomic: a lease read mid-write (or
edited) is no free lock. pyarrow's local filesystem stands in for the bucket."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pyarrow import fs

from orchestrator import constants
from orchestrator.driver.lock import JobLock
from orchestrator.errors import UserError
from orchestrator.storage import Storage


class TornReads:
    """A bucket that hands out the lease cut short `torn` times, as storage whose writes are not
    atomic does to a reader while the holder rewrites it."""

    def __init__(self, root: Path, torn: int) -> None:
        self._fs, self.torn = fs.SubTreeFileSystem(str(root), fs.LocalFileSystem()), torn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)

    def open_input_stream(self, path: str) -> Any:
        if path.endswith(".lock.json") and self.torn:
            self.torn -= 1
            with self._fs.open_input_stream(path) as f:
                return pa.BufferReader(f.read()[:20])
        return self._fs.open_input_stream(path)


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "LOCK_HEARTBEAT_S", 60.0)  # no beat rewrites the lease during a test
    monkeypatch.setattr(constants, "LOCK_SETTLE_S", 0.0)
    monkeypatch.setattr(constants, "LOCK_READ_WAIT_S", 0.05)


def test_a_live_lease_read_mid_write_is_read_again_and_refuses(tmp_path: Path) -> None:
    bucket = TornReads(tmp_path, torn=0)
    holder = JobLock(Storage("s3://bucket/runs", filesystem=bucket), "digits")
    holder.acquire()
    bucket.torn = 2  # the holder is rewriting its lease as the second driver reads it
    with pytest.raises(UserError, match="digits: this job is already running .pid"):
        JobLock(Storage("s3://bucket/runs", filesystem=bucket), "digits").acquire()
    assert json.loads((tmp_path / "bucket/runs/digits/.lock.json").read_text())["token"] == holder._token
    holder.release()


@pytest.mark.parametrize("content", ['{"token": "x", "heartb', '{"token": "x", "heartbeat": "now"}', "[]", "",
                                     '{"token": "x", "heartbeat": Infinity}', '{"token": "x", "heartbeat": NaN}',
                                     '{"token": "x", "heartbeat": 1e12}'])  # fresh for good, or for 30,000 years
def test_a_lease_that_stays_unreadable_refuses_naming_it_until_it_is_stale(tmp_path: Path, content: str) -> None:
    storage = Storage("s3://bucket/runs", filesystem=fs.SubTreeFileSystem(str(tmp_path), fs.LocalFileSystem()))
    lease = tmp_path / "bucket" / "runs" / "digits" / ".lock.json"
    lease.parent.mkdir(parents=True)
    lease.write_text(content)
    with pytest.raises(UserError, match=re.escape("s3://bucket/runs/digits/.lock.json: not a lease")) as caught:
        JobLock(storage, "digits").acquire()
    assert "delete it" in str(caught.value) and "\n" not in str(caught.value)
    assert lease.read_text() == content  # not taken over
    stale = lease.stat().st_mtime - 3 * constants.LOCK_HEARTBEAT_S - 1
    os.utime(lease, (stale, stale))  # its driver died mid-write: nothing rewrote it for three beats
    taker = JobLock(storage, "digits")
    taker.acquire()
    assert json.loads(lease.read_text())["token"] == taker._token
    taker.release()
