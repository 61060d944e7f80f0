"""Every timeout and poll interval in one place, each overridable by an environment variable.

Tests set them small; nothing else in the package hard-codes a wait.
"""

from __future__ import annotations

import os


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


# Driver polls the training progress actor this often (seconds).
PROGRESS_POLL_S = _env_float("ORCH_PROGRESS_POLL_S", 0.5)
# MLflow metric buffer: flush at least this often (seconds) from rank 0.
METRIC_FLUSH_S = _env_float("ORCH_METRIC_FLUSH_S", 2.0)
# Retry back-off for a tracking server that is down: first wait and cap (seconds).
TRACKING_RETRY_BASE_S = _env_float("ORCH_TRACKING_RETRY_BASE_S", 0.5)
TRACKING_RETRY_MAX_S = _env_float("ORCH_TRACKING_RETRY_MAX_S", 30.0)
# Wait for autoscaled GPUs to arrive before re-planning with what exists (seconds).
AUTOSCALE_TIMEOUT_S = _env_float("ORCH_AUTOSCALE_TIMEOUT_S", 300.0)
# Ray Jobs: poll interval while following a submitted job (seconds).
JOB_POLL_S = _env_float("ORCH_JOB_POLL_S", 1.0)
