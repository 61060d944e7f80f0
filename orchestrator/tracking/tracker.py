"""The tracker: the driver's MLflow writes, queued in order and sent from one background thread.

The caller's side (RunHandle methods, `close`) only takes this tracker's lock for a few list
operations, plus a local file write when the queue is over its bound (the oldest operations go to
the spill file, a chunk at a time) and an artifact copy: never the network. The sender thread
owns the network: first the spill files an earlier job left for this server, then this run's own
spill file, then the queue, so operations reach MLflow in the order they were made. A failed
request is retried with back-off (TRACKING_RETRY_BASE_S doubling up to TRACKING_RETRY_MAX_S);
warnings say how much waits and when the server is back.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
import uuid
from collections import deque
from pathlib import Path

from orchestrator import constants
from orchestrator.errors import UserError
from orchestrator.tracking.handle import CloseReport, RunHandle
from orchestrator.tracking.ops import BATCH_LIMIT, Op, describe, leading_batch, open_op, server_name, utf8, weight
from orchestrator.tracking.spill import (
    Pass, SpillWriter, artifacts_dir, pending_files, fully_sent, remove_if_sent, replay_command, send_file,
    spill_path,
)
from orchestrator.tracking.writer import RunRefused, Writer, remove_staged

log = logging.getLogger(__name__)

# Operations and points spilled at once when the queue is over its bound: about a millisecond of
# JSON and one write on the caller's thread, every SPILL_CHUNK calls' worth.
SPILL_CHUNK = 250
MAX_WARNINGS = 200  # kept for drain_warnings; older ones are only in the log


class Busy(Exception):
    """Another process is sending a spill file this tracker must send first."""


class Tracker:
    def __init__(self, tracking_uri: str, *, spill_dir: str | Path, max_queued: int | None = None,
                 log_warnings: bool = True) -> None:
        """`log_warnings=False` where the caller shows `drain_warnings()` and `close()`'s report
        itself (the driver's console): they go to the log at DEBUG, so the console says each once.
        A close cut short by an interrupt logs its report as a warning all the same."""
        self.tracking_uri = tracking_uri
        self._level = logging.WARNING if log_warnings else logging.DEBUG
        self.spill_dir = Path(spill_dir)
        self._max_queued = max(1, constants.TRACKING_MAX_QUEUED if max_queued is None else max_queued)
        self._lock = threading.Lock()
        self._queue: deque[Op] = deque()
        self._queued = 0  # weight of the queue
        self._run: RunHandle | None = None
        self._open: Op | None = None
        self._spill: SpillWriter | None = None
        self._header_written = False
        self._spilled_to = 0  # the own spill file's end after this tracker's last append
        self._sent_to = 0  # how far this tracker's last send of that file got
        self._unsent_points = self._unsent_ops = 0  # spilled since that file was last sent to its end
        self._stopped = False
        self._closing = threading.Event()
        self._deadline = math.inf
        self._wake = threading.Event()
        self._warnings: deque[str] = deque(maxlen=MAX_WARNINGS)
        self._writer: Writer | None = None
        self._leftovers: list[Path] | None = None
        self._failures = self._warned_at = self._sent_mark = self._spill_warned_at = 0
        self._spill_failed = False
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # -- the caller's side -------------------------------------------------------------------

    def open_run(self, *, experiment: str, run_key: str, run_name: str, floor_key: str = "train/loss") -> RunHandle:
        """The job's run: found by its run-key tag and resumed, or created (with the experiment).
        Returns at once; the run is resolved when the server answers."""
        if self._run is not None:
            raise RuntimeError("a Tracker tracks one run: open_run was called twice")
        path = spill_path(self.spill_dir, self.tracking_uri, run_key)
        try:
            # Only this user can read it: artifact copies (a config file) may hold what others should not see.
            self.spill_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            artifacts_dir(path).mkdir(exist_ok=True)
        except OSError as exc:
            raise UserError(f"tracking.spill_dir: cannot write to {self.spill_dir} ({exc.strerror})") from exc
        run = RunHandle(self, uuid.uuid4().hex)
        op = open_op(run.handle, experiment=experiment, run_key=run_key, run_name=run_name, floor_key=floor_key,
                     tracking_uri=server_name(self.tracking_uri))
        with self._lock:
            self._spill, self._open, self._run = SpillWriter(path), op, run
        self._put(op)
        return run

    @property
    def spill_file(self) -> Path | None:
        return self._spill.path if self._spill else None

    @property
    def queued_in_memory(self) -> int:
        """Operations and points in memory: at most `max_queued`."""
        with self._lock:
            return self._queued

    @property
    def waiting(self) -> int:
        """Operations and points queued in memory, plus those spilled and not sent since."""
        with self._lock:
            return self._queued + self._unsent_points + self._unsent_ops

    def drain_warnings(self) -> list[str]:
        """Warnings raised since the last call (also logged), for the driver's console."""
        drained = []
        while self._warnings:
            drained.append(self._warnings.popleft())
        return drained

    def _warn(self, message: str) -> None:
        log.log(self._level, "%s", message)
        self._warnings.append(message)

    def _put(self, op: Op) -> None:
        with self._lock:
            if self._stopped:  # after close: straight to the file, never lost
                self._spill_at_close([op])
                # and closed again: its shared lock kept the file from removal for the rest of the process
                self._spill.close()
                log.warning("MLflow: a %s operation after the tracker closed went to %s", op["op"], self.spill_file)
                return
            self._queue.append(op)
            self._queued += weight(op)
            if self._queued > self._max_queued:
                self._overflow()
            full = self._queued >= BATCH_LIMIT
        if full:
            self._wake.set()

    def _overflow(self) -> None:
        """Spill the oldest operations (lock held): memory stays bounded however long MLflow is down."""
        target = self._max_queued - max(1, min(SPILL_CHUNK, self._max_queued // 4))
        spilled: list[Op] = []
        while self._queue and self._queued > target:
            op = self._queue.popleft()
            self._queued -= weight(op)
            spilled.append(op)
        try:
            self._write_spill(spilled)
        except OSError as exc:  # a full or broken disk: keep them in memory rather than lose them
            self._queue.extendleft(reversed(spilled))
            self._queued += sum(map(weight, spilled))
            if not self._spill_failed:
                self._warn(f"MLflow: cannot write {self.spill_file} ({exc.strerror}); {self._queued} operations "
                           "and metric points stay in memory")
            self._spill_failed = True
            return
        spilled_now = self._unsent_points + self._unsent_ops
        if spilled_now >= 2 * self._spill_warned_at:
            self._spill_warned_at = spilled_now
            self._warn(f"MLflow has not taken {spilled_now + self._queued} operations and metric points; "
                       f"the oldest now wait in {self.spill_file} (sent from there once it answers)")

    def _write_spill(self, spilled: list[Op]) -> None:
        """Append to the own spill file (lock held); a handle's first line there is its open."""
        assert self._spill is not None and self._open is not None and self._run is not None
        if not self._header_written and spilled[0] is not self._open:
            resolved = self._run.resolution
            spilled = [dict(self._open, resolved=resolved.to_json() if resolved else None), *spilled]
        self._spilled_to = self._spill.append(spilled)
        self._header_written = True  # only once it is on disk: a failed write (a full disk) writes it next time
        points = sum(weight(op) for op in spilled if op["op"] == "metrics")
        self._unsent_points += points
        self._unsent_ops += len(spilled) - sum(op["op"] == "metrics" for op in spilled)

    def _stage(self, source: Path) -> str | None:
        """Copy an artifact file now, into the spill file's artifacts folder; its name there."""
        assert self._spill is not None
        if not source.is_file():
            self._warn(f"MLflow: artifact {source} is not a file; not logged")
            return None
        name = f"{uuid.uuid4().hex}/{utf8(source.name)}"  # as a spill line can carry it (ops.utf8)
        target = artifacts_dir(self._spill.path) / name
        try:
            target.parent.mkdir(parents=True)
            shutil.copyfile(source, target)
        except OSError as exc:
            self._warn(f"MLflow: cannot copy artifact {source} to {target.parent} ({exc.strerror}); not logged")
            return None
        return name

    def close(self, timeout_s: float | None = None) -> CloseReport:
        """Send what waits within `timeout_s` (TRACKING_CLOSE_TIMEOUT_S), spill the rest, report."""
        timeout_s = constants.TRACKING_CLOSE_TIMEOUT_S if timeout_s is None else timeout_s
        self._deadline = time.monotonic() + timeout_s
        self._closing.set()
        self._wake.set()
        try:
            self._thread.join(timeout_s)
        except BaseException:  # a second Ctrl-C cuts the wait short, not the spill: what waits is kept
            self._stop_and_spill()
            self._report(logging.WARNING)  # logged, as no caller shows it: where it went, the replay command
            raise
        self._stop_and_spill()
        return self._report()

    def _stop_and_spill(self) -> None:
        with self._lock:
            self._stopped = True  # a request still in flight is abandoned: its batch is spilled too
            rest = list(self._queue)
            self._queue.clear()
            self._queued = 0
            if rest:
                self._spill_at_close(rest)
        if self._spill is not None:
            self._spill.close()

    def _spill_at_close(self, rest: list[Op]) -> None:
        try:
            self._write_spill(rest)
        except OSError as exc:
            self._warn(f"MLflow: cannot write {self.spill_file} ({exc.strerror}); {sum(map(weight, rest))} "
                       "operations and metric points that MLflow did not take are lost")

    def _report(self, level: int | None = None) -> CloseReport:
        path = self.spill_file
        unsent = path is not None and not fully_sent(path)
        if path is not None and not unsent:
            with self._lock:  # an operation after close then starts a new file with the open line again:
                if remove_if_sent(path):  # without it, no replay could tell its run, and it was dropped
                    self._header_written = False
        others = [p for p in list(self._leftovers or []) if p != path and p.exists()]
        writer = self._writer
        with self._lock:
            points, operations = self._unsent_points, self._unsent_ops
        report = CloseReport(
            sent_points=writer.sent_points if writer else 0, sent_operations=writer.sent_operations if writer else 0,
            waiting_points=points, waiting_operations=operations, spill_file=path if unsent else None,
            replay_command=replay_command(path, self.tracking_uri) if path and unsent else None,
            other_replay_commands=tuple(replay_command(p, self.tracking_uri) for p in others),
            warnings=tuple(self.drain_warnings()),
        )
        for line in report.summary():
            log.log(self._level if level is None else level, "%s", line)
        return report

    # -- the sender thread -------------------------------------------------------------------

    def _send_loop(self) -> None:
        while not self._stopped:
            try:
                self._send_all()
            except Exception as exc:  # noqa: BLE001 - any failure means "try again later"
                self._failed(exc)
            else:
                if self._stopped:  # closed meanwhile: what was not sent is in the spill file
                    return
                self._answered()
            if self._closing.is_set() and (self._idle() or time.monotonic() >= self._deadline):
                return
            self._pause()

    def _is_stopped(self) -> bool:
        return self._stopped

    def _pause(self) -> None:
        if self._closing.is_set():
            if self._failures:
                time.sleep(max(0.0, min(self._backoff(), self._deadline - time.monotonic())))
        elif self._failures:
            self._closing.wait(self._backoff())  # closing cuts a back-off short
        else:
            self._wake.wait(constants.TRACKING_FLUSH_S)
            self._wake.clear()

    def _backoff(self) -> float:
        return min(constants.TRACKING_RETRY_BASE_S * 2 ** max(self._failures - 1, 0), constants.TRACKING_RETRY_MAX_S)

    def _idle(self) -> bool:
        with self._lock:
            return not self._queue and self._spilled_to <= self._sent_to and not self._leftovers

    def _send_all(self) -> None:
        """Everything waiting, in order; raises on the first failure (retried after a back-off)."""
        if self._writer is None:
            from orchestrator.tracking.store import Store

            self._writer = Writer(Store(self.tracking_uri, timeout_s=constants.TRACKING_REQUEST_TIMEOUT_S),
                                  live=lambda handle: self._run is not None and handle == self._run.handle)
        if self._leftovers is None:
            self._leftovers = pending_files(self.spill_dir, self.tracking_uri)
        self._send_leftovers(self._writer)
        if self._spill is not None:  # open_run was called
            self._send_own(self._writer)

    def _send_leftovers(self, writer: Writer) -> None:
        """Earlier jobs' spill files for this server, before anything of this run."""
        assert self._leftovers is not None
        while self._leftovers and not self._stopped:
            path = self._leftovers[0]
            try:
                done = send_file(path, writer, stop=self._is_stopped)
            except (RunRefused, UserError) as exc:  # cannot be sent as it is: left for a replay by hand
                self._warn(f"MLflow: {path} cannot be sent ({exc}); it stays for "
                           f"`{replay_command(path, self.tracking_uri)}`")
                done = None
            else:
                if done is None and path == self.spill_file:
                    raise Busy(f"{path} is being sent by another process")
                if done is not None and path == self.spill_file:
                    self._own_sent_to(done.offset)
                self._say_skipped(path, done)
            finally:
                self._publish(writer)
            self._leftovers.pop(0)  # a file another process is sending is left to it

    def _send_own(self, writer: Writer) -> None:
        """The own spill file while it has unsent lines (they are older than the queue), then the queue."""
        assert self._spill is not None
        files = artifacts_dir(self._spill.path)
        while not self._stopped:
            with self._lock:
                file_first = self._spilled_to > self._sent_to
                batch = [] if file_first else leading_batch(self._queue)
            if file_first:
                self._send_own_file(writer)
                continue
            if not batch:
                return
            writer.apply(batch, files=files)
            self._publish(writer)
            with self._lock:
                # A spill may have taken the batch meanwhile: then it is also in the file, and sent
                # again from there (MLflow keeps one copy).
                taken = bool(self._queue) and self._queue[0] is batch[0]
                for _ in batch if taken else ():
                    self._queued -= weight(self._queue.popleft())
            if taken:
                remove_staged(batch, files)

    def _send_own_file(self, writer: Writer) -> None:
        assert self._spill is not None
        done = send_file(self._spill.path, writer, stop=self._is_stopped)
        self._publish(writer)
        if done is None:
            raise Busy(f"{self._spill.path} is being sent by another process")
        self._say_skipped(self._spill.path, done)
        if not self._stopped and done.offset <= self._sent_to:
            raise RuntimeError(f"{self._spill.path}: no progress past byte {done.offset}")
        self._own_sent_to(done.offset)

    def _say_skipped(self, path: Path, done: Pass | None) -> None:
        if done is not None and (skipped := done.skipped()):
            self._warn(f"MLflow: {path}: {skipped}")

    def _own_sent_to(self, offset: int) -> None:
        with self._lock:
            self._sent_to = max(self._sent_to, offset)
            if self._sent_to >= self._spilled_to:
                self._unsent_points = self._unsent_ops = self._spill_warned_at = 0

    def _publish(self, writer: Writer) -> None:
        """Hand the run to the handle once resolved; pass on what MLflow refused."""
        run = self._run
        if run is not None and run.resolution is None and run.handle in writer.runs:
            run._resolve(writer.runs[run.handle])
        while writer.refusals:
            self._warn(f"MLflow: {writer.refusals.pop(0)}")

    def _failed(self, exc: Exception) -> None:
        if not self._failures:
            self._sent_mark = self._sent_total()
        self._failures += 1
        waiting_now = self.waiting
        if self._failures == 1 or waiting_now >= 2 * max(self._warned_at, 1):
            why = (f"MLflow: {exc}" if isinstance(exc, Busy)  # a local lock (`tracking replay`), not the server
                   else f"MLflow at {server_name(self.tracking_uri)} did not take the last request ({describe(exc)})")
            last = self._closing.is_set() and time.monotonic() >= self._deadline  # the close's time is up
            self._warn(f"{why}; {waiting_now} operations and metric points wait to be sent "
                       f"({'kept in the spill file' if last else 'retrying'})")
            self._warned_at = waiting_now

    def _answered(self) -> None:
        if self._failures:
            self._warn(f"MLflow at {server_name(self.tracking_uri)} answers again: "
                       f"sent {self._sent_total() - self._sent_mark} operations and metric points that waited")
        self._failures = self._warned_at = 0

    def _sent_total(self) -> int:
        return self._writer.sent_points + self._writer.sent_operations if self._writer else 0
