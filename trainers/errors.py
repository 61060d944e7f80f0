"""Errors a user can fix. The CLI prints them as one line and exits 2, with no traceback.

Defined here, below everything, so the trainers (which import nothing from the orchestrator)
raise the same type the orchestrator's command line reports.
"""

from __future__ import annotations

import math
from typing import Any


class UserError(Exception):
    """Bad input: a config field, a file, a data set column, an address.

    The message is one line that names the field or file and what is wrong with it,
    e.g. ``training.lr: must be > 0, got -0.1``.
    """

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """An exception's first line (a library's multi-line message is no one-line error), else its type."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def shown(value: Any) -> str:
    """A bad value as an error line shows it: `repr`, an integer of hundreds of digits by its size,
    anything longer cut with its length, so the line stays one short line."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 100:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"
