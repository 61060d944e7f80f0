"""Training-state checkpoints: written atomically, checksummed, verified on load.

A checkpoint folder holds ``state.pt`` (model, optimizer, scheduler, step, RNG state) and
``manifest.json`` (step and the SHA-256 of ``state.pt``), each written under a temporary name and
renamed. ``state.pt`` holds tensors and plain containers only and is read with
``torch.load(weights_only=True)``: storage that anyone else can write (a shared volume, a bucket)
can hand us wrong weights, never code to run. Anything that fails to load is a corrupt checkpoint. Ray Train copies the folder into ``<storage_path>/<job name>/checkpoint_<step>`` (a copy
that is not atomic, hence the checksum) and keeps the last K; on resume the newest folder whose
checksum holds is used, and a corrupt or truncated one is reported and skipped.

The newest folder on disk may be newer than the one Ray Train hands back: the controller learns of
a report when it next polls the workers (every couple of seconds), so a worker killed right after
writing a checkpoint leaves one that Ray never registered. It is complete (the report copied it
before returning) and verified like any other, so resuming from it loses less work.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainers.errors import UserError

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
DIR_PREFIX = "checkpoint_"


def dir_name(step: int) -> str:
    return f"{DIR_PREFIX}{step:09d}"


# The names `dir_name` and `fresh_dir_name` give: the only folders a fit writes
WRITTEN_NAME = re.compile(re.escape(DIR_PREFIX) + r"[0-9]{9,}(\.[0-9]+)?")


def fresh_dir_name(run_dir: Path | None, step: int) -> str:
    """`dir_name(step)`, or ``checkpoint_<step>.<n>`` when a folder of that name exists: a job that
    resumed from before a corrupt checkpoint reaches that step again. Ray Train keeps the corrupt
    one registered, and evicting it later would delete a folder of the same name (the new one).
    Names still sort by step, the later attempt after the earlier."""
    name = dir_name(step)
    if run_dir is None or not (run_dir / name).exists():
        return name
    attempt = 1
    while (run_dir / f"{name}.{attempt}").exists():
        attempt += 1
    return f"{name}.{attempt}"


# What a storage says when it will not take a checkpoint: full, over quota, read-only, not ours.
UNWRITABLE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def unwritable(exc: OSError, run_dir: Path | None, name: str) -> UserError | None:
    """The storage refused checkpoint `name` (`exc`): bad input no restart mends (each one wrote
    another torn folder), as one line naming it; None for other errors. The part copied is removed:
    its name was fresh (`fresh_dir_name`), so it holds nothing written before."""
    if exc.errno not in UNWRITABLE:
        return None
    if run_dir is not None:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    where = run_dir / name if run_dir is not None else name
    return UserError(f"checkpoint.storage_path: cannot write {where} ({os.strerror(exc.errno)}); free space or make "
                     "it writable, then run the same command again to resume from the last checkpoint")


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values, which `weights_only` loading accepts."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write(folder: Path, state: dict[str, Any], *, step: int) -> Path:
    """Write state + manifest into `folder`; each file lands under a temporary name first."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    _atomic_write(folder / STATE_FILE, payload)
    manifest = {"step": step, "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    _atomic_write(folder / MANIFEST_FILE, json.dumps(manifest).encode())
    return folder


def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CorruptCheckpoint(Exception):
    pass


def _manifest(folder: Path) -> dict[str, Any]:
    manifest_path, state_path = folder / MANIFEST_FILE, folder / STATE_FILE
    if not manifest_path.is_file() or not state_path.is_file():
        raise CorruptCheckpoint(f"{folder}: missing {MANIFEST_FILE} or {STATE_FILE}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as exc:  # not JSON, not UTF-8, or an integer past Python's 4,300 digits
        raise CorruptCheckpoint(f"{manifest_path}: unreadable ({exc})") from None
    except RecursionError:  # thousands of nested brackets: past the decoder's stack
        raise CorruptCheckpoint(f"{manifest_path}: unreadable (nested too deeply)") from None
    if not isinstance(manifest, dict):
        raise CorruptCheckpoint(f"{manifest_path}: not a manifest")
    return manifest


def written_step(folder: Path) -> int:
    """The step a checkpoint folder holds, its state file checked against the manifest's size and
    sha256 as written, read in chunks and never loaded (a large model's state is not held in
    memory); CorruptCheckpoint otherwise. `read` is the full check, for a folder to resume from."""
    manifest, state_path = _manifest(folder), folder / STATE_FILE
    digest, size = hashlib.sha256(), 0
    with open(state_path, "rb") as f:
        while chunk := f.read(2**24):
            digest.update(chunk)
            size += len(chunk)
    step = manifest.get("step")
    if size != manifest.get("bytes") or digest.hexdigest() != manifest.get("sha256") or type(step) is not int:
        raise CorruptCheckpoint(f"{state_path}: does not match its manifest ({size} bytes, manifest says "
                                f"{manifest.get('bytes')})")
    return step


def read(folder: Path) -> dict[str, Any]:
    """Load and verify one checkpoint folder; CorruptCheckpoint says what is wrong."""
    manifest, state_path = _manifest(folder), folder / STATE_FILE
    payload = state_path.read_bytes()
    if len(payload) != manifest.get("bytes") or hashlib.sha256(payload).hexdigest() != manifest.get("sha256"):
        raise CorruptCheckpoint(
            f"{state_path}: checksum mismatch ({len(payload)} bytes, manifest says {manifest.get('bytes')})"
        )
    try:
        # weights_only: a pickle that names any callable (os.system, ...) is refused, not run.
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever fails to load is not a checkpoint we can use
        raise CorruptCheckpoint(f"{state_path}: not loadable as tensors ({type(exc).__name__}: "
                                f"{_first_line(exc)})") from None
    # a step both lack (None == None) is no checkpoint a resume, or the pruning after a fit, can place
    step = manifest.get("step")
    if not isinstance(state, dict) or type(step) is not int or state.get("step") != step:
        raise CorruptCheckpoint(f"{state_path}: does not hold the state of step {manifest.get('step')}")
    return state


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")[:200]


@dataclass(frozen=True, slots=True)
class Restored:
    state: dict[str, Any]
    folder: Path
    skipped: tuple[str, ...]  # one message per newer checkpoint that failed verification


def candidates(run_dir: Path) -> list[Path]:
    """Checkpoint folders of one run, newest step first."""
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(DIR_PREFIX)), reverse=True)


class UnusableCheckpoints(UserError):
    """Every checkpoint of a run failed verification: starting over would train (and log) its
    steps a second time, and retrying the worker group cannot mend a file."""


def restore_newest(run_dir: Path, apply: Callable[[dict[str, Any]], None] | None = None) -> Restored | None:
    """The newest verified checkpoint in a run folder, registered with Ray Train or not; None
    when the run has no checkpoint folder, UnusableCheckpoints when none of them verifies.

    `apply` (loading the state into the model and optimizer) is part of reading: a checkpoint it
    fails on (another model's weights, missing keys) is passed over like a corrupt one."""
    folders = candidates(run_dir)
    skipped: list[str] = []
    for folder in folders:
        try:
            state = read(folder)
            if apply is not None:
                apply_state(apply, state, folder)
            return Restored(state, folder, tuple(skipped))
        except CorruptCheckpoint as exc:
            log.warning("checkpoint %s is corrupt, trying the previous one: %s", folder.name, exc)
            skipped.append(str(exc))
    if folders:
        raise UnusableCheckpoints(
            f"checkpoint: none of the {len(folders)} checkpoints under {run_dir} is usable (the newest: "
            f"{skipped[0]}); move the damaged ones aside to resume from an older one, or start afresh with "
            "--new-run")
    return None


def apply_state(apply: Callable[[dict[str, Any]], None], state: dict[str, Any], folder: Path) -> None:
    try:
        apply(state)
    except Exception as exc:  # noqa: BLE001 - a state that does not fit this job is not its checkpoint
        raise CorruptCheckpoint(f"{folder}: does not fit this job ({type(exc).__name__}: {_first_line(exc)})") from None
