"""A run read back from a progress record is checked against the store before its first use; a
check the store could not answer (down) is made again on the retry, never taken as passed."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.tracking.ops import RUN_KEY_TAG
from orchestrator.tracking.writer import Writer
from tracking_fakes import FakeRun, FakeStore, quick  # noqa: F401 - quick: autouse


def test_a_recorded_run_whose_check_failed_is_checked_again_not_used(tmp_path: Path) -> None:
    store = FakeStore()
    store.runs["victim"] = FakeRun("victim", "another-jobs-key", "someone")
    writer = Writer(store)
    writer.adopt({"h1": {"run_id": "victim", "experiment_id": "1", "artifact_uri": "file:///x", "resumed": True,
                         "floor": None, "tags": {RUN_KEY_TAG: "k"}}})
    batch = [{"op": "metrics", "handle": "h1", "t": 1, "points": [["planted", 1.0, 1, 1]], "per_step": False}]
    store.down = True
    with pytest.raises(ConnectionError):  # transient: the batch is sent again
        writer.apply(batch, files=tmp_path)
    store.down = False
    writer.apply(batch, files=tmp_path)
    assert store.runs["victim"].points == []
    assert any("no run is known for handle h1" in r for r in writer.refusals)
