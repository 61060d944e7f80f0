"""Files: profiles and plans as JSON, clusters as YAML, observations as a JSON list (or JSON
lines). A missing or malformed file, or a bad field in it, is one line naming the file."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

import yaml

from orchestrator.errors import UserError
from orchestrator.files import MAX_FILE_BYTES, load_yaml, read_json, read_text, read_yaml, unique_keys, write_text
from orchestrator.planner.base import Model
from orchestrator.planner.types import ClusterSpec, Observation

M = TypeVar("M", bound=Model)
# Where a run logs its observations in MLflow (a JSON list), for `orchestrator calibrate --experiment`.
OBSERVATIONS_ARTIFACT = "plan/observations.json"
# An observation carries its profile (~1 KB): 10,000 of them are ~10 MB, far above a config's limit.
MAX_OBSERVATIONS_BYTES = 256 * 2**20


def _validated(cls: type[M], raw: object, path: str | Path) -> M:
    try:
        return cls.from_dict(raw)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def load_json(cls: type[M], path: str | Path) -> M:
    return _validated(cls, read_json(path, cls.where), path)


def save_json(obj: Model, path: str | Path) -> Path:
    return write_text(path, json.dumps(obj.to_dict(), indent=2) + "\n")


def load_cluster(path: str | Path, *, own_only: bool = False) -> ClusterSpec:
    """Read a cluster YAML file; errors name the file and the field (`own_only`: a cache entry, `read_text`'s)."""
    raw = read_yaml(path, "cluster", own_only=own_only)
    if raw is None:
        raise UserError(f"{path}: file is empty")
    return _validated(ClusterSpec, raw, path)


def save_cluster(cluster: ClusterSpec, path: str | Path, *, follow_links: bool = True) -> Path:
    """Write `cluster` as YAML; a UserError, nothing written, if it would be more than `load_cluster`
    reads back (a cluster logged with tens of thousands of all-reduce samples). `follow_links=False`
    replaces a symbolic link at `path` rather than its target (a cache entry)."""
    text = yaml.safe_dump(cluster.to_dict(), sort_keys=False)
    size = len(text.encode())
    try:
        if size > MAX_FILE_BYTES:
            raise UserError(f"{path}: {size:,} bytes is too large for a cluster file (at most {MAX_FILE_BYTES:,})")
        load_yaml(text, path, "cluster")  # the value and nesting bounds a reader applies
    except UserError as exc:
        raise UserError(f"{exc}: not written ({len(cluster.allreduce_samples):,} all-reduce samples)") from None
    return write_text(path, text, follow_links=follow_links)


def load_observations(path: str | Path) -> list[Observation]:
    """Observations from a JSON list, one JSON object per line, or one JSON object (however laid out)."""
    path, text = read_text(path, "observations", max_bytes=MAX_OBSERVATIONS_BYTES)
    line = 0
    try:
        if text.lstrip().startswith("["):
            raw = json.loads(text, object_pairs_hook=unique_keys)
        else:
            raw = []
            for line, x in enumerate(text.splitlines(), 1):
                if x.strip():
                    raw.append(json.loads(x, object_pairs_hook=unique_keys))
    except json.JSONDecodeError as exc:
        # One observation pretty-printed (valid JSON) was refused as "not valid JSON (line 1)".
        if (one := _one_object(text)) is not None:
            raw = [one]
        else:
            raise UserError(f"{path}: not valid JSON (line {line or exc.lineno})") from None
    except ValueError as exc:  # an integer past Python's 4,300 digits
        raise UserError(f"{path}: not valid JSON ({str(exc)[:80]})") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be an observations file") from None
    try:
        return [Observation.from_dict(o, f"observations[{i}]") for i, o in enumerate(raw)]
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def _one_object(text: str) -> dict | None:
    try:
        found = json.loads(text, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError):  # a duplicated key too: the line's error stands
        return None
    return found if isinstance(found, dict) else None


def save_observations(observations: Iterable[Observation], path: str | Path) -> Path:
    return write_text(path, json.dumps([o.to_dict() for o in observations], indent=1) + "\n")
