"""Errors a user can fix. The CLI prints them as one line and exits 2, with no traceback.

Defined here, below everything, so the trainers (which import nothing from the orchestrator)
raise the same type the orchestrator's command line reports.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a config field, a file, a data set column, an address.

    The message is one line that names the field or file and what is wrong with it,
    e.g. ``training.lr: must be > 0, got -0.1``.
    """

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """An exception's first line (a library's multi-line message is no one-line error), else its type."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
