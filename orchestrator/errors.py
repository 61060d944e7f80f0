"""Errors a user can fix (`UserError`): one line on the command line, exit code 2, no traceback.

The type (and `shown`) lives in `trainers.errors`, so that the trainers raise it without importing the
orchestrator; this is the name the orchestrator's modules use.
"""

from __future__ import annotations

from trainers.errors import UserError, first_line, shown

__all__ = ["BAD_HOST_NAME", "UserError", "given", "shown", "undecodable", "user_error_among", "worker_user_error"]

# Why socket.create_connection refuses a host name with a UnicodeError (IDNA), not an OSError.
BAD_HOST_NAME = "a part between its dots is empty or longer than 63 characters"


def undecodable(text: str) -> str | None:
    """The first byte of no UTF-8 text in `text`, as "0xNN" (argv and the environment carry such
    bytes as lone surrogates, on which YAML and encoders fail deep below); None when there is none."""
    bad = next((c for c in text if "\udc80" <= c <= "\udcff"), None)
    return None if bad is None else f"0x{ord(bad) - 0xdc00:02x}"


def given(value: str | None, flag: str, hint: str = "leave it out for the default or give a value") -> str | None:
    """A flag given empty (an unset shell variable, `--address "$RAY_ADDRESS"`) is refused, not
    read as "not given": that would quietly pick the default (an embedded Ray, another MLflow)."""
    if value is not None and not value.strip():
        raise UserError(f"{flag}: empty; {hint}")
    if value is not None and (bad := undecodable(value)):
        raise UserError(f"{flag}: not UTF-8 text (byte {bad})")
    return value


def worker_user_error(exc: BaseException) -> UserError | None:
    """A worker's UserError (its data went empty, no checkpoint of the run verifies) inside Ray
    Train's failure (`WorkerGroupError.worker_failures`, rank -> the worker's exception), as the
    one line to say; None for any other failure."""
    failures = getattr(exc, "worker_failures", None)
    return user_error_among(failures) if isinstance(failures, dict) else None


def user_error_among(failures: dict[int, BaseException]) -> UserError | None:
    """The lowest rank's UserError among a worker group's failures (rank -> exception), as one line."""
    found = [f for _, f in sorted(failures.items()) if isinstance(f, UserError)]
    return UserError(first_line(found[0])) if found else None
