"""`tracking replay`: one spill file sent to a tracking store, and what it did, in lines.

What a replay sends, once however often it runs, is the spill file's (see
`orchestrator.tracking.spill`); this is the command's side: the file and the store checked, every
failure one line that says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator import constants
from orchestrator.errors import UserError
from orchestrator.tracking.ops import describe, server_name
from orchestrator.tracking.spill import SUFFIX, Pass, send_file
from orchestrator.tracking.writer import RunRefused, Writer


@dataclass(frozen=True)
class ReplayResult:
    points: int
    operations: int
    skipped_points: int  # per-step points at or below the resumed run's floor
    done: Pass
    refusals: tuple[str, ...]
    kept: int = 0  # a stale handle's operations left out: the run has a later driver's values

    @property
    def unreadable(self) -> int:
        return self.done.unreadable

    @property
    def incomplete(self) -> bool:
        return self.done.incomplete

    def lines(self, path: Path) -> list[str]:
        lines = [f"sent {self.points} metric points and {self.operations} other operations from {path}"]
        if self.skipped_points:
            lines.append(f"{self.skipped_points} per-step points were already in the resumed run; not sent again")
        if self.kept:
            lines.append(f"{self.kept} operations were not sent: the run has a later driver's values for them "
                         "(its status, tags, artifacts)")
        if self.done.ended:
            lines.append("the incomplete last line of a job that is no longer writing the file was ended and "
                         "read as it was (unreadable unless whole)")
        if skipped := self.done.skipped():
            lines.append(skipped)
        if self.incomplete:
            lines.append("an incomplete last line is left for a later replay: a running job is writing the file")
        return lines + list(self.refusals)


def replay(path: str | Path, tracking_uri: str) -> ReplayResult:
    """Send a spill file's unsent lines to `tracking_uri` (idempotent: see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such spill file")
    if not path.is_file():
        raise UserError(f"{path}: not a regular file (a spill file is one)")
    if path.suffix != SUFFIX:  # progress is recorded beside the file: not beside just any file
        raise UserError(f"{path}: not a spill file (their names end in {SUFFIX})")
    from orchestrator.tracking.store import Store

    server = server_name(tracking_uri)
    try:
        writer = Writer(Store(tracking_uri, timeout_s=constants.TRACKING_REQUEST_TIMEOUT_S))
    except UserError as exc:  # a store it must not open (a sqlite file that is no MLflow store)
        raise UserError(f"--tracking-uri: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - an unusable URI, said in one line
        raise UserError(f"--tracking-uri: {server}: {describe(exc)}") from exc
    try:
        done = send_file(path, writer, wait_s=constants.TRACKING_REPLAY_LOCK_WAIT_S)
    except RunRefused as exc:
        raise UserError(f"{path}: MLflow at {server} refused to open {exc}") from exc
    except UserError:  # the file's own progress record is damaged: said as it is, not blamed on MLflow
        raise
    except Exception as exc:  # noqa: BLE001 - no answer: the progress so far is recorded
        raise UserError(f"{path}: MLflow at {server} did not take it ({describe(exc)}); "
                        f"{writer.sent_points} points and {writer.sent_operations} operations were sent first: "
                        "run the same command again to send the rest") from exc
    if done is None:
        raise UserError(f"{path}: another process (a running job or a replay) is sending this file; "
                        "try again when it is done")
    return ReplayResult(writer.sent_points, writer.sent_operations, writer.skipped_points, done,
                        tuple(writer.refusals), writer.kept)
