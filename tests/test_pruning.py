"""Checkpoint folders Ray Train does not track, pruned after a fit (`orchestrator/driver/pruning.py`):
the pure decision, and the folders on disk with a Ray Train snapshot beside them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from orchestrator.driver.pruning import prune_after_fit, prune_untracked, to_prune
from trainers import checkpoint as ckpt


def steps(**by_name: int | None):
    return lambda name: by_name[name]


def test_the_last_steps_copy_left_by_a_resume_at_the_last_step_is_pruned() -> None:
    # A driver killed after training ended; the rerun reported step 60 again as checkpoint_60.1.
    names = ["c60.1", "c60", "c50", "c40"]
    assert to_prune(names, tracked={"c60.1", "c50", "c40"}, step_of=steps(**{"c60.1": 60, "c60": 60, "c50": 50,
                                                                            "c40": 40}), keep_last=3) == ["c60"]


def test_untracked_folders_past_keep_last_are_pruned_tracked_ones_left_to_ray() -> None:
    names = ["c200", "c150", "c100", "c60", "c50"]
    assert to_prune(names, tracked={"c200", "c150", "c100", "c50"}, step_of=steps(c200=200, c150=150, c100=100),
                    keep_last=3) == ["c60"]


def test_a_torn_folder_is_pruned_below_a_verified_one_never_as_the_newest() -> None:
    torn_below = to_prune(["c100.1", "c100", "c50"], tracked={"c100.1", "c50"},
                          step_of=steps(**{"c100.1": 100, "c100": None, "c50": 50}), keep_last=3)
    assert torn_below == ["c100"]
    # The newest folder torn (a kill mid-save, or a save under way): kept, and so is what a resume reads.
    assert to_prune(["c150", "c100"], tracked=set(), step_of=steps(c150=None, c100=100), keep_last=1) == []
    # A verified checkpoint Ray never registered (a worker killed right after saving) is the newest: kept.
    assert to_prune(["c150", "c100"], tracked={"c100"}, step_of=steps(c150=150, c100=100), keep_last=1) == []


def _save(run_dir: Path, name: str, step: int) -> Path:
    return ckpt.write(run_dir / name, {"step": step, "model": {"w": torch.ones(2)}}, step=step)


def test_after_a_fit_untracked_copies_and_torn_folders_go_and_nothing_else(tmp_path: Path) -> None:
    run_dir, outside = tmp_path / "runs" / "job", tmp_path / "precious"
    for name, step in [("checkpoint_000000060.1", 60), ("checkpoint_000000060", 60), ("checkpoint_000000050", 50),
                       ("checkpoint_000000040", 40), ("checkpoint_000000020", 20)]:
        _save(run_dir, name, step)
    torn = _save(run_dir, "checkpoint_000000030", 30)
    (torn / ckpt.STATE_FILE).write_bytes(b"torn")
    _save(outside, "checkpoint_000000010", 10)
    (run_dir / "checkpoint_000000010").symlink_to(outside / "checkpoint_000000010")
    tracked = ["checkpoint_000000060.1", "checkpoint_000000050", "checkpoint_000000040"]
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": n} for n in tracked],
         "latest_checkpoint_result": {"checkpoint_dir_name": tracked[0]}}))
    prune_after_fit(str(run_dir), keep_last=3)
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint_0")) == [
        "checkpoint_000000010", "checkpoint_000000040", "checkpoint_000000050", "checkpoint_000000060.1"]
    assert ckpt.read(outside / "checkpoint_000000010")["step"] == 10  # a link's target is never touched
    assert ckpt.restore_newest(run_dir).folder.name == "checkpoint_000000060.1"


def test_a_folder_the_trainer_never_names_is_the_users_and_never_pruned(tmp_path: Path) -> None:
    # sorted among the checkpoints by name: below the verified ones (torn, or a copy past keep_last)
    run_dir = tmp_path / "job"
    for step in (40, 50, 60):
        _save(run_dir, f"checkpoint_{step:09d}", step)
    _save(run_dir, "checkpoint_000000040.bak", 40)
    (run_dir / "checkpoint_-notes").mkdir()
    (run_dir / "checkpoint_-notes" / "mine.txt").write_text("the user's")
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": f"checkpoint_{s:09d}"} for s in (50, 60)]}))
    prune_after_fit(str(run_dir), keep_last=2)
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == [  # only checkpoint_000000040 pruned
        "checkpoint_-notes", "checkpoint_000000040.bak", "checkpoint_000000050", "checkpoint_000000060",
        "checkpoint_manager_snapshot.json"]
    assert (run_dir / "checkpoint_-notes" / "mine.txt").read_text() == "the user's"


def test_nothing_is_pruned_when_the_snapshot_is_unreadable(tmp_path: Path) -> None:
    run_dir = tmp_path / "job"
    _save(run_dir, "checkpoint_000000060.1", 60)
    _save(run_dir, "checkpoint_000000060", 60)
    (run_dir / "checkpoint_manager_snapshot.json").write_text('{"checkpoint_res')
    prune_after_fit(str(run_dir), keep_last=3)
    assert len(list(run_dir.glob("checkpoint_0*"))) == 2


def test_the_fit_thread_prunes_after_the_fit_ends_failed_or_not() -> None:
    from orchestrator.driver.fit import RayFit

    class Trainer:
        def fit(self):
            raise RuntimeError("worker group failed")

    calls = []
    fit = RayFit(Trainer(), after=lambda: calls.append("pruned"))
    assert isinstance(fit.outcome().error, RuntimeError) and calls == ["pruned"]


def test_no_checkpoint_is_read_when_ray_tracks_every_folder(tmp_path: Path, monkeypatch) -> None:
    run_dir = tmp_path / "job"
    for step in (40, 50, 60, 70):
        _save(run_dir, f"checkpoint_{step:09d}", step)

    def no_read(folder: Path) -> dict:
        raise AssertionError(f"{folder} read")

    monkeypatch.setattr(ckpt, "read", no_read)
    monkeypatch.setattr(ckpt, "written_step", no_read)
    assert prune_untracked(run_dir, tracked={p.name for p in run_dir.iterdir()}, keep_last=2) == []


def test_untracked_folders_are_checked_against_their_manifests_never_loaded(tmp_path: Path, monkeypatch) -> None:
    # Each state.pt was loaded whole into the driver's memory to learn its step: a large model's
    # checkpoints, several of them, on a small head node.
    run_dir = tmp_path / "job"
    for step in (40, 50, 60):
        _save(run_dir, f"checkpoint_{step:09d}", step)
    torn = _save(run_dir, "checkpoint_000000045", 45)
    (torn / ckpt.STATE_FILE).write_bytes((torn / ckpt.STATE_FILE).read_bytes()[:-1])

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a state was loaded")

    monkeypatch.setattr(torch, "load", no_load)
    pruned = prune_untracked(run_dir, tracked={"checkpoint_000000060", "checkpoint_000000050"}, keep_last=2)
    assert sorted(pruned) == ["checkpoint_000000040", "checkpoint_000000045"]
