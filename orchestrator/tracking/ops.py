"""What the tracker records: operations as JSON-ready dicts, one spill-file line each.

An operation names its kind (``op``), the run handle it belongs to (``handle``, a local id that
stands for the run until MLflow answers) and the time it was made (``t``, ms). Everything a later
send needs is taken at call time: values made strings and redacted, metric points with their own
step and timestamp, dicts rendered to text. Nothing here imports MLflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator.errors import shown
from orchestrator.redact import redact, redact_uri, scrub

log = logging.getLogger(__name__)

Op = dict[str, Any]

RUN_KEY_TAG = "orchestrator.run_key"
# The handle that created a run: a create request that timed out after the server stored it is
# recognised on retry as this handle's own run, not as a run to resume.
HANDLE_TAG = "orchestrator.tracker_handle"
# When the latest handle that resumed or created the run was opened (ms, the driver's clock): a
# spill file replayed later whose handle opened before it is stale (see `later_driver`).
OPENED_TAG = "orchestrator.opened_ms"
DESCRIPTION_TAG = "mlflow.note.content"
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
# A resumed run's params keep their first values (MLflow refuses a change); this tag says which differ.
CHANGED_PARAMS_TAG = "params.changed"
MAX_TAG_LEN = 8000  # MLflow's limit on a tag value
BATCH_LIMIT = 1000  # metric points per request (MLflow's log_batch limit)
STATUSES = ("FINISHED", "FAILED", "KILLED")
# A run key is looked up in an MLflow search filter (store.py): a quote in it would break the filter.
RUN_KEY = re.compile(r"[\w.:-]+")
NAME_MAX = 255  # bytes in a file name, on every common file system


def run_key(job_name: str, storage_path: str) -> str:
    """Identity of one job: the same name and checkpoint storage resume the same run. A URI
    (``s3://...``) is taken as written; only a local path is made absolute."""
    where = storage_path if "://" in storage_path else os.path.abspath(storage_path)
    return hashlib.sha256(f"{where}::{job_name}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ResolvedRun:
    """The MLflow run behind a handle, as the server answered when it was opened."""

    run_id: str
    experiment_id: str
    artifact_uri: str
    resumed: bool
    floor: int | None  # last step of the floor key when resumed: per-step points up to it are dropped
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    last_steps: dict[str, int] = field(default_factory=dict)
    # A driver opened the run after this handle did (a spill file replayed late): only what the run
    # lacks is sent, per-step points below `cut` (the first step logged after this handle opened).
    stale: bool = False
    cut: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResolvedRun:
        """Read back from a spill file or its progress record: TypeError unless every field has its type."""
        run = cls(**data)
        if not (all(isinstance(v, str) for v in (run.run_id, run.experiment_id, run.artifact_uri))
                and isinstance(run.resumed, bool) and isinstance(run.stale, bool)
                and all(v is None or _integer(v) for v in (run.floor, run.cut))
                and all(isinstance(m, dict) for m in (run.params, run.tags, run.last_steps))):
            raise TypeError(f"not a resolved run: {dict(data)!r:.200}")
        return run


def later_driver(open_ms: int, *, tags: Mapping[str, str], start_ms: int | None, end_ms: int | None) -> bool:
    """Whether a driver opened (or finished) the run after the handle opened at `open_ms`: the spill
    file of a job that could not reach MLflow, replayed after a later run of the job logged to it
    (from another spill_dir, or with the server spelled differently). All three times are drivers'
    clocks (open and finish operations), never the workers' that stamp metric points."""
    opened = tags.get(OPENED_TAG, "")
    times = (int(opened) if opened.isdigit() else None, start_ms, end_ms)
    return any(t is not None and t > open_ms for t in times)


def floor_and_cut(history: Iterable[tuple[int, int]], open_ms: int) -> tuple[int | None, int | None]:
    """For a stale handle, from the floor key's (step, timestamp ms) points: the last step logged
    before it opened (its floor) and the first logged after (by a later driver, which trains on
    from there: the stale file's points from that step on are that driver's to keep)."""
    steps = list(history)
    before = [step for step, ms in steps if ms < open_ms]
    after = [step for step, ms in steps if ms >= open_ms]
    return max(before, default=None), min(after, default=None)


def server_name(tracking_uri: str) -> str:
    """The tracking server as spill files name it: without credentials or a trailing slash."""
    return redact_uri(tracking_uri).rstrip("/")


def describe(exc: BaseException) -> str:
    """An exception in one short line for a warning, without credentials of any URL in it."""
    # SQLAlchemy may lead with a remark on how the error arose (autoflush); the error is the line after.
    lines = [line for line in str(exc).strip().splitlines() if not line.startswith("(raised as a result of")]
    return f"{type(exc).__name__}: {scrub(lines[0])[:200] if lines else ''}"


def _op(kind: str, handle: str, **fields: Any) -> Op:
    return {"op": kind, "handle": handle, "t": now_ms(), **fields}


def digest(text: str) -> str:
    """The short hash a spill file's name holds of its server and of its job's run key."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def key_digest(file_name: str, suffix: str) -> str | None:
    """The run key's digest in a spill file's name (`<server digest>-<key digest><suffix>`, as
    spill.spill_path names it); None for a name of another shape."""
    server, _, key = file_name.removesuffix(suffix).partition("-")
    return key if file_name.endswith(suffix) and len(server) == len(key) == 16 else None


def utf8(value: Any) -> str:
    """`str(value)` as UTF-8 can carry it: a lone surrogate (YAML's "\\udcff", a path's undecodable
    byte) shown escaped. MLflow cannot store one, and the request would fail, and be retried, for good."""
    return str(value).encode("utf-8", "backslashreplace").decode()


def now_ms() -> int:
    return int(time.time() * 1000)


def open_op(handle: str, *, experiment: str, run_key: str, run_name: str, floor_key: str,
            tracking_uri: str) -> Op:
    """Find the run by its run-key tag and resume it, or create it (and the experiment).
    `tracking_uri` is the redacted server this handle talks to: a resolution recorded with it is
    only trusted by a replay into the same server."""
    if not RUN_KEY.fullmatch(run_key):
        raise ValueError(f"run key must be letters, digits and . _ : -, got {run_key!r}")
    return _op("open", handle, experiment=utf8(experiment), run_key=run_key, run_name=utf8(run_name),
               floor_key=floor_key, tracking_uri=tracking_uri, resolved=None)


def metrics_op(handle: str, metrics: Mapping[str, Any], *, step: int, timestamp_ms: int | None,
               per_step: bool) -> Op | None:
    """Points at one step; None when no value is a number, or the step or time is past what MLflow stores."""
    try:
        at = (int(step), now_ms() if timestamp_ms is None else int(timestamp_ms))
    except (TypeError, ValueError, OverflowError):  # nan, inf
        at = (None, None)
    if not all(map(_int64, at)):  # a request MLflow fails, retried for good, all else waiting behind it
        log.warning("metrics at step %r, time %r ms: not 64-bit integers, as MLflow stores; not logged",
                    step, timestamp_ms)
        return None
    step, stamp = at
    points = []
    for key, value in metrics.items():
        try:
            # A tuple of plain values: the garbage collector stops tracking it (a long queue of
            # lists would lengthen every full collection in the driver).
            points.append((utf8(key), float(value), stamp, step))
        except (TypeError, ValueError):
            log.debug("metric %s=%r is not a number; not logged", key, value)
    return _op("metrics", handle, points=points, per_step=per_step) if points else None


def params_op(handle: str, params: Mapping[str, Any]) -> Op:
    """Secret-named keys masked, URIs stripped of credentials, values cut to MLflow's limit."""
    safe = redact(dict(params))
    return _op("params", handle, params={utf8(k): utf8(v)[:MAX_PARAM_LEN] for k, v in safe.items()})


def tags_op(handle: str, tags: Mapping[str, Any]) -> Op:
    return _op("tags", handle, tags={utf8(k): utf8(v) for k, v in redact(dict(tags)).items()})


def text_op(handle: str, content: str, name: str, *, new_run_only: bool) -> Op:
    return _op("text", handle, text=utf8(content), name=artifact_name(utf8(name)), new_run_only=new_run_only)


def dict_text(data: Any) -> str:
    """A dict as log_dict renders it, taken now (the caller may change `data` later)."""
    return json.dumps(data, indent=2, default=str)


def file_op(handle: str, staged: str, artifact_path: str | None, *, new_run_only: bool) -> Op:
    """`staged`: the copy made at call time, relative to the spill file's artifacts folder."""
    return _op("file", handle, staged=staged, artifact_path=artifact_path and utf8(artifact_path),
               new_run_only=new_run_only)


def dataset_op(handle: str, *, name: str, uri: str, rows: int, schema: Mapping[str, str],
               new_run_only: bool) -> Op:
    return _op("dataset", handle, name=utf8(name), uri=utf8(scrub(uri)), rows=int(rows),
               schema={utf8(k): utf8(v) for k, v in schema.items()}, new_run_only=new_run_only)


def finish_op(handle: str, status: str) -> Op:
    if status not in STATUSES:
        raise ValueError(f"run status must be one of {', '.join(STATUSES)}, got {status!r}")
    return _op("finish", handle, status=status)


def artifact_name(name: str) -> str:
    """A relative artifact path such as ``config/resolved.json``."""
    clean = posixpath.normpath(name) if name else ""
    if clean in ("", ".", "..") or clean.startswith(("/", "../")):
        raise ValueError(f"artifact name must be a relative file path, got {name!r}")
    if any(len(utf8(part).encode()) > NAME_MAX for part in clean.split("/")):  # no file system takes it
        raise ValueError(f"artifact name parts must be at most {NAME_MAX} bytes, got {shown(name)}")
    return clean


# The fields each kind of operation carries besides op, handle and t.
FIELDS = {
    "open": ("experiment", "run_key", "run_name", "floor_key"), "metrics": ("points", "per_step"),
    "params": ("params",), "tags": ("tags",), "text": ("text", "name"), "file": ("staged", "artifact_path"),
    "dataset": ("name", "uri", "rows", "schema"), "finish": ("status",),
}


INT64 = 2**63  # MLflow stores steps and times in 64-bit columns: a larger one fails, and is retried, for good


def _integer(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int64(v: object) -> bool:
    return _integer(v) and -INT64 <= v < INT64


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _time(v: object) -> bool:
    return _number(v) and -INT64 <= v < INT64  # NaN compares false: no time either


def _str(v: object) -> bool:
    """Text MLflow can store: a lone surrogate (a JSON "\\udcff" escape) it cannot."""
    return isinstance(v, str) and (v.isascii() or utf8(v) == v)


def _strings(v: object) -> bool:
    return isinstance(v, dict) and all(_str(k) and _str(x) for k, x in v.items())


def _point(p: object) -> bool:
    return (isinstance(p, list) and len(p) == 4 and _str(p[0]) and _number(p[1])
            and _int64(p[2]) and _int64(p[3]))


# What each field of a line read back must be (a line edited by hand, or planted, is skipped: one
# MLflow cannot store would otherwise be sent again and again, every later line waiting behind it).
_TYPES = {
    "handle": _str, "t": _time, "experiment": _str, "run_key": lambda v: _str(v) and bool(RUN_KEY.fullmatch(v)),
    "run_name": _str, "floor_key": _str,
    "per_step": lambda v: isinstance(v, bool), "points": lambda v: isinstance(v, list) and all(map(_point, v)),
    "params": _strings, "tags": _strings, "text": _str, "name": _str, "staged": _str,
    "artifact_path": lambda v: v is None or _str(v), "uri": _str, "rows": _integer, "schema": _strings,
    "status": lambda v: v in STATUSES,
}


def well_formed(op: object) -> bool:
    """Whether a line read back from a spill file is an operation this version can send."""
    return (isinstance(op, dict) and op.get("op") in FIELDS
            and all(k in op and _TYPES[k](op[k]) for k in ("handle", "t", *FIELDS[op["op"]])))


def weight(op: Op) -> int:
    """What an operation counts against the queue bound: its points, or one."""
    return len(op["points"]) if op["op"] == "metrics" else 1


def joins(first: Op, batch_weight: int, op: Op) -> bool:
    """Whether `op` can go in the request that starts with `first` and holds `batch_weight`:
    metric points of one handle and kind, up to MLflow's batch limit; any other operation goes alone."""
    return (op["op"] == first["op"] == "metrics" and op["handle"] == first["handle"]
            and op["per_step"] == first["per_step"] and batch_weight + weight(op) <= BATCH_LIMIT)


def leading_batch(ops: Iterable[Op]) -> list[Op]:
    """The first request's worth of `ops` (empty when there are none)."""
    batch: list[Op] = []
    total = 0
    for op in ops:
        if batch and not joins(batch[0], total, op):
            break
        batch.append(op)
        total += weight(op)
    return batch
