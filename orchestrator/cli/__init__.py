"""`orchestrator` command line: parse, validate, build, run; user errors are one line, exit 2.

The commands live by concern: `train` (validate, run, data, profile), `planning` (plan,
probe-network, calibrate), `remote` (k8s, submit, jobs, tracking); `app` holds the tree."""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Any

import typer
from rich.markup import escape

from orchestrator.cli import train, planning, remote  # noqa: F401,I001 - each registers its commands, in this order
from orchestrator.cli.app import app, console, note
from orchestrator.errors import UserError
from orchestrator.files import named
from orchestrator.quiet import quiet_noise

__all__ = ["app", "main"]


def main() -> None:
    """Entry point. Exit codes: 0 done, 2 bad input (a UserError or a usage error: one line, no
    traceback), 130 interrupted; `run` stopped by a signal (a final checkpoint written) exits 128 +
    that signal (130 Ctrl-C, 143 SIGTERM); `submit --follow` and `jobs logs --follow` add 1 (FAILED)
    and 3 (STOPPED), see `orchestrator.ray_jobs.exit_code`."""
    from typer._click.exceptions import ClickException, UsageError as ClickUsageError

    quiet_noise()
    level = os.environ.get("ORCH_LOG_LEVEL", "WARNING")
    if not isinstance(logging.getLevelName(level.upper()), int):
        note(f"[red]error:[/red] ORCH_LOG_LEVEL: must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {escape(repr(level))}")
        sys.exit(2)
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        from orchestrator import constants  # noqa: F401 - an ORCH_... variable that is no number: one line
        # standalone_mode=False: typer raises usage errors instead of printing its boxed help, and
        # returns (not raises) the code of a `typer.Exit`.
        code = app(standalone_mode=False)
    except UserError as exc:
        note(f"[red]error:[/red] {escape(str(exc))}")
        code = exc.exit_code
    except OSError as exc:  # a path no check caught: a name past 255 bytes, a link loop, no permission
        if exc.errno not in _PATH_ERRORS or exc.filename is None:
            raise
        note(f"[red]error:[/red] {escape(f'{named(exc.filename)}: {exc.strerror}')}")
        code = 2
    except ClickUsageError as exc:  # no or unknown command, unknown option, missing argument, bad value
        _usage_error(exc.ctx, exc.format_message())
        code = exc.exit_code
    except ClickException as exc:
        note(f"[red]error:[/red] {escape(exc.format_message())}")
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


_PATH_ERRORS = {errno.ENAMETOOLONG, errno.ELOOP, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EROFS,
                errno.ENOSPC, errno.EDQUOT}  # and a full disk or quota where a file is written


def _usage_error(ctx: Any, message: str) -> None:
    """The usage line, then one error line (listing the commands where one is missing or unknown)."""
    message = message.rstrip(".")
    suggested = "Did you mean" in message  # typer's own guess at a mistyped command
    if ctx is not None and (names := _command_names(ctx)) and "command" in message.lower() and not suggested:
        message += f"; one of: {', '.join(names)}"
    if ctx is not None:
        console.print(ctx.get_usage(), highlight=False, markup=False, soft_wrap=True)
        message += f" (see `{ctx.command_path} --help`)"
    note(f"[red]error:[/red] {escape(message)}")


def _command_names(ctx: Any) -> list[str]:
    return sorted(ctx.command.list_commands(ctx)) if hasattr(ctx.command, "list_commands") else []
