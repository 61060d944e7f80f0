"""Submit jobs to a Ray cluster through the Ray Jobs API, and list, follow and stop them.

A submission packs everything the job needs on the cluster into a Ray runtime_env:

- ``working_dir``: the config file and the local files it names (relative data folders, a
  cluster spec), at the same relative paths, so the entrypoint runs as it would here;
- ``py_modules``: this checkout's ``orchestrator`` and ``trainers`` packages, so the cluster runs
  the code that was submitted even where the package is missing or older;
- ``pip``: only with ``--pip REQUIREMENTS``; cluster images normally carry torch, Ray and MLflow,
  and installing them per job takes minutes;
- ``env_vars``: ``MLFLOW_TRACKING_URI``, the telemetry opt-outs and ``ORCH_*`` settings from the
  submitting shell.
  Credentials are never shipped: a job's runtime_env is readable by anyone who can reach the
  dashboard, so tokens and passwords belong in the cluster nodes' own environment.

Each submission is its own job: the config's ``name`` gets a random suffix, which is also the
submission id. The MLflow run and the Ray Train checkpoints are keyed by that name, so submitting
the same config twice never touches the first job's run or checkpoints. ``--resume NAME`` reuses
a name to continue that job's run and checkpoints. User-facing notes: docs/cluster-jobs.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orchestrator
import trainers
from orchestrator import constants
from orchestrator.config import JobConfig, load_config
from orchestrator.errors import UserError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PASSED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")
PASSED_ENV_PREFIX = "ORCH_"
# Ray's dashboard accepts working_dir uploads up to 100 MiB.
SHIP_LIMIT_BYTES = 100 * 2**20
TOKEN_HINT = "set RAY_AUTH_TOKEN to the cluster's token (or RAY_AUTH_TOKEN_PATH to a file holding it)"
JOB_KEY = "orchestrator.job"
QUIET_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging")

Write = Callable[[str], Any]


@dataclass(frozen=True, slots=True)
class Submission:
    """One job, ready for `JobSubmissionClient.submit_job`."""

    submission_id: str
    job_name: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Packaging


def build_submission(
    config_path: str | Path,
    *,
    staging: Path,
    overrides: list[str] | None = None,
    workers: int | None = None,
    resume: str | None = None,
    requirements: Path | None = None,
) -> Submission:
    """Validate the config and stage its files in `staging` (the working_dir to upload)."""
    config_path = Path(config_path)
    overrides = list(overrides or [])
    suffix = secrets.token_hex(3)
    name = resume or f"{load_config(config_path, overrides).name}-{suffix}"
    overrides.append(f"name={name}")
    job = load_config(config_path, overrides)  # a bad --resume NAME fails here, naming `name`
    if requirements is not None and not requirements.is_file():
        raise UserError(f"--pip: {requirements} not found")
    shutil.copy2(config_path, staging / config_path.name)
    _stage_inputs(job, staging)
    args = ["python", "-m", "orchestrator", "run", config_path.name, "--address", "auto"]
    args += ["--workers", str(workers)] if workers else []
    args += [part for o in overrides for part in ("--set", o)]
    runtime_env: dict[str, Any] = {
        "working_dir": str(staging),
        "py_modules": [str(Path(m.__file__).parent) for m in (orchestrator, trainers)],
        "excludes": ["__pycache__", "*.pyc"],
        "env_vars": _passed_env(),
    }
    if requirements is not None:
        runtime_env["pip"] = str(requirements.resolve())
    return Submission(
        submission_id=f"{name}-resume-{suffix}" if resume else name, job_name=name,
        entrypoint=shlex.join(args), runtime_env=runtime_env,
        metadata={JOB_KEY: name, "orchestrator.config": config_path.name}, notes=_notes(job),
    )


def _stage_inputs(job: JobConfig, staging: Path) -> None:
    """Copy the relative paths the config reads into `staging`, under the same relative paths."""
    shipped = 0
    for field, path in _inputs(job):
        if "://" in path or os.path.isabs(path):
            continue  # storage the cluster reads itself
        if not Path(os.path.abspath(path)).is_relative_to(Path.cwd()):
            raise UserError(f"{field}: {path} is outside the current directory; give an absolute path or URI "
                            "the cluster can read")
        if not os.path.exists(path):
            if field == "data.path" and job.data.dataset is not None:
                continue  # a built-in data set: the job prepares it on the cluster
            raise UserError(f"{field}: {path} not found (relative paths are shipped with the job)")
        shipped += _size(Path(path))
        if shipped > SHIP_LIMIT_BYTES:
            raise UserError(f"{field}: {path} is too large to ship with the job (over "
                            f"{SHIP_LIMIT_BYTES // 2**20} MiB in all); put it where every node can read it "
                            "(an absolute shared path or s3://...)")
        _copy(Path(path), staging / path)


def _inputs(job: JobConfig) -> list[tuple[str, str]]:
    found = [("data.path", p) for p in job.data.paths]
    if job.resources.cluster:
        found.append(("resources.cluster", job.resources.cluster))
    return found


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst)


def _passed_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in PASSED_ENV or k.startswith(PASSED_ENV_PREFIX)}
    # Ray sends SIGTERM on `jobs stop`; the driver then writes a final checkpoint before this runs out.
    env["RAY_JOB_STOP_WAIT_TIME_S"] = str(int(constants.JOB_STOP_GRACE_S))
    return env


def _notes(job: JobConfig) -> tuple[str, ...]:
    notes = []
    storage = job.checkpoint.storage_path
    if "://" not in storage and not os.path.isabs(storage):
        notes.append(f"checkpoint.storage_path: '{storage}' is relative, so checkpoints stay in the job's "
                     "working directory on the cluster; use an absolute shared path or a URI to keep them")
    uri = job.resolved_tracking_uri()
    if uri is None:
        notes.append("tracking: MLFLOW_TRACKING_URI is not set, so the run is recorded inside the job's "
                     "working directory on the cluster; see docs/tracking-server.md")
    elif not uri.startswith(("http://", "https://", "databricks")):
        notes.append(f"tracking: {uri} is a local store, readable only on the node running the job; "
                     "see docs/tracking-server.md for a shared server")
    return tuple(notes)


# ---------------------------------------------------------------------------------------------
# The cluster


def resolve_address(address: str | None) -> str:
    """`--address`, else RAY_ADDRESS, as the dashboard URL the Jobs API lives at."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("--address: no Ray cluster given; pass --address http://HEAD:8265 or set RAY_ADDRESS")
    url = address if "://" in address else f"http://{address}"
    if urlsplit(url).scheme not in ("http", "https"):
        raise UserError(f"--address {address}: expected the Ray dashboard's http://HOST:PORT (usually port 8265)")
    return url.rstrip("/")


def auth_token() -> tuple[str | None, str]:
    """The token Ray's own clients would use, and where it came from (for error messages)."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token, "RAY_AUTH_TOKEN"
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        try:
            return Path(path).expanduser().read_text().strip() or None, f"RAY_AUTH_TOKEN_PATH ({path})"
        except OSError as exc:
            raise UserError(f"RAY_AUTH_TOKEN_PATH: cannot read {path} ({exc.strerror})") from None
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip() or None, str(default)
    return None, "no token"


class JobsClient:
    """The Ray Jobs API at one address; every cluster error becomes a one-line UserError."""

    def __init__(self, address: str | None) -> None:
        self.address = resolve_address(address)
        self._probe()
        token, self._token_source = auth_token()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        from ray.job_submission import JobSubmissionClient

        for name in QUIET_LOGGERS:  # Ray sets them to INFO: a line per upload and per log stream
            logging.getLogger(name).setLevel(logging.WARNING)
        with self._errors():
            self._client = JobSubmissionClient(self.address, headers=headers)

    def _probe(self) -> None:
        # requests waits minutes on an address that drops packets; a TCP connect says it in seconds.
        url = urlsplit(self.address)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=constants.RAY_CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise UserError(f"--address {self.address}: cannot reach the Ray dashboard "
                            f"({exc.strerror or type(exc).__name__})") from None

    @contextmanager
    def _errors(self, job_id: str | None = None) -> Iterator[None]:
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as exc:
            if "Authentication failed" in exc.message:  # 403: a token was sent and refused
                raise UserError(f"{self.address}: the Ray cluster rejected the token from "
                                f"{self._token_source}; {TOKEN_HINT}") from None
            raise UserError(f"{self.address}: the Ray cluster requires a token; {TOKEN_HINT}") from None
        except (ConnectionError, requests.exceptions.RequestException) as exc:
            raise UserError(f"--address {self.address}: the Ray dashboard stopped answering "
                            f"({type(exc).__name__})") from None
        except RuntimeError as exc:  # the Jobs API answered with an error status
            if job_id is not None and "status code 404" in str(exc):
                raise UserError(f"job {job_id}: no such job at {self.address} (see `orchestrator jobs list`)") from None
            raise UserError(f"{self.address}: the Ray Jobs API refused: {_first_line(str(exc))}") from None

    def submit(self, sub: Submission) -> str:
        deadline = time.monotonic() + constants.JOB_SUBMIT_RETRY_S
        while True:
            try:
                with self._errors():
                    return self._client.submit_job(entrypoint=sub.entrypoint, submission_id=sub.submission_id,
                                                   runtime_env=sub.runtime_env, metadata=sub.metadata)
            except UserError as exc:
                # A head that just started has no job agent yet; Ray says to try again later.
                if "try again later" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(constants.JOB_POLL_S)

    def list(self) -> list[Any]:
        with self._errors():
            jobs = [j for j in self._client.list_jobs() if j.submission_id]
        return sorted(jobs, key=lambda j: j.start_time or 0)

    def info(self, job_id: str) -> Any:
        with self._errors(job_id):
            return self._client.get_job_info(job_id)

    def status(self, job_id: str) -> str:
        return str(self.info(job_id).status)

    def logs(self, job_id: str) -> str:
        with self._errors(job_id):
            return self._client.get_job_logs(job_id)

    def stop(self, job_id: str) -> str:
        """Ask the job to stop (SIGTERM; Ray kills it JOB_STOP_GRACE_S later), then wait for a final status."""
        with self._errors(job_id):
            self._client.stop_job(job_id)
        return self.wait(job_id, timeout_s=constants.JOB_STOP_WAIT_S)

    def wait(self, job_id: str, *, timeout_s: float | None = None) -> str:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (status := self.status(job_id)) not in TERMINAL:
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(constants.JOB_POLL_S)
        return status

    def follow(self, job_id: str, write: Write) -> str:
        """Stream the job's logs until it ends; returns its final status."""
        self.info(job_id)  # an unknown id is a one-line error, not a websocket failure
        try:
            asyncio.run(self._tail(job_id, write))
        except UserError:
            raise
        except KeyboardInterrupt:
            print(f"stopped following; the job goes on: orchestrator jobs logs {job_id} --follow", file=sys.stderr)
            raise
        except Exception as exc:  # noqa: BLE001 - the stream broke; the job's status still tells the end
            print(f"log stream lost ({type(exc).__name__}); waiting for the job to end", file=sys.stderr)
        return self.wait(job_id)

    async def _tail(self, job_id: str, write: Write) -> None:
        with self._errors(job_id):
            async for chunk in self._client.tail_job_logs(job_id):
                write(chunk)


# ---------------------------------------------------------------------------------------------
# What the CLI calls


def submit_job(
    config_path: str | Path,
    *,
    address: str | None,
    overrides: list[str] | None = None,
    workers: int | None = None,
    resume: str | None = None,
    requirements: Path | None = None,
    follow: bool = False,
    write: Write = sys.stdout.write,
) -> int:
    """Submit one job; prints its id (and with `follow` its logs). Returns the exit code:
    0 once submitted (or, when following, on SUCCEEDED), 1 when a followed job did not succeed."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="orch-submit-") as staging:
        sub = build_submission(config_path, staging=Path(staging), overrides=overrides, workers=workers,
                               resume=resume, requirements=requirements)
        jobs = JobsClient(address)
        for note in sub.notes:
            print(f"note: {note}", file=sys.stderr)
        submission_id = jobs.submit(sub)  # uploads the working_dir before returning
    write(f"submitted {submission_id} to {jobs.address}\n")
    sys.stdout.flush()
    if not follow:
        return 0
    return exit_code(jobs.follow(submission_id, write))


def exit_code(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1


def format_jobs(jobs: list[Any]) -> list[str]:
    rows = [("ID", "STATUS", "STARTED", "MESSAGE")]
    rows += [(j.submission_id, str(j.status), _when(j.start_time), _first_line(j.message)[:60]) for j in jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows]


def format_info(info: Any) -> list[str]:
    lines = [f"{info.submission_id}: {info.status}"]
    if info.message:
        lines.append(f"  {_first_line(info.message)}")
    if name := (info.metadata or {}).get(JOB_KEY):
        lines.append(f"  job name: {name} (MLflow run name; --resume {name} continues it)")
    lines.append(f"  started {_when(info.start_time)}" + (f", ended {_when(info.end_time)}" if info.end_time else ""))
    return lines


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _first_line(text: str | None) -> str:
    return text.strip().splitlines()[0] if text and text.strip() else ""
