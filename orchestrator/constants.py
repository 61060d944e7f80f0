"""Every timeout and poll interval in one place, each overridable by an environment variable.

Tests set them small; nothing else in the package hard-codes a wait.
"""

from __future__ import annotations

import math
import os

from orchestrator.errors import UserError


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise UserError(f"{name}: must be a number >= 0, got {value!r}")
    return number


# Driver polls the training progress actor this often (seconds).
PROGRESS_POLL_S = _env_float("ORCH_PROGRESS_POLL_S", 0.5)
# The driver waits this long for the progress actor to answer a drain or a stop's clearing (seconds);
# one that does not (its node lost, the actor stuck) is a missed poll: the driver stays free to act on
# a stop, and asks again at the next poll.
PROGRESS_ANSWER_S = _env_float("ORCH_PROGRESS_ANSWER_S", 5.0)
# A fit that ended while the progress actor did not answer is polled this many times more for its
# last events before the job ends on what was drained; a resize's stop that it does not clear is asked
# again as often before the job fails (no new group while the old stop stands).
PROGRESS_MISSES_AT_END = int(_env_float("ORCH_PROGRESS_MISSES_AT_END", 3))
# Rank 0 pushes its step and metrics to the progress actor at most this often (seconds); the first
# step of a worker group and every event go at once.
PROGRESS_PUSH_S = _env_float("ORCH_PROGRESS_PUSH_S", 0.25)
# Retry back-off for a tracking server that is down: first wait and cap (seconds).
TRACKING_RETRY_BASE_S = _env_float("ORCH_TRACKING_RETRY_BASE_S", 0.5)
TRACKING_RETRY_MAX_S = _env_float("ORCH_TRACKING_RETRY_MAX_S", 30.0)
# Wait for autoscaled GPUs to arrive before re-planning with what exists (seconds).
AUTOSCALE_TIMEOUT_S = _env_float("ORCH_AUTOSCALE_TIMEOUT_S", 300.0)
# Ray Jobs: poll interval while following a submitted job (seconds).
JOB_POLL_S = _env_float("ORCH_JOB_POLL_S", 1.0)
# Ray Jobs: how long to wait for the dashboard to take the connection, then to answer, before calling it
# unreachable (seconds).
RAY_CONNECT_TIMEOUT_S = _env_float("ORCH_RAY_CONNECT_TIMEOUT_S", 5.0)
# Ray Jobs: after `jobs stop`, the driver's time to write a final checkpoint before Ray kills it (seconds).
JOB_STOP_GRACE_S = _env_float("ORCH_JOB_STOP_GRACE_S", 60.0)
# Ray Jobs: how long `jobs stop` waits for the job to reach STOPPED before returning (seconds).
JOB_STOP_WAIT_S = _env_float("ORCH_JOB_STOP_WAIT_S", 90.0)
# Tracking: one request to a tracking server may take this long (seconds); the tracker retries on
# its own schedule, so MLflow's own retries (minutes, by default) are turned off for it.
TRACKING_REQUEST_TIMEOUT_S = _env_float("ORCH_TRACKING_REQUEST_TIMEOUT_S", 10.0)
# Ray Jobs: a head that just started refuses submissions until its job agent is up; retry this long (seconds).
JOB_SUBMIT_RETRY_S = _env_float("ORCH_JOB_SUBMIT_RETRY_S", 60.0)
# Profiler: stop climbing the batch-size ladder after this much time (seconds).
PROFILE_BUDGET_S = _env_float("ORCH_PROFILE_BUDGET_S", 20.0)
# Profiler: measure the Parquet pipeline's rate for this long (seconds).
PROFILE_DATA_S = _env_float("ORCH_PROFILE_DATA_S", 2.0)
# Autoscaling: how often the driver re-counts arrived workers (and prints a line) while it waits (seconds).
AUTOSCALE_POLL_S = _env_float("ORCH_AUTOSCALE_POLL_S", 2.0)
# Online re-planning: optimizer steps a worker group runs before its observed step time is trusted
# (the planner's refit takes the median of 20 steps after 5 warm-up steps), and again between two
# re-plans of the group, until a refit learns nothing new.
REPLAN_MIN_STEPS = int(_env_float("ORCH_REPLAN_MIN_STEPS", 25))
# Online re-planning: resize only when the refit plan beats the current worker count by this fraction
# of the objective (throughput, goodput or cost)...
REPLAN_MARGIN = _env_float("ORCH_REPLAN_MARGIN", 0.10)
# ...and the time it saves over the remaining steps exceeds what a restart costs (seconds).
RESIZE_COST_S = _env_float("ORCH_RESIZE_COST_S", 60.0)
# Online re-planning: at most this many resizes per job run (a guard against oscillation).
MAX_RESIZES = int(_env_float("ORCH_MAX_RESIZES", 2))
# Autoscaling: the job's request outlives the wait by this long (seconds). The driver withdraws it
# once the worker group runs (Ray Train keeps its own request then) or the job ends; the expiry
# cleans up after a driver that died first.
AUTOSCALE_REQUEST_TTL_S = _env_float("ORCH_AUTOSCALE_REQUEST_TTL_S", 600.0)
# Autoscaling (resources.autoscale: auto): how long to wait for a just-started head's autoscaler to
# report its node types before deciding the cluster has none (seconds).
AUTOSCALE_DETECT_S = _env_float("ORCH_AUTOSCALE_DETECT_S", 15.0)
# How long the driver waits, after killing its progress actor, for Ray to free the actor's name (seconds).
ACTOR_RELEASE_S = _env_float("ORCH_ACTOR_RELEASE_S", 10.0)
# Tracking (orchestrator.tracking): the driver's sender thread sends what waits at least this often
# (seconds); a full batch (1,000 points) goes at once.
TRACKING_FLUSH_S = _env_float("ORCH_TRACKING_FLUSH_S", 1.0)
# Tracking: operations and metric points held in memory while MLflow is down or slow; beyond this
# the oldest go to the job's spill file (a metric point counts one, any other operation one).
TRACKING_MAX_QUEUED = int(_env_float("ORCH_TRACKING_MAX_QUEUED", 100_000))
# Tracking: how long closing the tracker waits for a down server before spilling the rest (seconds).
TRACKING_CLOSE_TIMEOUT_S = _env_float("ORCH_TRACKING_CLOSE_TIMEOUT_S", 30.0)
# Tracking: `tracking replay` waits this long for a running job (or another replay) to finish its
# turn on a spill file before giving up (seconds).
TRACKING_REPLAY_LOCK_WAIT_S = _env_float("ORCH_TRACKING_REPLAY_LOCK_WAIT_S", 30.0)
# Tracking: how often a sender waiting for a spill file's lock tries again (seconds).
TRACKING_LOCK_POLL_S = _env_float("ORCH_TRACKING_LOCK_POLL_S", 0.05)
# Profiler: how long to wait for a node's GPUs (CPU slots) to be free together for the per-node
# contention measurement before planning without it, and then for its workers to warm up (seconds).
PROFILE_NODE_WAIT_S = _env_float("ORCH_PROFILE_NODE_WAIT_S", 30.0)
# Training workers: every node samples its CPU, memory and GPU memory this often for MLflow's
# system metrics (seconds; tracking.log_system_metrics turns them off).
SYSTEM_METRICS_S = _env_float("ORCH_SYSTEM_METRICS_S", 10.0)
# Training workers agree on a stop (Ctrl-C, `jobs stop`, a resize) every this many optimizer steps.
STOP_CHECK_EVERY = int(_env_float("ORCH_STOP_CHECK_EVERY", 5))
if STOP_CHECK_EVERY < 1:  # 0 (or 0.5) was `step % 0` in every worker: a ZeroDivisionError at step 1
    raise UserError(f"ORCH_STOP_CHECK_EVERY: must be a number of steps >= 1, got {os.environ['ORCH_STOP_CHECK_EVERY']!r}")
# A job's lock on object storage is a lease the driver renews this often; one not renewed for
# three of these is taken over (its driver died) (seconds).
LOCK_HEARTBEAT_S = _env_float("ORCH_LOCK_HEARTBEAT_S", 10.0)
# ...and two drivers racing for a free lease wait this long before reading back who won (seconds).
LOCK_SETTLE_S = _env_float("ORCH_LOCK_SETTLE_S", 1.0)
# ...and a lease that reads as no lease (caught mid-write, where the storage's writes are not atomic)
# is read again for this long before it is refused (seconds).
LOCK_READ_WAIT_S = _env_float("ORCH_LOCK_READ_WAIT_S", 3.0)
# probe-network: how long placing the probe's workers, or one of its measurements, may take (seconds).
PROBE_TIMEOUT_S = _env_float("ORCH_PROBE_TIMEOUT_S", 120.0)
