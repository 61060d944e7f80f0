"""Spill files: what MLflow has not taken yet, kept on local disk, and `send_file`, which sends them
(for the tracker, and for `tracking replay`: spill_replay.py).

One file per tracking server and job: ``<spill_dir>/<server>-<run key>.jsonl`` (both parts
digests: of the redacted tracking URI, so the next tracker against that server finds the file,
and of the run key). It holds JSON lines of operations (ops.py), each appended whole and never
rewritten, renamed or truncated. A handle's first line in a file is its open operation, with the
run it resolved to when that was already known. Beside the file:

- ``….offset``: progress, the byte offset up to which lines were sent, the run each handle
  resolved to (so a second replay neither sends a line again nor creates a second run) and the
  server they went to (the rest of the file goes there too);
- ``….lock``: held (flock) by whoever is sending the file, so two senders never interleave; deleted
  with the file once all is sent, so a sender that waited on it locks the one named then instead;
- ``….artifacts/``: the copies of artifact files, made when they were logged.

Sending is idempotent: lines go in order and the offset is recorded after each batch, so a
replay that dies halfway resends at most one batch, which MLflow takes again without duplicates
(it drops a metric point identical in key, value, timestamp and step; tags, params and artifacts
are set to the same values). Only complete lines are sent, and lines a running job appends after
the offset read wait for the next send.

A torn last line (no newline) waits while a writer may still finish it. Each `SpillWriter` holds
a shared flock on the spill file itself from its first append to its close; the kernel drops it
when the process dies, however it dies. A sender (holding the send lock) that takes that lock
exclusively knows no writer has the file open: the line was torn by one that died mid-write (a
crash, a full disk) and nothing will ever finish it. The sender ends it with a newline, appended
under that lock (nothing is rewritten), and reads it as any other line: sent when whole, counted
as unreadable otherwise. Before, such a file waited for good ("an incomplete last line is left").
A writer that opens the file later takes its shared lock before it looks whether the last line
is torn (and ends it itself), so the two never both end it.
The same lock keeps a running job's file: `remove_if_sent` deletes a file only under its exclusive
lock, and a writer that locked a file deleted meanwhile opens the new one at the name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from orchestrator.files import user_cache_dir
from orchestrator.errors import UserError
from orchestrator.tracking.ops import Op, ResolvedRun, digest, joins, key_digest, server_name, weight, well_formed
from orchestrator.tracking.spill_lock import file_lock, lock_path, names, open_own, sibling
from orchestrator.tracking.writer import Writer, remove_staged

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"


def default_spill_dir() -> Path:
    """``$XDG_CACHE_HOME/orchestrator/tracking``, else ``~/.cache/orchestrator/tracking``."""
    return user_cache_dir("tracking")


def spill_path(spill_dir: str | Path, tracking_uri: str, run_key: str) -> Path:
    return Path(spill_dir) / f"{digest(server_name(tracking_uri))}-{digest(run_key)}{SUFFIX}"


def artifacts_dir(path: Path) -> Path:
    return path.with_suffix(".artifacts")


def replay_command(path: Path, tracking_uri: str) -> str:
    uri = shlex.quote(server_name(tracking_uri))
    return f"orchestrator tracking replay {shlex.quote(str(path))} --tracking-uri {uri}"


def encode(op: Op) -> bytes:
    return json.dumps(op, separators=(",", ":")).encode() + b"\n"


class SpillWriter:
    """Appends whole lines to one spill file, opened on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None

    def append(self, ops: list[Op]) -> int:
        """Returns the file's end: every line up to it is complete."""
        if self._file is None:
            self._file = self._open()
        try:
            self._file.write(b"".join(encode(op) for op in ops))  # one write: whole lines, in order
            self._file.flush()
        except OSError:
            # A full disk may have taken part of the write: drop the rest of the buffer (the caller
            # keeps the operations); reopening ends the torn line before the next one is written.
            self._discard()
            raise
        return self._file.tell()

    def _discard(self) -> None:
        file, self._file = self._file, None
        try:
            file.close()
        except OSError:  # the flush on close fails as the write did: the file is closed all the same
            pass

    def _open(self) -> IO[bytes]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            # Open to read as well: NFS grants a shared flock only so, and it is what keeps the file.
            file = os.fdopen(open_own(self.path, os.O_RDWR | os.O_APPEND), "ab")
            # Held until close: no sender takes a torn line for dead, nor removes the file, meanwhile
            # (see the module docstring). It waits only while a sender ends such a line or removes the file.
            try:
                fcntl.flock(file, fcntl.LOCK_SH)
            except OSError:  # a filesystem without flock: no sender can lock the file either, nor end a line
                pass
            if names(self.path, file):
                break
            file.close()  # removed (all sent) while this waited: what follows goes to a new file there
        if file.tell() and not _ends_with_newline(self.path):
            # A writer died mid-line: end that line, so it stays one unreadable line instead of
            # spoiling the first line written now.
            file.write(b"\n")
        return file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _read(path: Path) -> IO[bytes]:
    """`path` opened to read, unless it is no regular file: in a shared spill_dir a FIFO planted at a
    spill file's or progress record's name (or swapped in after `pending_files` chose it) would
    block the sender for good, a device feed it without end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens at once, unread
    except OSError as exc:  # not this user's to read, say: no failure of MLflow's, nor one a retry mends
        raise UserError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path}: cannot read the file: not a regular file (a spill file and its progress record are)")
    return os.fdopen(fd, "rb")


def _ends_with_newline(path: Path) -> bool:
    """Whether the file's last line is complete (an empty file: no torn line)."""
    with _read(path) as f:
        if not f.seek(0, os.SEEK_END):
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _head(path: Path) -> str:
    """A digest of the file's first line: a handle's open line, unique to the file."""
    with _read(path) as f:
        return hashlib.sha256(f.readline(1 << 16)).hexdigest()[:16]


def _end_dead_line(path: Path) -> bool:
    """End the file's torn last line when no writer has the file open (the module docstring says
    why that is safe); True when it did."""
    try:
        fd = open_own(path, os.O_RDWR | os.O_APPEND)
    except OSError:  # not this user's to write, or a link: left as it is
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        size = os.fstat(fd).st_size
        if not size or os.pread(fd, 1, size - 1) == b"\n":  # ended meanwhile, by a writer that came back
            return False
        os.write(fd, b"\n")
        return True
    except OSError:  # a writer has the file open (it may still finish the line), or no flock here
        return False
    finally:
        os.close(fd)  # and with it the lock


@dataclass
class Progress:
    """The ``….offset`` record: bytes sent, the run behind each handle seen in the file, the server
    both are on, and a digest of the file's first line (the last two None in a record written
    before they were recorded)."""

    offset: int = 0
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    server: str | None = None

    @classmethod
    def load(cls, path: Path) -> Progress:
        record = sibling(path, ".offset")
        if not record.exists():
            return cls()
        try:
            with _read(record) as f:
                owner, data = os.fstat(f.fileno()).st_uid, json.loads(f.read())
            # Another user's, beside the file in a shared spill_dir: its offset would have every line
            # taken for sent, and the file deleted unsent. (One this user's replay of the file wrote is kept.)
            if path.exists() and owner not in ((writer := path.stat().st_uid), os.geteuid()):
                raise ValueError(f"it is uid {owner}'s, the spill file uid {writer}'s")
            offset, runs, server, head = data["offset"], dict(data["runs"]), data.get("server"), data.get("head")
            if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < 2**62:
                raise ValueError(f"offset {offset!r} is no byte offset")
            if not all(v is None or isinstance(v, str) for v in (server, head)):
                raise ValueError(f"server {server!r} or head {head!r} is no text")
            if path.exists() and offset > (size := path.stat().st_size):  # the file was removed and written
                # anew: every line in it would be taken for sent (replay said "sent 0", and no later run sent it)
                raise ValueError(f"offset {offset} is past the file's end, {size} bytes: the file was replaced")
            if head is not None and path.exists() and _head(path) != head:  # removed and written anew past
                # the offset: its first bytes (its open line) were taken for sent, and every later line dropped
                raise ValueError("the file's first line is not the one sent: the file was replaced")
            for resolved in runs.values():  # each a run as MLflow answered it
                ResolvedRun.from_json(resolved)
            return cls(offset, runs, server)
        except OSError as exc:  # a folder in its place, say
            raise UserError(f"{record}: cannot read the progress record ({exc.strerror or exc})") from None
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise UserError(f"{record}: not a progress record ({exc}); delete it to send the file from its start "
                            "(MLflow drops metric points it already has)") from None

    def save(self, path: Path) -> None:
        record = sibling(path, ".offset")
        tmp = sibling(path, ".offset.tmp")
        tmp.unlink(missing_ok=True)  # a stale one, or a link planted in its place: never written through
        with os.fdopen(open_own(tmp, os.O_WRONLY | os.O_EXCL), "w") as f:
            f.write(json.dumps({"offset": self.offset, "runs": self.runs, "server": self.server,
                                "head": _head(path) if self.offset else None}))
        os.replace(tmp, record)  # never half written

    def claim(self, path: Path, server: str) -> None:
        """The rest of the file goes where its start went: the runs recorded are that server's, and
        another refused every later line for them (each dropped, the file then taken for sent)."""
        if self.offset and self.server not in (None, server):
            raise UserError(f"{path}: its first {self.offset} bytes were sent to {self.server}, not {server}: send "
                            f"the rest there (--tracking-uri {self.server}), or delete {sibling(path, '.offset')} "
                            f"to send the whole file to {server}")
        self.server = server

    def note_runs(self, batch: list[Op], writer: Writer) -> None:
        for op in batch:
            handle = op["handle"]
            if handle not in self.runs and handle in writer.runs:
                self.runs[handle] = writer.runs[handle].to_json()


def _ops(path: Path, offset: int) -> Iterator[tuple[int, Op | None]]:
    """(end offset, operation) for each complete line after `offset`; None for an unreadable one."""
    with _read(path) as f:
        f.seek(offset)
        for raw in f:
            if not raw.endswith(b"\n"):
                return  # torn: left for later
            offset += len(raw)
            try:
                op = json.loads(raw)
            except (ValueError, RecursionError):  # not JSON, or nested past the decoder
                op = None
            yield offset, op if well_formed(op) else None


def _batches(path: Path, offset: int) -> Iterator[tuple[list[Op], int]]:
    """Requests' worth of operations, each with the offset just past it; [] for an unreadable line."""
    batch: list[Op] = []
    end, total = offset, 0
    for line_end, op in _ops(path, offset):
        if batch and (op is None or not joins(batch[0], total, op)):
            yield batch, end
            batch, total = [], 0
        if op is None:
            yield [], line_end
        else:
            batch.append(op)
            total += weight(op)
        end = line_end
    if batch:
        yield batch, end


@dataclass(frozen=True)
class Pass:
    """One send of a file: where it got to, lines it could not read, a torn last line left."""

    offset: int
    unreadable: int
    incomplete: bool
    first_unreadable: int | None = None  # the byte the first unreadable line ends at
    ended: bool = False  # a torn last line that no writer could finish was ended, then read

    def skipped(self) -> str | None:
        """The unreadable lines in one sentence (a damaged file can have thousands: said once)."""
        if not self.unreadable:
            return None
        return f"{self.unreadable} unreadable lines were skipped (the first ends at byte {self.first_unreadable})"


def send_file(path: Path, writer: Writer, *, wait_s: float = 0.0, stop: Callable[[], bool] = lambda: False
              ) -> Pass | None:
    """Send the complete lines after the recorded offset, in order, recording progress after each
    batch, until done or `stop()`. None when another sender holds the file past `wait_s`. A
    transient failure raises (the progress so far is kept); so does RunRefused."""
    with file_lock(path, wait_s) as held:
        if not held:
            return None
        progress = Progress.load(path)
        progress.claim(path, server_name(writer.store.tracking_uri))
        writer.adopt(progress.runs, key_digest=key_digest(path.name, SUFFIX))
        ended = not _ends_with_newline(path) and _end_dead_line(path)
        files, unreadable, first, unsaved = artifacts_dir(path), 0, None, False
        for batch, end in _batches(path, progress.offset):
            if stop():
                break
            if not batch:  # nothing sent: recorded with the next batch or at the end, not per line
                unreadable, first, unsaved = unreadable + 1, first or end, True
                progress.offset = end
                continue
            writer.apply(batch, files=files)
            progress.offset = end
            progress.note_runs(batch, writer)
            progress.save(path)
            unsaved = False
            remove_staged(batch, files)
        if unsaved:
            progress.save(path)
        return Pass(progress.offset, unreadable, _torn(path, progress.offset), first, ended)


def _torn(path: Path, offset: int) -> bool:
    with _read(path) as f:
        f.seek(offset)
        rest = f.read()
    return bool(rest) and b"\n" not in rest


def fully_sent(path: Path) -> bool:
    """Whether every byte of the file is sent (no file: nothing to send)."""
    try:
        return not path.exists() or path.stat().st_size == Progress.load(path).offset
    except UserError:  # a broken progress record: not known to be sent
        return False


def pending_files(spill_dir: Path, tracking_uri: str) -> list[Path]:
    """Spill files for this tracking server with lines not yet sent, oldest first. Only this user's:
    in a shared spill_dir another user's file (planted, even) would be sent with this user's
    credentials, into whatever run its lines name; its owner's next job, or a replay, sends it."""
    unsent: list[tuple[float, Path]] = []
    for path in Path(spill_dir).glob(f"{digest(server_name(tracking_uri))}-*{SUFFIX}"):
        try:
            stat = path.stat()
            if stat.st_uid != os.geteuid():
                log.info("%s: not sent: owned by another user (uid %d)", path, stat.st_uid)
            elif stat.st_size > Progress.load(path).offset:
                unsent.append((stat.st_mtime, path))
        except (OSError, UserError) as exc:  # removed meanwhile, or a broken progress record
            log.warning("%s: not sent (%s)", path, exc)
    return [path for _, path in sorted(unsent)]


def remove_if_sent(path: Path) -> bool:
    """Delete a file every line of which was sent, with its progress record and the artifact copies
    staged before its last line (`_remove_copies`); where it was never written, the empty artifacts
    folder and the lock a tracker made for it."""
    with file_lock(path, 0.0) as held:
        if not held:
            return False
        if not path.exists():
            with contextlib.suppress(OSError):  # not empty: a copy some sender still has to upload
                artifacts_dir(path).rmdir()
            lock_path(path).unlink(missing_ok=True)
            return False
        try:  # open to write: NFS grants an exclusive flock only so
            file = os.fdopen(open_own(path, os.O_RDWR | os.O_APPEND), "rb")
        except OSError:  # not this user's, or a link: left as it is
            return False
        with file:
            try:  # a running job that appends holds a shared lock on the file from its first line on
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # it would append to a deleted file, and its lines be lost
                return False
            if not fully_sent(path):
                return False
            written_ns = os.fstat(file.fileno()).st_mtime_ns  # its last line: no writer holds it now
            for extra in (path, sibling(path, ".offset")):
                extra.unlink(missing_ok=True)
        _remove_copies(artifacts_dir(path), staged_by_ns=written_ns)
        lock_path(path).unlink(missing_ok=True)
        return True


def _remove_copies(files: Path, *, staged_by_ns: int) -> None:
    """The removed file's leftover artifact copies (those of lines skipped as unreadable, or of a
    tracker that died before it wrote their line): staged before its last line was. A copy staged
    later is a running tracker's, staged before its first line reaches a new file at this name;
    it stays (the folder too)."""
    try:
        folders = list(files.iterdir())
    except OSError:
        return
    for folder in folders:
        with contextlib.suppress(OSError):
            if folder.lstat().st_mtime_ns <= staged_by_ns:
                shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: a running tracker's copies
        files.rmdir()
