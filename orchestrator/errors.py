"""Errors a user can fix (`UserError`): one line on the command line, exit code 2, no traceback.

The type lives in `trainers.errors`, so that the trainers raise it without importing the
orchestrator; this is the name the orchestrator's modules use.
"""

from __future__ import annotations

from trainers.errors import UserError

__all__ = ["UserError"]
