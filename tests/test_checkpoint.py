"""Unit tests of training-state checkpoints on disk: atomic writes, checksums, and the fallback to
the previous checkpoint when the newest is corrupt (no Ray, no training)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from trainers import checkpoint as ckpt
from trainers.errors import UserError


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


@pytest.mark.parametrize(("manifest", "says"), [
    (b'{"step": 10, "by', "unreadable (Unterminated string"),
    (b"\xff\xfe", "unreadable ('utf-8' codec can't decode"),
    (b"[" * 100_000, "unreadable (nested too deeply)"),
    (b'{"step": ' + b"1" * 5000 + b"}", "unreadable (Exceeds the limit (4300 digits)"),
    (b"[10]", "not a manifest"),
])
def test_a_damaged_manifest_is_reported(tmp_path: Path, manifest: bytes, says: str) -> None:
    folder = write(tmp_path, 10)
    (folder / ckpt.MANIFEST_FILE).write_bytes(manifest)
    with pytest.raises(ckpt.CorruptCheckpoint, match=re.escape(says)):
        ckpt.read(folder)


def test_a_checkpoint_that_names_no_step_is_corrupt(tmp_path: Path) -> None:
    # checksums right, but neither the manifest nor the state says a step: it was restored (KeyError
    # at the resume) and pruning after a fit died on it in the fit's thread
    write(tmp_path, 60)
    ckpt.write(tmp_path / ckpt.dir_name(70), {"model": {"w": torch.ones(4)}}, step=None)  # type: ignore[arg-type]
    with pytest.raises(ckpt.CorruptCheckpoint, match="does not hold the state of step None"):
        ckpt.read(tmp_path / ckpt.dir_name(70))
    assert ckpt.restore_newest(tmp_path).folder.name == ckpt.dir_name(60)


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


class _Payload:
    """What an attacker pickles into state.pt: loading it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_pickled_code_in_a_checkpoint_is_refused_not_run(tmp_path: Path) -> None:
    """The attack: anyone who can write the checkpoint storage drops a newer state.pt that runs
    code when unpickled, with a manifest that matches it. It must be passed over, never run."""
    write(tmp_path, 20)
    marker = tmp_path / "pwned"
    evil = tmp_path / ckpt.dir_name(30)
    ckpt.write(evil, {"step": 30, "model": _Payload(marker)}, step=30)  # a matching SHA-256 manifest
    restored = ckpt.restore_newest(tmp_path)
    assert not marker.exists(), "restoring a checkpoint ran code from it"
    assert restored is not None and restored.state["step"] == 20
    assert "not loadable as tensors" in restored.skipped[0]
    # The payload is live: an unsafe load would have run it (this is what the fix prevents).
    torch.load(evil / ckpt.STATE_FILE, weights_only=False)
    assert marker.exists()


def test_a_state_that_does_not_fit_the_job_is_passed_over(tmp_path: Path) -> None:
    write(tmp_path, 20)
    ckpt.write(tmp_path / ckpt.dir_name(30), {"step": 30, "model": {"other": torch.zeros(2)}}, step=30)
    model = torch.nn.Linear(2, 2)
    # step 20's {"w": ...} does not fit a Linear either: nothing usable, and starting over would
    # train and log the run's steps twice
    with pytest.raises(UserError, match=r"^checkpoint: none of the 2 checkpoints under .* is usable \(the newest: .*"
                                        r"does not fit this job .*--new-run$"):
        ckpt.restore_newest(tmp_path, apply=lambda state: model.load_state_dict(state["model"]))
    assert ckpt.restore_newest(tmp_path, apply=lambda state: None).state["step"] == 30


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    import random

    import numpy as np

    ckpt.write(tmp_path / "c", {"step": 1, "rng": ckpt.rng_state()}, step=1)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.random(), np.random.rand(), torch.rand(1)  # move every generator on
    ckpt.restore_rng(ckpt.read(tmp_path / "c")["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
