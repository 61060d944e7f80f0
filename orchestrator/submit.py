"""`orchestrator submit`: pack a job for a Ray cluster and send it through the Ray Jobs API.

A submission packs everything the job needs on the cluster into a Ray runtime_env:

- ``working_dir``: the config file, the local files it names (relative data folders, a cluster
  spec) at the same relative paths, so the entrypoint runs as it would here, and the entry script
  (`orchestrator.job_entry`) that picks the head's Python that can run the job. Only regular files
  travel: a link is followed only when it stays inside the current directory (a data folder
  holding a link to ``~/.ssh`` is refused, not uploaded), and the size limit counts the files as
  copied;
- ``py_modules``: this checkout's ``orchestrator`` and ``trainers`` packages, so the cluster runs
  the code that was submitted even where the package is missing or older;
- ``pip``: only with ``--pip REQUIREMENTS``; cluster images normally carry torch, Ray and MLflow,
  and installing them per job takes minutes;
- ``env_vars``: ``MLFLOW_TRACKING_URI``, the telemetry opt-outs and ``ORCH_*`` settings from the
  submitting shell, and ``ORCH_RESUME_HINT`` (the command that resumes this job, for the driver
  to print when it stops early).
  Credentials are never shipped: a job's runtime_env, entrypoint and working_dir are readable by
  anyone who can reach the dashboard, so every URI (environment, ``--set`` values, the config file)
  loses its userinfo and secret-named query parameters, and tokens and passwords belong in the
  cluster nodes' own environment (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``).

Each submission is its own job: the config's ``name`` gets a random suffix, which is also the
submission id. The MLflow run and the Ray Train checkpoints are keyed by that name, so submitting
the same config twice never touches the first job's run or checkpoints. ``--resume NAME`` reuses
a name to continue that job's run and checkpoints. User-facing notes: docs/cluster-jobs.md.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import orchestrator
import trainers
from orchestrator import constants
from orchestrator.config import JobConfig, load_config
from orchestrator.errors import UserError, given, undecodable
from orchestrator.files import read_yaml
from orchestrator.job_entry import entrypoint, write_entry
from orchestrator.ray_jobs import JOB_KEY, JobsClient, Write, shown
from orchestrator.redact import AMBIGUOUS_AT, SECRET_LAST, SECRET_WORDS, masked_fields, redact, secret_fields

PASSED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")
PASSED_ENV_PREFIX = "ORCH_"
# A shipped variable is held back on any of a secret's words anywhere in its name (redact's words, a
# config key's last words, their plurals and a personal access token's PAT).
SECRET_VARIABLE_WORDS = SECRET_WORDS | SECRET_LAST | {"tokens", "keys", "secrets", "pat"}
# What the job's driver prints, instead of "run the same command again", when it stops early.
RESUME_HINT_ENV = "ORCH_RESUME_HINT"
# Ray's dashboard accepts working_dir uploads up to 100 MiB.
SHIP_LIMIT_BYTES = 100 * 2**20
# Ray's uploader obeys these wherever they lie in the working_dir: a data folder's own `.gitignore`
# (`*`, to keep the data out of git) dropped the data from the upload. They mean nothing to the job.
UPLOAD_IGNORE_FILES = (".gitignore", ".rayignore")
CREDENTIALS_NOTE = ("credentials in a URI are not shipped (the job's runtime_env is readable by anyone "
                    "who can reach the dashboard): the job gets {uri}; give the cluster "
                    "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in its own environment or a "
                    "Kubernetes Secret")


@dataclass(frozen=True, slots=True)
class Submission:
    """One job, ready for `JobSubmissionClient.submit_job`."""

    submission_id: str
    job_name: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    notes: tuple[str, ...] = ()

    def job(self) -> dict[str, Any]:
        """The keyword arguments of `JobSubmissionClient.submit_job`."""
        return {"entrypoint": self.entrypoint, "submission_id": self.submission_id,
                "runtime_env": self.runtime_env, "metadata": self.metadata}


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
    address: str | None = None,
    insecure: bool = False,
) -> Submission:
    """Validate the config and stage its files in `staging` (the working_dir to upload). `address`
    and `insecure`, as the submit command was given them, go into the command that resumes the job."""
    config_path = Path(config_path)
    overrides = list(overrides or [])
    suffix = secrets.token_hex(3)
    given(resume, "--resume", "give the NAME of the job to continue (see `orchestrator jobs list`)")
    name = resume or f"{load_config(config_path, overrides).name}-{suffix}"
    try:
        job = load_config(config_path, [*overrides, f"name={name}"])
    except UserError as exc:  # a bad --resume NAME breaks the name rule: say it of the flag
        if resume and str(exc).startswith("name: "):
            raise UserError(f"--resume: {str(exc).removeprefix('name: ')}") from None
        raise
    if found := secret_fields(job.to_dict()):  # the entrypoint, config and runtime_env are the dashboard's to read
        raise UserError(f"{found[0]}: a secret would be shipped where anyone who can reach the Ray dashboard reads "
                        "it; give the job its secrets in the cluster's own environment")
    shipped_env = {k: os.environ[k] for k in _passed_names() if not _secret_variable(k)}
    if found := masked_fields({**job.to_dict(), **shipped_env}):
        raise UserError(f"{found[0]}: {AMBIGUOUS_AT}")  # stripped, the job would get the host after the '@'
    if requirements is not None and not requirements.is_file():
        why = "is not a file" if requirements.exists() else "not found"
        raise UserError(f"--pip: {requirements} {why} (a requirements.txt)")
    config_stripped = _stage_config(config_path, staging)
    _stage_inputs(job, staging)
    write_entry(staging)
    shipped = [_without_credentials(o) for o in overrides]
    sets = [part for o in [*shipped, f"name={name}"] for part in ("--set", o)]
    count = ["--workers", str(workers)] if workers else []
    env, held = _passed_env()
    pip = ["--pip", str(requirements)] if requirements is not None else []  # the job imports what it installs
    where = [*(["--address", shown(address)] if address else []), *(["--insecure"] if insecure else [])]
    env[RESUME_HINT_ENV] = shlex.join(["orchestrator", "submit", str(config_path), "--resume", name, *where, *count,
                                       *pip, *(part for o in shipped for part in ("--set", o))])
    runtime_env: dict[str, Any] = {
        "working_dir": str(staging),
        "py_modules": [str(Path(m.__file__).parent) for m in (orchestrator, trainers)],
        "excludes": ["__pycache__", "*.pyc"],
        "env_vars": env,
    }
    if requirements is not None:
        runtime_env["pip"] = str(requirements.resolve())
    stripped = config_stripped or shipped != overrides or env.get("MLFLOW_TRACKING_URI") != os.environ.get(
        "MLFLOW_TRACKING_URI")
    return Submission(
        submission_id=f"{name}-resume-{suffix}" if resume else name, job_name=name,
        entrypoint=entrypoint(["run", config_path.name, "--address", "auto", *count, *sets]),
        runtime_env=runtime_env, metadata={JOB_KEY: name, "orchestrator.config": config_path.name},
        notes=_notes(job, name, credentials_stripped=stripped) + _held_back(held),
    )


def _strip(text: str) -> str:
    # `redact` as MLflow params get it: urllib's split (secret query parameters), then the scrub that
    # also finds a URI inside a longer text and a password holding '/', which urllib splits wrongly
    return redact(text) if "://" in text else text


def _without_credentials(override: str) -> str:
    key, sep, value = override.partition("=")
    return f"{key}{sep}{_strip(value)}"


def _stage_config(config_path: Path, staging: Path) -> bool:
    """Copy the config into `staging`, rewritten without URI credentials if it has any; True then."""
    raw = read_yaml(config_path, "config")
    _utf8_name(Path(config_path.name), config_path)
    clean = _strip_uris(raw)
    if clean == raw:
        shutil.copy2(config_path, staging / config_path.name)  # byte for byte, comments kept
        return False
    (staging / config_path.name).write_text(yaml.safe_dump(clean, sort_keys=False))
    return True


def _strip_uris(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_uris(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_uris(v) for v in value]
    return _strip(value) if isinstance(value, str) else value


def _stage_inputs(job: JobConfig, staging: Path) -> None:
    """Copy the relative paths the config reads into `staging`, under the same relative paths."""
    root = Path.cwd().resolve()
    files: list[tuple[Path, Path]] = []
    shipped = 0
    for field, path in _inputs(job):
        if "://" in path or os.path.isabs(path):
            continue  # storage the cluster reads itself
        if not Path(os.path.abspath(path)).is_relative_to(Path.cwd()):
            raise UserError(f"{field}: {path} is outside the current directory; give an absolute path or URI "
                            "the cluster can read")
        if ".." in Path(path).parts:  # shipped under the path as written: '..' would climb out of the upload
            raise UserError(f"{field}: {path} climbs with '..'; write it from the current directory "
                            f"({os.path.relpath(os.path.abspath(path))}), as the job reads it there on the cluster")
        if not os.path.lexists(path):
            if field == "data.path" and job.data.dataset is not None:
                continue  # a built-in data set: the job prepares it on the cluster
            raise UserError(f"{field}: {path} not found (relative paths are shipped with the job)")
        found = shipped_files(field, Path(path), root)
        shipped += sum(source.stat().st_size for source, _ in found)
        if shipped > SHIP_LIMIT_BYTES:
            raise UserError(f"{field}: {path} is too large to ship with the job (over "
                            f"{SHIP_LIMIT_BYTES // 2**20} MiB in all); put it where every node can read it "
                            "(an absolute shared path or s3://...)")
        files += found
    for source, relative in files:
        target = staging / relative
        if not target.resolve().is_relative_to(staging.resolve()):  # never a file outside the upload
            raise UserError(f"data.path: {relative} would be written outside the job's upload")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def shipped_files(field: str, path: Path, root: Path, ancestors: frozenset[Path] = frozenset()
                  ) -> list[tuple[Path, Path]]:
    """(real source, relative destination) of every regular file under `path`, links followed only
    while they stay inside `root`: what the job uploads, to copy and to count."""
    real = path.resolve()
    if not real.is_relative_to(root):
        raise UserError(f"{field}: {path} leads to {real}, outside the current directory; links are followed "
                        "only inside it (copy the files in, or give an absolute path the cluster can read)")
    if real.is_dir():
        if real in ancestors:
            return []  # a link back up its own tree
        return [f for child in sorted(path.iterdir()) for f in shipped_files(field, child, root, ancestors | {real})]
    if not real.exists():
        raise UserError(f"{field}: {path} is a broken link")
    if not real.is_file() or path.name in UPLOAD_IGNORE_FILES:
        return []
    return [(real, _utf8_name(path, f"{field}: {path}"))]


def _utf8_name(path: Path, label: object) -> Path:
    # Ray zips the upload under UTF-8 names: a name holding a byte of no UTF-8 text (a lone surrogate
    # here) failed the upload with a traceback.
    if bad := undecodable(str(path)):
        shown_label = os.fsencode(str(label)).decode(errors="backslashreplace")  # the bytes as `ls -b` shows them
        raise UserError(f"{shown_label}: the name holds byte {bad}, which is not UTF-8 text; rename it "
                        "(Ray uploads a job's files under UTF-8 names)")
    return path


def _inputs(job: JobConfig) -> list[tuple[str, str]]:
    found = [("data.path", p) for p in job.data.paths]
    if job.resources.cluster:
        found.append(("resources.cluster", job.resources.cluster))
    return found


def _passed_env() -> tuple[dict[str, str], list[str]]:
    """The variables a job takes along, URIs stripped of credentials, and the names held back: a
    secret-named one (`ORCH_HF_TOKEN`) never travels, as anyone who can reach the dashboard reads a
    job's runtime_env."""
    wanted = _passed_names()
    env = {k: _strip(os.environ[k]) for k in wanted if not _secret_variable(k)}
    # Ray sends SIGTERM on `jobs stop`; the driver then writes a final checkpoint before this runs out.
    env["RAY_JOB_STOP_WAIT_TIME_S"] = str(int(constants.JOB_STOP_GRACE_S))
    return env, [k for k in wanted if _secret_variable(k)]


def _passed_names() -> list[str]:
    return sorted(k for k in os.environ if k in PASSED_ENV or k.startswith(PASSED_ENV_PREFIX))


def _secret_variable(name: str) -> bool:
    """A variable's name with a secret's word anywhere (ORCH_AUTH_TOKEN_VALUE, ORCH_TOKEN_2,
    ORCH_GITHUB_PAT): stricter than for config keys, which `pad_token_id` must pass; no setting of
    this program's own holds such a word, and one held back is said, not lost."""
    return bool(SECRET_VARIABLE_WORDS.intersection(re.split(r"[^a-z]+", name.lower())))


def _held_back(held: list[str]) -> tuple[str, ...]:
    return (f"{', '.join(held)}: not shipped, as a secret would be readable from the Ray dashboard; set it "
            "in the cluster's own environment (a Kubernetes Secret, the head's shell)",) if held else ()


def _notes(job: JobConfig, name: str, *, credentials_stripped: bool) -> tuple[str, ...]:
    notes = []
    storage = job.checkpoint.storage_path
    if "://" not in storage and not os.path.isabs(storage):
        notes.append(f"checkpoint.storage_path: '{storage}' is relative, so checkpoints stay in the job's "
                     "working directory on the cluster; use an absolute shared path or a URI to keep them")
    if job.data.dataset and not any(os.path.lexists(p) for p in job.data.paths):
        notes.append(f"data.path: {', '.join(job.data.paths)} does not exist here, so the job prepares a new copy "
                     f"of the built-in {job.data.dataset!r} data set there on the cluster")
    uri = job.resolved_tracking_uri()
    if uri is None:
        notes.append("tracking: MLFLOW_TRACKING_URI is not set, so the run is recorded inside the job's "
                     "working directory on the cluster; see docs/tracking-server.md")
    elif not uri.startswith(("http://", "https://", "databricks")):
        notes.append(f"tracking: {_strip(uri)} is a local store, readable only on the node running the job; "
                     "see docs/tracking-server.md for a shared server")
    if credentials_stripped:
        notes.append("tracking: " + CREDENTIALS_NOTE.format(uri=_strip(uri or "")))
    if job.tracking.registered_model:
        notes.append(f"tracking.registered_model: the model is registered as {job.tracking.registered_model!r} "
                     f"(a new version per job), not under the job name {name}")
    return tuple(notes)


# ---------------------------------------------------------------------------------------------
# What the CLI calls


def submit_job(
    config_path: str | Path,
    *,
    address: str | None,
    insecure: bool = False,
    overrides: list[str] | None = None,
    workers: int | None = None,
    resume: str | None = None,
    requirements: Path | None = None,
    follow: bool = False,
    write: Write = sys.stdout.write,
) -> int:
    """Submit one job; prints its id (and with `follow` its logs). Returns the exit code: 0 once
    submitted, or when following the job's outcome (`orchestrator.ray_jobs.exit_code`)."""
    with tempfile.TemporaryDirectory(prefix="orch-submit-") as staging:
        sub = build_submission(config_path, staging=Path(staging), overrides=overrides, workers=workers,
                               resume=resume, requirements=requirements, address=address, insecure=insecure)
        jobs = JobsClient(address, insecure=insecure)
        for note in sub.notes + _unknown_resume(jobs, resume):
            print(f"note: {note}", file=sys.stderr)
        submission_id = jobs.submit(**sub.job())  # uploads the working_dir before returning
    write(f"submitted {submission_id} to {shown(jobs.address)}\n")
    sys.stdout.flush()
    if not follow:
        return 0
    return jobs.follow(submission_id, write)


def _unknown_resume(jobs: JobsClient, resume: str | None) -> tuple[str, ...]:
    """A note when `--resume NAME` names no job this cluster knows: a typo trains a new job from
    step 0. Not refused: the cluster's job list is lost with its head (checkpoints are not)."""
    if not resume or any((j.metadata or {}).get(JOB_KEY) == resume for j in jobs.list()):
        return ()
    return (f"--resume {resume}: no job of that name was submitted to this cluster (`orchestrator jobs list`); "
            "it continues only if its checkpoints are in checkpoint.storage_path, else it starts at step 0",)
