"""What the CLI keeps quiet: library output that tells a user nothing they can act on.

Each is a default set before Ray or MLflow is imported (an environment variable the user can still
set otherwise) or a filter on one library logger for one message. docs/cluster-jobs.md ("Quiet
output") lists them, and what stays and why.
"""

from __future__ import annotations

import logging
import os

# Warnings dropped by (logger, text).
NOISE = (
    ("ray.data._internal.progress", "Progress bars disabled"),  # what RAY_DATA_DISABLE_PROGRESS_BARS asked for
    ("mlflow.utils.requirements_utils", "local version label"),  # torch's +cpu tag, left out on purpose
    # A traceback per failed write to a sqlite store (deleted, read-only, locked): the tracking path
    # says it in one line, keeps what was not taken, and says at the end how to send it.
    ("mlflow.store.db.utils", "SQLAlchemy database error"),
)


class _DropText(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_noise() -> None:
    """Before Ray or MLflow is imported: defaults a user can still override in the environment."""
    # Nothing phones home by default (MLflow's client otherwise reports usage to an outside host).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # The CLI draws one progress bar for training; Ray Data's own (a tqdm that is not installed in a
    # terminal, a block of lines every 10 s elsewhere) would interleave with it.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # MLflow's INFO lines (creating tables, waiting for a model version) repeat what the CLI prints.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for logger, text in NOISE:
        logging.getLogger(logger).addFilter(_DropText(text))
