"""Checkpoint folders Ray Train does not track, pruned once a fit has ended.

Ray Train keeps `checkpoint.keep_last` of the checkpoints it registered and deletes the others;
a folder it never registered it never looks at again. Two kinds stay forever: the last step's
checkpoint of a driver killed after its workers finished (the rerun reports that step again in a
fresh folder, `checkpoint_<step>.1`), and a folder torn by a kill mid-save. Both are pruned here,
on local storage, after the fit (no save is under way):

- a folder Ray Train tracks is never touched (its next fit refuses a snapshot naming a missing one);
- the newest verified checkpoint, the one a resume reads, is always kept, and so are the
  `keep_last` newest verified ones, except an untracked copy of a step a newer one holds;
- a folder that fails verification is pruned only below a verified one (a newer one may be a save
  under way, or the user's to look at);
- only folders named as the trainer names them (`checkpoint_<step>`, `checkpoint_<step>.<n>`) directly
  in the run folder, never a symbolic link: `checkpoint_000000050.bak` or `checkpoint_notes` is the user's.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from trainers import checkpoint as ckpt

log = logging.getLogger(__name__)

def to_prune(folders: Iterable[str], *, tracked: set[str], step_of: Callable[[str], int | None],
             keep_last: int) -> list[str]:
    """Of `folders` (names, newest first), the untracked ones to delete. `step_of(name)`: the step a
    verified checkpoint holds, None for one that fails verification (asked only where it matters)."""
    kept_steps: set[int] = set()
    pruned: list[str] = []
    for name in folders:
        if len(kept_steps) >= keep_last:  # past the keep_last newest verified ones: none is needed
            if name not in tracked:
                pruned.append(name)
            continue
        step = step_of(name)
        if step is not None and step not in kept_steps:
            kept_steps.add(step)
        elif name not in tracked and (step is not None or kept_steps):  # a copy, or torn below a verified one
            pruned.append(name)
    return pruned


def prune_untracked(run_dir: Path, *, tracked: set[str], keep_last: int) -> list[str]:
    """Delete the untracked checkpoint folders `to_prune` names in `run_dir`; their names."""
    folders = [p for p in ckpt.candidates(run_dir) if not p.is_symlink() and ckpt.WRITTEN_NAME.fullmatch(p.name)]
    if all(p.name in tracked for p in folders):  # the usual case: nothing to verify (a large model's reads)
        return []

    def step_of(name: str) -> int | None:
        try:
            return ckpt.written_step(run_dir / name)  # not loaded: a large model's state is not held in memory
        except (ckpt.CorruptCheckpoint, OSError):
            return None

    names = to_prune([p.name for p in folders], tracked=tracked, step_of=step_of, keep_last=keep_last)
    for name in names:
        shutil.rmtree(run_dir / name, ignore_errors=True)
        log.info("pruned checkpoint folder %s (not tracked by Ray Train)", run_dir / name)
    return names


def prune_after_fit(run_dir: str, *, keep_last: int) -> None:
    """`prune_untracked` in a local run folder, the tracked names read from Ray Train's snapshot;
    a failure is logged (the fit's own outcome is what the driver acts on)."""
    import json

    from orchestrator.driver.identity import RAY_SNAPSHOT, snapshot_names

    if "://" in run_dir:  # object storage: verifying would download every checkpoint
        return
    folder = Path(run_dir)
    try:
        snapshot = folder / RAY_SNAPSHOT
        names = snapshot_names(json.loads(snapshot.read_text())) if snapshot.is_file() else []
        tracked = {name for name in names if isinstance(name, str)}
        prune_untracked(folder, tracked=tracked, keep_last=keep_last)
    except (OSError, ValueError) as exc:
        log.warning("checkpoint folders in %s not pruned: %s", folder, exc)
