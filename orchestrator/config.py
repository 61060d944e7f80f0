"""The job config: one YAML file, typed and validated at load.

Unknown keys are rejected; every error names the field path and the bad value
(``training.lr: must be > 0, got -0.1``). ``--set a.b=c`` overrides any field before validation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from orchestrator.errors import UserError, shown, undecodable
from orchestrator.files import load_yaml, read_yaml
from orchestrator.redact import scrub, url_error
from trainers.config import (
    CheckpointConfig, ColumnConfig, DataConfig, ModelConfig, Section, TrainingConfig, WorkerConfig, fields_at,
)

__all__ = ["CheckpointConfig", "ColumnConfig", "DataConfig", "JobConfig", "ModelConfig", "ResourcesConfig",
           "TrackingConfig", "TrainingConfig", "WorkerConfig", "WorkerRange", "load_config", "validate"]


# The planner's own bounds (planner.types.MAX_GPUS; planner.base.MAX_DEADLINE_S in hours), restated:
# validating a config imports no numpy. A test checks they agree.
MAX_WORKERS = 65_536
MAX_CPUS_PER_WORKER = 4096  # past any machine; a Kubernetes CPU request stays a plain number
MAX_DEADLINE_HOURS = 1e6


class WorkerRange(Section):
    min: int = Field(gt=0, le=MAX_WORKERS)
    max: int = Field(gt=0, le=MAX_WORKERS)

    @model_validator(mode="after")
    def _ordered(self) -> WorkerRange:
        if self.min > self.max:
            raise ValueError(f"min must be <= max, got min={self.min} max={self.max}")
        return self


class ResourcesConfig(Section):
    workers: Literal["auto"] | int | WorkerRange = "auto"
    use_gpu: Literal["auto"] | bool = "auto"
    cpus_per_worker: float = Field(default=1.0, gt=0, le=MAX_CPUS_PER_WORKER)
    max_failures: int = Field(default=3, ge=-1)
    min_efficiency: float = Field(default=0.8, gt=0, le=1)
    objective: Literal["max_throughput", "min_cost", "max_goodput"] = "max_throughput"
    deadline_hours: float | None = Field(default=None, gt=0, le=MAX_DEADLINE_HOURS)
    budget: float | None = Field(default=None, gt=0)
    cluster: str | None = None  # ClusterSpec YAML; None: discovered from the live Ray cluster
    profile: bool = True  # profile (cached) and log the prediction even for a fixed worker count
    autoscale_timeout_s: float | None = Field(default=None, ge=0)
    # Ask the Ray autoscaler for the planned workers before launch: auto = only on a cluster whose
    # autoscaler can add nodes (not an embedded or static cluster).
    autoscale: Literal["auto"] | bool = "auto"
    # Online re-planning: with an elastic range, resize at a checkpoint when the refit plan wins.
    replan: bool = True

    @field_validator("workers")
    @classmethod
    def _positive_workers(cls, v: Any) -> Any:
        if isinstance(v, int) and not 0 < v <= MAX_WORKERS:
            raise ValueError(f"must be > 0 and at most {MAX_WORKERS:,} (the GPUs the planner plans), 'auto' or "
                             f"{{min, max}}, got {v if v.bit_length() < 64 else f'{v:.3e}'}")
        return v


# The tracking stores MLflow itself knows (a database dialect may name its driver: postgresql+psycopg2).
TRACKING_SCHEMES = ("", "file", "http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks",
                    "databricks-uc", "uc")


def sqlite_path(uri: str) -> str:
    """The file of a `sqlite:///path` URI (relative) or `sqlite:////path` (absolute), less any query."""
    return uri.split("://", 1)[1].removeprefix("/").split("?", 1)[0]


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # the driver's store when neither the config nor MLFLOW_TRACKING_URI names one
# The tables every MLflow sqlite store has, whatever its schema version.
MLFLOW_TABLES = frozenset({"experiments", "runs", "alembic_version"})


def sqlite_store_problem(path: str, *, empty: bool = True) -> str | None:
    """Why the existing file `path` must not be opened as an MLflow sqlite store (None: it is one,
    or with `empty` an empty database). MLflow adds its tables to whatever sqlite file it is given:
    an application's own database would be altered. Read-only: looking changes nothing in the file."""
    import sqlite3
    from contextlib import closing

    try:
        with closing(sqlite3.connect(f"{Path(os.path.abspath(path)).as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error as exc:
        return f"{path} is no sqlite database ({exc})"
    if (tables or not empty) and not MLFLOW_TABLES <= tables:  # none: nothing of anyone's to alter (a file just created)
        return (f"{path} is an sqlite database but no MLflow store (it lacks MLflow's tables "
                f"{', '.join(sorted(MLFLOW_TABLES - tables))}) and MLflow would add them to it; "
                "name a new file or an MLflow database")
    return None


def sqlite_create_problem(path: str) -> str | None:
    """Why sqlite could not create the database file `path` on this machine (None: nothing we can
    tell), where MLflow retried its "unable to open database file" for two minutes, four lines a try."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # a name past 255 bytes, a file where a folder would be
        return f"cannot create the database file {shown(path)} ({exc.strerror})"
    folder = next(p for p in Path(os.path.abspath(path)).parents if p.exists())  # MLflow makes the rest
    if not os.access(folder, os.W_OK):
        return f"cannot create the database file {shown(path)} ({folder} is not writable)"
    return None


def tracking_uri_problem(uri: str) -> str | None:
    """What is wrong with an MLflow tracking URI, ending in the URI as given less any credentials
    (None: nothing we can tell before sending to it)."""
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises on a port out of range or no number
        problem = None
    except ValueError as exc:
        problem = f"not a valid URI{url_error(uri, exc)}"
    else:
        if undecodable(uri):  # bytes of no UTF-8 text (argv, environment)
            problem = "not UTF-8 text"
        elif any(c < " " or c == "\x7f" for c in uri):  # urlsplit drops tabs and newlines; clients (and pods) get them
            problem = "holds a control character (such as a newline or tab); give the URI on one line"
        elif parts.scheme.split("+")[0] not in TRACKING_SCHEMES:
            problem = (f"scheme {parts.scheme!r} is no MLflow tracking store; use http(s)://HOST:PORT, a "
                       "database URI (sqlite:///..., postgresql://...) or a local folder")
        elif parts.scheme in ("http", "https") and (not parts.hostname or "\\" in parts.netloc):  # urllib, requests differ
            problem = ("no host; expected http://HOST:PORT" if not parts.hostname else "a backslash in its host part, "
                       "which clients read as different hosts; percent-encode it (%5C)")
        elif parts.scheme in ("http", "https") and any(c.isspace() for c in parts.hostname):
            # passed validation; every request then failed ("Invalid url") and the run spilled all it logged
            problem = "a space in its host name, which no host name holds"
        elif parts.scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
            # MLflow 3 refuses its folder store when the client opens (the tracker, calibrate, replay)
            problem = ("a folder is MLflow's file store, which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE=true "
                       "is set; use a database file (sqlite:///mlflow.db) or a server")
        elif parts.scheme.split("+")[0] == "sqlite" and os.path.isdir(sqlite_path(uri)):
            # MLflow retried "unable to open database file" for minutes (replay), or the run spilled
            # everything it logged as if the server were down
            problem = "names a folder, not a database file (e.g. sqlite:///FOLDER/mlflow.db)"
        elif parts.scheme.split("+")[0] == "sqlite" and os.path.isfile(sqlite_path(uri)):
            problem = sqlite_store_problem(sqlite_path(uri))
    # shown without the credentials it may carry, even when malformed
    return problem and f"{problem}, got {shown(scrub(uri))}"


def check_tracking_uri(uri: str | None, where: str) -> str | None:
    """`uri`, or a one-line UserError naming `where` (a flag or variable) and what is wrong."""
    if uri and (problem := tracking_uri_problem(uri)):
        raise UserError(f"{where}: {problem}")
    return uri


# MLflow's limits, without importing MLflow here (validation stays fast): mlflow.utils.validation's
# MAX_EXPERIMENT_NAME_LENGTH and the width of its SQL registry's registered_models.name column.
MAX_EXPERIMENT_NAME = 500
MAX_MODEL_NAME = 256


class TrackingConfig(Section):
    experiment: str = "default"
    tracking_uri: str | None = None
    registered_model: str | None = None
    log_system_metrics: bool = True
    # Where what the tracking server could not take waits for `orchestrator tracking replay` (and
    # for the next run against that server, which sends it by itself): a local folder, never the
    # checkpoint storage. None: $XDG_CACHE_HOME/orchestrator/tracking (~/.cache/...).
    spill_dir: str | None = None

    @field_validator("experiment")
    @classmethod
    def _an_experiment_name(cls, v: str) -> str:
        # MLflow's rule (mlflow.utils.validation._validate_experiment_name), before any run opens
        if not v.strip():
            raise ValueError(f"must be a name, got {v!r}")
        if len(v) > MAX_EXPERIMENT_NAME:
            raise ValueError(f"must be a name of 1 to {MAX_EXPERIMENT_NAME} characters (MLflow's limit), "
                             f"got {len(v):,} characters")
        return v

    @field_validator("registered_model")
    @classmethod
    def _a_model_name(cls, v: str | None) -> str | None:
        # MLflow's own rule (mlflow.utils.validation._validate_model_name, and its SQL stores' column
        # width), checked before training rather than found when the model is registered at the end
        if v is not None and (not v.strip() or any(c in v for c in "/:") or v == "." or v.startswith("..")):
            raise ValueError(f"must be a model name without '/' or ':' and not '.' or '..' (MLflow's rule), got {v!r}")
        if v is not None and len(v) > MAX_MODEL_NAME:
            raise ValueError(f"must be at most {MAX_MODEL_NAME} characters (MLflow's registry), got {len(v):,}")
        return v

    @field_validator("tracking_uri")
    @classmethod
    def _a_tracking_store(cls, v: str | None) -> str | None:
        if v and (problem := tracking_uri_problem(v)):
            raise ValueError(problem)
        return v


class RayConfig(Section):
    address: str | None = None  # None: an embedded local Ray (ray.init())


class JobConfig(Section):
    # A folder under checkpoint.storage_path (255 bytes on most filesystems), a Ray job id, an MLflow run name
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig
    checkpoint: CheckpointConfig = CheckpointConfig()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def worker_config(self) -> WorkerConfig:
        """The sections a training worker uses (model, data, training, checkpoint)."""
        return WorkerConfig(model=self.model, data=self.data, training=self.training, checkpoint=self.checkpoint)

    def digest(self) -> str:
        """Stable hash of everything that changes what is trained (used for profile caching)."""
        blob = json.dumps(
            {k: self.to_dict()[k] for k in ("model", "data", "training")}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def localized(self) -> JobConfig:
        """Local data and checkpoint paths made absolute, for processes with another cwd."""
        def absolute(path: str) -> str:
            return path if "://" in path else os.path.abspath(path)

        data = self.data.model_copy(update={"path": [absolute(p) for p in self.data.paths]})
        storage = absolute(self.checkpoint.storage_path)
        checkpoint = self.checkpoint.model_copy(update={"storage_path": storage})
        return self.model_copy(update={"data": data, "checkpoint": checkpoint})

    def resolved_tracking_uri(self) -> str | None:
        """`--set`/config, then MLFLOW_TRACKING_URI, then MLflow's default (None)."""
        return self.tracking.tracking_uri or check_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"),
                                                                "MLFLOW_TRACKING_URI") or None


# ---------------------------------------------------------------------------------------------
# Loading, overrides, error messages


def _format_loc(loc: tuple[Any, ...], *, unknown_key: bool = False) -> str:
    # pydantic puts union branch names ("int", "WorkerRange", "literal['auto']") into loc; the
    # user wrote only field names and list indices (and, for an unknown key, that key last).
    known = loc[:-1] if unknown_key else loc
    parts = [str(p) for p in known if isinstance(p, int) or p in _FIELD_NAMES]
    if unknown_key:
        parts.append(str(loc[-1]))
    return ".".join(parts) or "config"


def _collect_field_names(model: type[BaseModel], into: set[str]) -> set[str]:
    for name, field in model.model_fields.items():
        into.add(name)
        for arg in _model_types(field.annotation):
            _collect_field_names(arg, into)
    return into


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    args = getattr(annotation, "__args__", None) or (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


_FIELD_NAMES = _collect_field_names(JobConfig, set())


# What each pydantic type error says the value must be, in the user's YAML words.
_EXPECTED = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
    "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
    "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    "finite_number": "a finite number",
}


def _describe(error: dict[str, Any], alternatives: list[str]) -> str:
    where = _format_loc(error["loc"], unknown_key=error["type"] == "extra_forbidden")
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key (expected one of {', '.join(fields_at(JobConfig, error['loc'][:-1]))})"
    if error["type"] == "missing":
        return f"{where}: required field is missing"
    msg = error["msg"].removeprefix("Value error, ")
    ctx = error.get("ctx") or {}
    for bound, word in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if bound in ctx and error["type"].startswith(("greater", "less")):
            msg = f"must be {word} {ctx[bound]:g}"
    if error["type"] == "string_too_long":
        return f"{where}: must be at most {ctx['max_length']} characters, got {len(error['input']):,}"
    if error["type"] == "string_pattern_mismatch":
        msg = "must use only letters, digits, '_', '.', '-' and start with a letter or digit"
    if error["type"] in _EXPECTED or error["type"] == "literal_error":
        msg = "must be " + " or ".join(alternatives)
    if isinstance(error.get("input"), dict):  # a section-wide check: its message names the field
        field, sep, rest = msg.partition(": ")
        if sep and field in error["input"]:
            return f"{where}.{field}: {rest}"
        return f"{where}: {msg}"
    if "got" in msg:
        return f"{where}: {msg}"
    return f"{where}: {msg}, got {shown(error.get('input'))}"


def _alternatives(errors: list[dict[str, Any]], where: str) -> list[str]:
    """Everything a union field would accept, from its branches' errors at that location."""
    found: list[str] = []
    for e in errors:
        if _format_loc(e["loc"]) != where:
            continue
        if e["type"] == "literal_error":
            found.append((e.get("ctx") or {}).get("expected", ""))
        elif e["type"] in _EXPECTED:
            found.append(_EXPECTED[e["type"]])
    return list(dict.fromkeys(found))


def _pick_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    # A bad value in a union field yields one error per branch; the branch the user meant is
    # the one whose message is most specific (a value error or bound beats a type mismatch).
    rank = {"value_error": 0, "extra_forbidden": 0, "missing": 1}
    bound = ("greater", "less")  # {min: 0, max: 1}: the range's bound, not "must be 'auto' or an integer"
    return min(errors, key=lambda e: 0 if e["type"].startswith(bound) else
               rank.get(e["type"], 2 if "type" not in e["type"] else 3))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``training.lr=0.01`` -> (["training", "lr"], 0.01); the value is parsed as YAML."""
    # A byte of no UTF-8 text in argv arrives as a lone surrogate: YAML's parser raised a 100-line
    # UnicodeEncodeError on it.
    if bad := undecodable(text):
        shown = text.encode("utf-8", "backslashreplace").decode()
        raise UserError(f"--set {shown}: not UTF-8 text (byte {bad})")
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text}: expected KEY=VALUE, e.g. training.lr=0.01")
    try:  # bounded as a config file is: a "billion laughs" value would expand at every walk over it
        value = load_yaml(raw, f"--set {key.strip()}", "job config") if raw.strip() else None
    except yaml.constructor.ConstructorError as exc:
        if not str(exc.problem).startswith("duplicate key"):  # a tag: the text as written
            value = raw
        else:  # `{width: 8, width: 9}` read as the text "{width: 8, width: 9}": "must be a mapping, got '{...'"
            raise UserError(f"--set {key.strip()}: {exc.problem}") from None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in a copy of the raw YAML mapping, creating sections as needed."""
    data = json.loads(json.dumps(raw))
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise UserError(f"--set {text}: {where} is not a section")
            node = child
        node[path[-1]] = value
    return data


def validate(raw: Any, *, source: str = "config") -> JobConfig:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        chosen = _pick_error(errors)
        raise UserError(_describe(chosen, _alternatives(errors, _format_loc(chosen["loc"])))) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    raw = read_yaml(path, "config")
    if raw is None:
        raise UserError(f"{path}: file is empty")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return validate(apply_overrides(raw, overrides or []), source=str(path))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"training.lr": 0.01, ...} (lists kept as JSON), for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat
