"""The configs a training worker uses: model, data, training and checkpoint sections.

Typed and validated at load (pydantic; unknown keys rejected). The orchestrator's job config
(`orchestrator.config.JobConfig`) is made of these plus what only the driver reads (resources,
tracking, Ray); a worker receives a `WorkerConfig`, the four sections it trains from, and nothing
else.
"""

from __future__ import annotations

import posixpath
import types
import typing
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from trainers.errors import shown


class Section(BaseModel):
    """A config section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `true` as 1 for a number; YAML's true is never a batch size
        if isinstance(value, bool) and info.field_name:
            kinds = set(get_args(cls.model_fields[info.field_name].annotation)) or \
                {cls.model_fields[info.field_name].annotation}
            if bool not in kinds and kinds & {int, float}:
                what = "a number" if float in kinds else "an integer"
                raise ValueError(f"must be {what}, got {str(value).lower()}")
        return value


def model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that `loc` (a validation error's location) leads to from `model`; list
    indices and pydantic's union branch names are passed over. None where it leads to no model."""
    current: type[BaseModel] | None = model
    for part in loc:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is not None and (current := _model_in(field.annotation)) is None:
            return None
    return current


def fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys of the section `loc` leads to (an unknown key's error lists them)."""
    return list(getattr(model_at(model, loc), "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside `X`, `X | None` or `tuple[X, ...]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) in (typing.Union, tuple):
        return next((found for arg in typing.get_args(annotation) if (found := _model_in(arg)) is not None), None)
    return None


class ModelConfig(Section):
    name: str = Field(min_length=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class ColumnConfig(Section):
    column: str = Field(min_length=1)
    dtype: Literal["float32", "float64", "int32", "int64"]
    shape: list[int] | None = None

    @field_validator("shape", mode="before")
    @classmethod
    def _no_bool_in_shape(cls, v: Any) -> Any:
        if isinstance(v, list) and any(isinstance(d, bool) for d in v):
            raise ValueError(f"must be a list of integers, got {str(v).lower()}")
        return v

    @field_validator("shape")
    @classmethod
    def _positive_shape(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(d <= 0 for d in v)):
            raise ValueError(f"must be a non-empty list of positive sizes, got {v}")
        return v


# Schemes whose URI may name no host: `file:///data`, Ray Data's `local:///data` (the driver node's
# disk; pyarrow reads it as a local path too), and HDFS's `hdfs:///data` (the default namenode).
_HOSTLESS_SCHEMES = ("file", "local", "hdfs", "viewfs")


def _place_problem(path: str) -> str | None:
    """What makes `path` no place to read or write: a NUL byte (no file name holds one), or a URI
    naming no bucket or host (`s3://`, `gs:///x`: `validate` said ok; the job then failed in pyarrow)."""
    if "\0" in path:
        return f"holds a NUL byte, which no file name holds, got {path!r}"
    scheme, sep, rest = path.partition("://")
    # the host after any user:password@ (s3://KEY:SECRET@/x names no bucket either)
    if sep and scheme.lower() not in _HOSTLESS_SCHEMES and not rest.split("/", 1)[0].rpartition("@")[2].strip():
        return f"{scheme}:// names no bucket or host, got {path!r}"
    return None


def _path_key(path: str) -> str:
    """One spelling per place: `data/x`, `./data/x` and `data/x/` compare equal (a URI keeps its scheme)."""
    scheme, sep, rest = path.rpartition("://")
    return scheme + sep + posixpath.normpath(rest.strip()).rstrip("/")


class DataConfig(Section):
    dataset: str | None = None  # built-in data set name, prepared into `path` when missing
    path: str | list[str]  # Parquet file(s) or folder(s)
    features: ColumnConfig
    label: ColumnConfig | None = None  # None: language modelling on shifted feature tokens
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    dataset_kwargs: dict[str, Any] = Field(default_factory=dict)
    # Per-worker memory (MiB) for keeping the training shard after its first pass, so later epochs
    # index tensors instead of streaming through Ray Data again, and as much again for the
    # validation shard (evaluated from memory after its first pass); 0 streams every epoch.
    cache_mb: float = Field(default=1024, ge=0)

    @field_validator("path")
    @classmethod
    def _distinct_paths(cls, v: str | list[str]) -> str | list[str]:
        listed = [v] if isinstance(v, str) else v
        if any(not p.strip() for p in listed):  # "" reads the working directory
            raise ValueError(f"every path must name a file or folder, got {v!r}")
        if problem := next(filter(None, map(_place_problem, listed)), None):
            raise ValueError(problem)
        keys = [_path_key(p) for p in listed]
        first: dict[str, int] = {}  # each place's first index (linear: a listing of 40,000 shards took minutes)
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        if (again := next((k for i, k in enumerate(keys) if first[k] != i), None)) is not None:  # "/" keys as ""
            spellings = list(dict.fromkeys(p for p, k in zip(listed, keys) if k == again))
            said = " and ".join(spellings) + " (one place)" if len(spellings) > 1 else spellings[0] + " more than once"
            raise ValueError(f"lists {said}: its rows would be read twice")
        for inner, k in zip(listed, keys):
            # the places that hold k: each prefix that ends where k has a '/'
            parts = k.split("/")
            holders = [first[a] for a in ("/".join(parts[:j]) for j in range(1, len(parts))) if a in first]
            if holders:
                raise ValueError(f"lists {inner} inside {listed[min(holders)]}, also listed (its rows would be read twice)")
        return v

    @field_validator("label")
    @classmethod
    def _class_ids(cls, v: ColumnConfig | None) -> ColumnConfig | None:
        if v is not None and v.dtype.startswith("float"):  # the collate casts labels to int64 for cross-entropy
            raise ValueError(f"dtype must be int32 or int64: labels are class ids, and float ones would be cut "
                             f"(2.7 trains as class 2), got {v.dtype}")
        return v

    @model_validator(mode="after")
    def _one_folder_for_a_built_in_set(self) -> DataConfig:
        if self.dataset is not None and len(self.paths) != 1:
            raise ValueError(f"path: a built-in data set ({self.dataset}) is prepared into exactly one folder, "
                             f"got {len(self.paths)} paths")
        if self.dataset is not None and "://" in self.paths[0]:  # was prepared into a local ./s3:/bucket/x
            raise ValueError(f"path: a built-in data set ({self.dataset}) is prepared into a local folder, got the URI "
                             f"{self.paths[0]!r}; give a folder, or leave data.dataset out to read data put there")
        if self.dataset is None and self.dataset_kwargs:  # options nothing would use, silently dropped
            raise ValueError(f"dataset_kwargs: options for preparing a built-in data set, but data.dataset is not "
                             f"set ({', '.join(map(str, self.dataset_kwargs))} would be ignored)")
        return self

    @property
    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)

    @property
    def columns(self) -> list[str]:
        """The columns training reads: the features, then the label if any."""
        return [self.features.column] + ([self.label.column] if self.label else [])


MAX_SAMPLES = 2**53  # samples one job may train: the planner counts them exactly, in floats


class TrainingConfig(Section):
    epochs: int | None = Field(default=None, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    global_batch_size: int = Field(default=128, gt=0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    grad_accumulation: Literal["auto"] | int = "auto"
    max_local_batch: int | None = Field(default=None, gt=0)
    grad_clip: float | None = Field(default=None, gt=0)
    seed: int = Field(default=0, ge=0, lt=2**63)  # numpy's generators take no negative seed
    log_every: int = Field(default=1, gt=0)
    compile: bool = False

    @field_validator("grad_accumulation")
    @classmethod
    def _positive_accumulation(cls, v: str | int) -> str | int:
        if isinstance(v, int) and v <= 0:
            raise ValueError(f"must be > 0 or 'auto', got {v}")
        return v

    @model_validator(mode="after")
    def _one_length(self) -> TrainingConfig:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set epochs or max_steps")
        if isinstance(self.grad_accumulation, int) and self.grad_accumulation > self.global_batch_size:
            # each micro-batch holds a sample at least: more would train a larger batch than configured
            raise ValueError(f"grad_accumulation: {shown(self.grad_accumulation)} micro-batches per step is more than "
                             f"global_batch_size {self.global_batch_size:,} (each holds at least one sample)")
        if self.epochs is None and self.max_steps * self.global_batch_size > MAX_SAMPLES:
            raise ValueError(f"max_steps: {self.max_steps:,} steps of {self.global_batch_size:,} samples is more "
                             "than 2**53 samples; no job runs that long")
        return self


class CheckpointConfig(Section):
    every_steps: int = Field(default=100, gt=0)
    keep_last: int = Field(default=3, gt=0)
    storage_path: str = "runs"

    @field_validator("storage_path")
    @classmethod
    def _a_place(cls, v: str) -> str:
        if problem := _place_problem(v):
            raise ValueError(problem)
        return v


class WorkerConfig(Section):
    """What every training worker receives: the sections it trains from, nothing else."""

    model: ModelConfig
    data: DataConfig
    training: TrainingConfig
    checkpoint: CheckpointConfig = CheckpointConfig()
