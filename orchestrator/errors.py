"""Errors a user can fix (`UserError`): one line on the command line, exit code 2, no traceback.

The type lives in `trainers.errors`, so that the trainers raise it without importing the
orchestrator; this is the name the orchestrator's modules use.
"""

from __future__ import annotations

from trainers.errors import UserError

__all__ = ["UserError", "given"]


def given(value: str | None, flag: str, hint: str = "leave it out for the default or give a value") -> str | None:
    """A flag given empty (an unset shell variable, `--address "$RAY_ADDRESS"`) is refused, not
    read as "not given": that would quietly pick the default (an embedded Ray, another MLflow)."""
    if value is not None and not value.strip():
        raise UserError(f"{flag}: empty; {hint}")
    return value
