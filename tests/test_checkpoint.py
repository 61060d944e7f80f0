"""Unit tests of training-state checkpoints on disk: atomic writes, checksums, and the fallback to
the previous checkpoint when the newest is corrupt (no Ray, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainers import checkpoint as ckpt


def write(run_dir: Path, step: int, name: str | None = None) -> Path:
    folder = run_dir / (name or ckpt.dir_name(step))
    return ckpt.write(folder, {"step": step, "model": {"w": torch.full((4,), float(step))}}, step=step)


def test_write_leaves_only_verified_files(tmp_path: Path) -> None:
    folder = write(tmp_path, 10)
    assert sorted(p.name for p in folder.iterdir()) == [ckpt.MANIFEST_FILE, ckpt.STATE_FILE]  # no .tmp left
    manifest = json.loads((folder / ckpt.MANIFEST_FILE).read_text())
    assert manifest["step"] == 10 and manifest["bytes"] == (folder / ckpt.STATE_FILE).stat().st_size
    assert ckpt.read(folder)["model"]["w"].tolist() == [10.0] * 4


@pytest.mark.parametrize("damage", ["truncate", "flip", "drop_manifest"])
def test_damaged_checkpoint_is_reported(tmp_path: Path, damage: str) -> None:
    folder = write(tmp_path, 10)
    state = folder / ckpt.STATE_FILE
    payload = state.read_bytes()
    if damage == "truncate":
        state.write_bytes(payload[: len(payload) // 2])
    elif damage == "flip":
        state.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
    else:
        (folder / ckpt.MANIFEST_FILE).unlink()
    with pytest.raises(ckpt.CorruptCheckpoint, match="checksum mismatch|missing"):
        ckpt.read(folder)


def test_newest_corrupt_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        write(tmp_path, step)
    newest = tmp_path / ckpt.dir_name(30) / ckpt.STATE_FILE
    newest.write_bytes(newest.read_bytes()[:100])
    restored = ckpt.restore_newest(tmp_path)
    assert restored is not None and restored.state["step"] == 20 and restored.folder.name == ckpt.dir_name(20)
    assert len(restored.skipped) == 1 and ckpt.dir_name(30) in restored.skipped[0]
    assert "checksum mismatch (100 bytes" in restored.skipped[0]
    assert ckpt.restore_newest(tmp_path / "missing") is None


def test_a_step_reached_again_gets_a_fresh_folder_that_sorts_after(tmp_path: Path) -> None:
    assert ckpt.fresh_dir_name(tmp_path, 50) == ckpt.dir_name(50)
    write(tmp_path, 50)
    again = ckpt.fresh_dir_name(tmp_path, 50)
    assert again == ckpt.dir_name(50) + ".1"
    write(tmp_path, 50, again)
    assert ckpt.fresh_dir_name(tmp_path, 50) == ckpt.dir_name(50) + ".2"
    write(tmp_path, 60)
    assert [p.name for p in ckpt.candidates(tmp_path)] == [ckpt.dir_name(60), again, ckpt.dir_name(50)]
    assert ckpt.fresh_dir_name(None, 50) == ckpt.dir_name(50)  # remote storage: Ray's names
