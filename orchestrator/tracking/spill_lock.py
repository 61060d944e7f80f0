"""The locks beside and on a spill file (spill.py says what each is for), and the one way this
program opens a file it writes in a spill folder another user may share."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from orchestrator import constants
from orchestrator.errors import UserError
from orchestrator.files import open_no_follow


def open_own(path: Path, flags: int) -> int:
    """In a shared spill_dir a link planted at a name this program writes (the spill file, its lock,
    its progress record's staging name) would have it append to or overwrite the link's target; a
    file another user planted there (mode 0666, at the predictable name of this user's spill file)
    would be handed what this job logs. Either is refused (OSError)."""
    fd = open_no_follow(path, flags, mode=0o600)  # this user's only
    if (owner := os.fstat(fd).st_uid) != os.geteuid():
        os.close(fd)
        raise PermissionError(errno.EPERM, f"owned by another user (uid {owner}), not written", str(path))
    return fd


def sibling(path: Path, suffix: str) -> Path:
    """The file beside a spill file that its name plus `suffix` names (its lock, progress record)."""
    return path.with_name(path.name + suffix)


def lock_path(path: Path) -> Path:
    return sibling(path, ".lock")


@contextmanager
def file_lock(path: Path, wait_s: float) -> Iterator[bool]:
    """Hold the file's send lock; yields False when another sender keeps it past `wait_s`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        with _open_lock(path) as lock:
            if not _flock_by(lock, deadline):
                yield False
                return
            if names(lock_path(path), lock):
                try:
                    yield True
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
                return
        # remove_if_sent deleted the lock file while this waited for it: another sender may already
        # hold a new one at that name, and two senders would interleave. Lock the file named now.


def _open_lock(path: Path) -> IO[str]:
    try:
        return os.fdopen(open_own(lock_path(path), os.O_WRONLY | os.O_APPEND), "a")
    except OSError as exc:  # a folder in its place, say
        raise UserError(f"{lock_path(path)}: cannot open the send lock ({exc.strerror or exc})") from None


def _flock_by(lock: IO[str], deadline: float) -> bool:
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(constants.TRACKING_LOCK_POLL_S)


def names(path: Path, file: IO[Any]) -> bool:
    """Whether `path` still names the open `file` (not deleted, nor replaced)."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    held = os.fstat(file.fileno())
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
