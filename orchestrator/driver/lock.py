"""An exclusive lock on a job's storage prefix, held by the driver for the whole run.

Local storage: `fcntl.flock` on `<prefix>/.lock` (the kernel releases it when the driver dies,
however it dies); the holder writes who it is into the file for the refusal message. Object
storage has no locks: a lease object `<prefix>/.lock.json` (holder, token, heartbeat) that the
holder renews every `LOCK_HEARTBEAT_S`; a lease whose heartbeat is older than
`LOCK_STALE_AFTER` heartbeats is taken over (its driver died). A lease that reads as no lease
(torn: storage whose writes are not atomic shows a reader the holder's rewrite half done) is no
free lock: read again, then refused, unless the file itself was not rewritten for as long (its
modification time: the driver died mid-write). Two drivers racing for a free lease
both write it, wait, and read it back: only the one whose token is there goes on.
A holder that finds another token in its lease at a beat was taken over: it stops renewing and
says so (`lost`); the driver then stops the job.
"""

from __future__ import annotations

import math
import os
import posixpath
import secrets
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any

from orchestrator import constants
from orchestrator.errors import UserError
from orchestrator.files import open_no_follow
from orchestrator.storage import Storage

LOCK_FILE = ".lock"
LEASE_FILE = ".lock.json"
LOCK_STALE_AFTER = 3  # heartbeats


def _stale_s() -> float:
    """How long a lease goes unrenewed (or unrewritten) before it is taken over (seconds)."""
    return LOCK_STALE_AFTER * constants.LOCK_HEARTBEAT_S


def holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


class Unreadable(Exception):
    """The lease stayed no lease while it was read again: why, in a few words."""


def _is_lease(info: Any) -> bool:
    """A heartbeat this program could have written: a time no later than a stale lease's age from now
    (Infinity or a far-future time, edited in or from a clock far ahead, would be fresh for good)."""
    beat = info.get("heartbeat") if isinstance(info, dict) else None
    return (isinstance(beat, (int, float)) and not isinstance(beat, bool) and isinstance(info.get("token"), str)
            and math.isfinite(beat) and beat < time.time() + _stale_s())


def _describe(info: dict[str, Any] | None) -> str:
    if not isinstance(info, dict) or not info:  # none, or a holder's file someone edited
        return "another driver"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"


class JobLock:
    def __init__(self, storage: Storage, name: str) -> None:
        self.storage, self.name = storage, name
        self._file: Any = None
        self._token = secrets.token_hex(8)
        self._holder = holder()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.lost: str | None = None  # who took the lease over, once another driver did

    def _refuse(self, info: dict[str, Any] | None, where: str) -> UserError:
        return UserError(f"{self.name}: this job is already running ({_describe(info)}; lock {where}); "
                         f"wait for it, stop it, or rename this job")

    def acquire(self) -> None:
        if self.storage.remote:
            self._acquire_lease()
        else:
            self._acquire_flock()

    def release(self) -> None:
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._beat is not None:
            self._stop.set()
            self._beat.join(timeout=5)
            self._beat = None
            try:
                info = self._read_lease()
            except Unreadable:  # not known to be this driver's: left to go stale
                return
            if (info or {}).get("token") == self._token:
                self.storage.delete(self._lease)

    # -- local: flock --------------------------------------------------------------------------

    def _acquire_flock(self) -> None:
        import fcntl
        import json

        path = self.storage.local_path(self.name, LOCK_FILE)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # never through a link: on a shared storage one planted at .lock would have the holder's
            # name truncate and overwrite the link's target (any file this user can write)
            fd = open_no_follow(path, os.O_RDWR | os.O_APPEND, mode=0o666)
            f = os.fdopen(fd, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        except OSError as exc:  # a read-only or missing place, a file where the folder goes, a link, a folder
            if path.is_symlink():
                raise UserError(f"checkpoint.storage_path: cannot write {path.parent} ({path} is a symbolic link; "
                                "remove it)") from None
            where = path if str(exc.filename) == str(path) else path.parent  # the lock itself: a folder in its place
            raise UserError(f"checkpoint.storage_path: cannot write {where} ({exc.strerror or exc})") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:  # the holder's name, as far as its file says (edited or damaged: no name)
                text = f.read()
                info = json.loads(text) if text.strip() else None
            except (ValueError, RecursionError):  # not UTF-8 or not JSON, or nested past the decoder
                info = None
            f.close()
            raise self._refuse(info, str(path)) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(self._holder))
        f.flush()
        self._file = f

    # -- object storage: a lease ------------------------------------------------------------------

    @property
    def _lease(self) -> str:
        return posixpath.join(self.name, LEASE_FILE)

    def _read_lease(self) -> dict[str, Any] | None:
        """The lease, or None where there is none. One that reads as no lease (caught mid-write where
        the storage's writes are not atomic, or edited) is read again for LOCK_READ_WAIT_S: it is no
        free lock, as its holder may be alive and rewriting it. Raises `Unreadable` if it stays so."""
        deadline = time.monotonic() + constants.LOCK_READ_WAIT_S
        while True:
            try:
                info = self.storage.read_json(self._lease)
                why = "no heartbeat and token in it"
            except UserError as exc:
                info, why = False, str(exc).removeprefix(f"{self.storage.join(self._lease)}: ")
            if info is None or _is_lease(info):
                return info
            if time.monotonic() >= deadline:
                raise Unreadable(why)
            time.sleep(constants.LOCK_READ_WAIT_S / 10)

    def _fresh(self, info: dict[str, Any]) -> bool:
        return time.time() - info["heartbeat"] < _stale_s()

    def _acquire_lease(self) -> None:
        where = self.storage.join(self._lease)
        try:
            info = self._read_lease()
        except Unreadable as exc:
            self._unless_stale(exc, where)
            info = None
        if info is not None and self._fresh(info) and info.get("token") != self._token:
            raise self._refuse(info, where)
        self._write_lease()
        time.sleep(constants.LOCK_SETTLE_S)  # a racing driver's write lands meanwhile; the last one wins
        try:
            info = self._read_lease()
        except Unreadable:  # a racing driver's write that stays torn: not known to be this one's
            info = None
        if (info or {}).get("token") != self._token:
            raise self._refuse(info, where)
        self._beat = threading.Thread(target=self._heartbeat, name="job-lock", daemon=True)
        self._beat.start()

    def _unless_stale(self, exc: Unreadable, where: str) -> None:
        """A lease that stays unreadable is taken over only once nothing rewrote it for as long as
        a readable one goes unrenewed before it is (its driver died mid-write, or long ago)."""
        stale_s = _stale_s()
        modified = self.storage.modified(self._lease)
        if modified is not None and time.time() - modified >= stale_s:
            return
        written = "" if modified is None else f", rewritten {max(0.0, time.time() - modified):.0f} s ago"
        raise UserError(f"{where}: not a lease this program can read ({exc}{written}): another driver may be "
                        f"running {self.name}, so it is not taken over until nothing rewrites it for {stale_s:.0f} s; "
                        "if no driver runs this job, delete it and run again")

    def _write_lease(self) -> None:
        self.storage.write_json(self._lease, {**self._holder, "token": self._token, "heartbeat": time.time()})

    def _heartbeat(self) -> None:
        while not self._stop.wait(constants.LOCK_HEARTBEAT_S):
            try:
                info = self._read_lease()
                if info is not None and info.get("token") != self._token:
                    # Taken over after this driver missed its beats (storage down, the driver paused):
                    # writing it back would let two drivers run the job, each renewing in turn.
                    self.lost = _describe(info)
                    return
                self._write_lease()
            except Exception:  # noqa: BLE001 - a missed beat is retried; three in a row lose the lease
                continue
