"""One job, one identity: its storage prefix, an exclusive lock on it, and what it was run with.

A job is its name under its checkpoint storage: `<storage_path>/<name>/`. While a driver runs it,
that prefix holds a lock: a second concurrent run of the same job is refused with one line naming
the holder. The prefix also holds `job.json`: the config's digest (every field but those safe to
change between runs), the generation (`--new-run` starts the next one, in `run-<n>/`, with its own
MLflow run), and, once training finished, the final step, the MLflow run and the model version.
A rerun with a changed config is refused, naming the changed fields; a rerun of a finished job
says so and touches nothing. Storage URIs (`s3://...`) are used as given, never through abspath.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from orchestrator.config import JobConfig, flatten
from orchestrator.driver.lock import LEASE_FILE, JobLock
from orchestrator.errors import UserError
from orchestrator.redact import redact
from orchestrator.storage import Storage

STATE_FILE = "job.json"
# Ray Train's record of a run's checkpoints, in the run folder: read back when a fit starts there,
# and the checkpoints it lists past keep_last are deleted by the paths it names.
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
# Fields a rerun may change and still continue the same run: how long to train, how often to
# checkpoint and log, where and on what it runs, how it is tracked. Anything else changes what
# is trained, and continuing from the old checkpoints would train something nobody asked for.
SAFE_TO_CHANGE = ("training.max_steps", "training.epochs", "training.log_every", "training.compile",
                  "checkpoint.every_steps", "checkpoint.keep_last", "data.cache_mb", "resources.", "ray.",
                  "tracking.tracking_uri", "tracking.registered_model", "tracking.log_system_metrics",
                  "tracking.spill_dir")


def job_key(storage: str, name: str, generation: int = 1) -> str:
    """Identity of one run of a job: storage (path or URI, as given), name and generation. It keys
    the MLflow run, the progress actor and the autoscaler request. Spellings of one place key one
    job, as they share its lock and `job.json`: a trailing slash, and `file://` before a local path."""
    where = storage.removeprefix("file://") if storage.startswith("file:///") else storage
    where = where.rstrip("/") or where
    base = f"{where}::{name}" + (f"::{generation}" if generation > 1 else "")
    return hashlib.sha256(base.encode()).hexdigest()[:16]


def trained_fields(job: JobConfig) -> dict[str, Any]:
    """The flattened config fields that define what is trained (all but the safe ones)."""
    flat = flatten(job.to_dict())
    return {k: v for k, v in flat.items() if k != "name" and k != "checkpoint.storage_path"
            and not any(k == s or (s.endswith(".") and k.startswith(s)) for s in SAFE_TO_CHANGE)}


def digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class JobState:
    """`job.json`: what a job was run with, and how far it got."""

    name: str
    generation: int = 1
    config_digest: str = ""
    trained: dict[str, Any] = field(default_factory=dict)  # the fields in the digest (secrets masked)
    length: dict[str, Any] = field(default_factory=dict)  # training.max_steps / epochs when it finished
    finished: dict[str, Any] | None = None  # {step, at, run_id, model_version}
    counts: dict[str, int] = field(default_factory=dict)  # worker groups, restarts, resizes, re-plans so far
    # The run's re-plan decisions and observations so far: a rerun's artifacts hold them and its own.
    records: dict[str, list[Any]] = field(default_factory=dict)
    run_id: str | None = None  # the MLflow run, once it answered: a rerun stopped before it opens the run names it

    @classmethod
    def from_dict(cls, raw: Any, where: str = STATE_FILE) -> JobState:
        """The record as written; UserError naming `where` for anything else (a hand edit, a torn copy)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            problem = "no mapping with a job name"
        else:
            problem = next((f"{k} is {type(raw[k]).__name__}" for k, kinds in _FIELD_TYPES.items()
                            if k in raw and (not isinstance(raw[k], kinds) or isinstance(raw[k], bool))), None)
            if problem is None and not 1 <= raw.get("generation", 1) <= MAX_GENERATION:  # run-0, run--1: a
                problem = f"generation {raw['generation']} is no run of it"  # fresh run, silently beside the real one
        if problem:
            raise UserError(f"{where}: not a job record ({problem}); it holds what this job was run with: restore "
                            "it, or rename the job to start afresh")
        return cls(**{k: raw[k] for k in ("name", *_FIELD_TYPES) if k in raw})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "generation": self.generation, "config_digest": self.config_digest,
                "trained": self.trained, "length": self.length, "finished": self.finished, "counts": self.counts,
                "records": self.records, "run_id": self.run_id}


MAX_GENERATION = 2**31  # `--new-run`s of one job name
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "generation": int, "config_digest": str, "trained": dict, "length": dict, "finished": (dict, type(None)),
    "counts": dict, "records": dict, "run_id": (str, type(None))}


def _length(job: JobConfig) -> dict[str, Any]:
    return {"max_steps": job.training.max_steps, "epochs": job.training.epochs}


@dataclass
class JobIdentity:
    """The job's prefix in its storage, its lock and its recorded state."""

    job: JobConfig
    storage: Storage
    state: JobState
    lock: JobLock
    checkpoint_step: int = 0  # the step of the newest checkpoint Ray Train resumes from (its snapshot's)

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def key(self) -> str:
        return job_key(self.storage.uri, self.name, self.state.generation)

    @property
    def run_prefix(self) -> str:
        """This generation's run folder, relative to the storage."""
        return self.name if self.state.generation == 1 else posixpath.join(self.name, f"run-{self.state.generation}")

    @property
    def run_dir(self) -> str:
        """Where Ray Train keeps this generation's checkpoints (a path or URI)."""
        return self.storage.join(self.run_prefix)

    def check_ray_snapshot(self) -> None:
        """Refuse a Ray Train snapshot that names a checkpoint outside the run folder: Ray joins each
        name to the folder (an absolute name or '..' leads anywhere) and deletes those past keep_last,
        so one planted in a shared storage would delete any folder the job can. UserError naming it."""
        where = posixpath.join(self.run_prefix, RAY_SNAPSHOT)
        snapshot = self.storage.read_json(where)
        bad = next((n for n in snapshot_names(snapshot) if not _plain_name(n)), None)
        if bad is not None:
            raise UserError(f"{self.storage.join(where)}: names checkpoint {bad!r}, outside the run folder; Ray "
                            "Train would read it and delete it as an old checkpoint. Restore or remove the file, "
                            "or start afresh with --new-run")
        # Where the job stands before its workers say where they resumed: a stop while it prepares or
        # its group starts ends there, not at step 0.
        self.checkpoint_step = latest_step(snapshot)

    @property
    def complete(self) -> bool:
        """Trained to the end with this very config: nothing to do."""
        return self.state.finished is not None and self.state.length == _length(self.job)

    def save(self) -> None:
        self.storage.write_json(posixpath.join(self.name, STATE_FILE), self.state.to_dict())

    def mark_finished(self, *, step: int, run_id: str | None, model_version: str | None,
                      checkpoint: str | None = None) -> None:
        self.state.finished = {"step": step, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "run_id": run_id, "model_version": model_version, "checkpoint": checkpoint}
        self.state.length = _length(self.job)
        self.save()

    @property
    def model_pending(self) -> bool:
        """Finished, a model name configured, but the model never reached MLflow (it was down)."""
        return _model_owed(self.job, self.state)

    def mark_model(self, version: str, run_id: str | None) -> None:
        assert self.state.finished is not None
        self.state.finished.update(model_version=version, run_id=run_id or self.state.finished.get("run_id"))
        self.save()

    def save_counts(self, counts: dict[str, int]) -> None:
        """The run's numbered records (restart.N, resize.N, ...) continue from here on a rerun."""
        self.state.counts = dict(counts)
        self.save()

    @property
    def run_id(self) -> str | None:
        """The job's MLflow run as last recorded (before this field: as recorded when it finished)."""
        return self.state.run_id or (self.state.finished or {}).get("run_id")

    def save_run_id(self, run_id: str) -> None:
        self.state.run_id = run_id
        self.save()

    def save_records(self, name: str, rows: list[Any]) -> None:
        """The run's `replans` or `observations` so far, which a rerun's artifacts continue."""
        self.state.records = {**self.state.records, name: list(rows)}
        self.save()

    def release(self) -> None:
        self.lock.release()

    def check_held(self) -> None:
        """UserError once another driver took the job's lease over (this one missed its heartbeats)."""
        if self.lock.lost:
            raise UserError(f"{self.name}: the lock {self.storage.join(self.name, LEASE_FILE)} was taken over by "
                            f"{self.lock.lost} after this driver missed its heartbeats; stopping, so that two "
                            "drivers never train one job")


def _model_owed(job: JobConfig, state: JobState) -> bool:
    finished = state.finished or {}
    return bool(job.tracking.registered_model and finished.get("checkpoint") and finished.get("model_version") is None)


def finished_as_configured(job: JobConfig) -> bool:
    """Whether `job.json` says this job trained to the end with this very config, its model (if any)
    in MLflow: a read without the lock, so that a rerun skips the data check (`claim` decides)."""
    try:
        raw = Storage(job.checkpoint.storage_path).read_json(posixpath.join(job.name, STATE_FILE))
        state = JobState.from_dict(raw) if raw is not None else None
    except UserError:  # `claim` says what is wrong with the record
        return False
    return (state is not None and state.finished is not None and state.length == _length(job)
            and state.config_digest == digest(trained_fields(job)) and not _model_owed(job, state))


def snapshot_names(raw: Any) -> list[Any]:
    """Every checkpoint name a Ray Train snapshot holds (`checkpoint_dir_name` fields and the
    `*_checkpoint_dir_names` lists, wherever they are)."""
    found: list[Any] = []
    if isinstance(raw, dict):
        for key, value in raw.items():
            if key == "checkpoint_dir_name":
                found.append(value)
            elif isinstance(key, str) and key.endswith("checkpoint_dir_names") and isinstance(value, list):
                found += value
            else:
                found += snapshot_names(value)
    elif isinstance(raw, list):
        for value in raw:
            found += snapshot_names(value)
    return found


def latest_step(snapshot: Any) -> int:
    """The step of the latest checkpoint in a Ray Train snapshot (the loop reports it as `step`); 0
    without one."""
    latest = snapshot.get("latest_checkpoint_result") if isinstance(snapshot, dict) else None
    metrics = latest.get("metrics") if isinstance(latest, dict) else None
    step = metrics.get("step") if isinstance(metrics, dict) else None
    return step if type(step) is int and step > 0 else 0


def _plain_name(name: Any) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..")
            and not any(c in name for c in "/\\\x00"))


def claim(job: JobConfig, *, new_run: bool = False) -> JobIdentity:
    """Lock the job's prefix and check the config against what the job was run with.

    Refused (UserError, nothing written): another driver holds the job; the config changed in a
    field that changes what is trained (named), unless `new_run`. A first run records its state;
    `new_run` moves to the next generation (a fresh run beside the old one, which stays as it is).
    """
    storage = Storage(job.checkpoint.storage_path)
    lock = JobLock(storage, job.name)
    lock.acquire()
    try:
        return _check(job, storage, lock, new_run=new_run)
    except BaseException:
        lock.release()
        raise


def _check(job: JobConfig, storage: Storage, lock: JobLock, *, new_run: bool) -> JobIdentity:
    where = posixpath.join(job.name, STATE_FILE)
    raw = storage.read_json(where)
    trained = trained_fields(job)
    fresh = JobState(name=job.name, config_digest=digest(trained), trained=redact(trained), length=_length(job))
    if raw is None:
        identity = JobIdentity(job, storage, fresh, lock)
    else:
        previous = JobState.from_dict(raw, storage.join(where))
        if new_run:
            fresh.generation = previous.generation + 1
            identity = JobIdentity(job, storage, fresh, lock)
        elif previous.config_digest != fresh.config_digest:
            changed = sorted(k for k in set(trained) | set(previous.trained)
                             if redact(trained).get(k) != previous.trained.get(k))
            raise UserError(
                f"{job.name}: the config changed since this job ran ({', '.join(changed) or 'masked fields'}); "
                f"resuming would train something else. Use --new-run to start a fresh run under this name, "
                f"or rename the job")
        else:
            previous.trained = fresh.trained
            identity = JobIdentity(job, storage, previous, lock)
    identity.check_ray_snapshot()
    if raw is None or new_run:
        identity.save()
    return identity
