"""A run named in a spill file (an open line's recorded resolution) or its progress record is read
back from disk, so not trusted: a planted or edited one sent its metrics, tags and status into any
run on the server, one this program never made included. Against a real sqlite store."""

from __future__ import annotations

import hashlib
import os
import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.errors import UserError
from orchestrator.tracking import replay
from orchestrator.tracking.ops import server_name


def _victim(uri: str) -> str:
    client = MlflowClient(uri)
    run = client.create_run("0", run_name="someone-elses")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _resolved(run_id: str) -> dict:
    return {"run_id": run_id, "experiment_id": "0", "artifact_uri": "file:///elsewhere", "resumed": False,
            "floor": None}


@pytest.mark.parametrize("where", ["open line", "progress record"])
def test_a_run_read_back_from_disk_that_is_not_the_jobs_is_never_written(tmp_path: Path, monkeypatch,
                                                                         where: str) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    victim = _victim(uri)
    opened = {"op": "open", "handle": "h1", "t": 1, "experiment": "e", "run_key": "k", "run_name": "job",
              "floor_key": "train/loss", "tracking_uri": server_name(uri),
              "resolved": _resolved(victim) if where == "open line" else None}
    rest = [{"op": "metrics", "handle": "h1", "t": 2, "points": [["planted", 1.0, 2, 1]], "per_step": False},
            {"op": "tags", "handle": "h1", "t": 2, "tags": {"mlflow.runName": "planted"}},
            {"op": "finish", "handle": "h1", "t": 3, "status": "FAILED"}]
    spill = tmp_path / "job.jsonl"
    first = json.dumps(opened) + "\n"
    spill.write_text(first + "".join(json.dumps(op) + "\n" for op in rest))
    if where == "progress record":  # the open line taken for sent, with the run it resolved to
        head = hashlib.sha256(first.encode()).hexdigest()[:16]
        record = {"offset": len(first), "runs": {"h1": _resolved(victim)}, "server": server_name(uri), "head": head}
        spill.with_name(spill.name + ".offset").write_text(json.dumps(record))
    result = replay(spill, uri)
    run = MlflowClient(uri).get_run(victim)
    assert (run.info.run_name, run.info.status, run.data.metrics) == ("someone-elses", "FINISHED", {})
    if where == "open line":  # the job's own run, found by its run key, gets them instead
        assert result.points == 1 and result.refusals == ()
    else:
        assert result.points == 0 and all("no run is known for handle h1" in r for r in result.refusals)


def test_a_tracker_never_sends_another_users_spill_file_from_a_shared_spill_dir(tmp_path: Path, monkeypatch) -> None:
    """A job sends the spill files it finds for its server first, with its own credentials: one another
    user planted in a shared spill_dir resumed, renamed and failed any run of a job whose key it named."""
    import os

    from orchestrator.tracking.spill import pending_files, spill_path

    uri = "http://127.0.0.1:9"
    path = spill_path(tmp_path, uri, "k")
    path.write_text(json.dumps({"op": "finish", "handle": "h1", "t": 3, "status": "FAILED"}) + "\n")
    assert pending_files(tmp_path, uri) == [path]
    monkeypatch.setattr(os, "geteuid", lambda: path.stat().st_uid + 1)  # the file is now another user's
    assert pending_files(tmp_path, uri) == []


def test_a_spill_file_this_user_cannot_read_is_one_line_that_does_not_blame_mlflow(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """It read "MLflow at ... did not take it (PermissionError ...): run the same command again"."""
    import errno
    import os

    from orchestrator.tracking import spill

    path = tmp_path / "job.jsonl"
    path.write_text("{}\n")
    real_open = os.open

    def refused(name, flags, *args):  # as chmod 000 would for a user other than root
        if Path(name) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(name))
        return real_open(name, flags, *args)

    monkeypatch.setattr(spill.os, "open", refused)
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: cannot read the file \(Permission denied\)$"):
        replay(path, f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file another user's takes root")
def test_a_progress_record_another_user_planted_never_has_the_file_taken_for_sent(tmp_path: Path) -> None:
    """In a shared spill_dir another user could create FILE.offset beside this user's unsent spill
    file: its offset, the file's size, had every line taken for sent, and the file deleted unsent."""
    from orchestrator.tracking.spill import fully_sent, pending_files, remove_if_sent, spill_path

    uri = "http://127.0.0.1:9"
    path = spill_path(tmp_path, uri, "k")
    path.write_text(json.dumps({"op": "finish", "handle": "h1", "t": 3, "status": "FAILED"}) + "\n")
    record = path.with_name(path.name + ".offset")
    record.write_text(json.dumps({"offset": path.stat().st_size, "runs": {}, "server": None}))
    os.chown(record, path.stat().st_uid + 1, -1)
    assert not fully_sent(path) and not remove_if_sent(path) and path.exists()
    assert pending_files(tmp_path, uri) == []  # said, and left: not sent past its planted offset either
    planted = r"\.offset: not a progress record \(it is uid \d+'s, the spill file uid \d+'s\)"
    with pytest.raises(UserError, match=planted):
        replay(path, f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.parametrize("owner", ["another job", "the job"])
def test_a_progress_record_names_only_a_run_of_the_job_whose_spill_file_it_is(tmp_path: Path, owner: str) -> None:
    """A record naming a run this program made for another job (its run-key tag is that job's) was
    taken: only the tag's presence was checked, so a planted record wrote into any job's run."""
    from orchestrator.tracking.ops import RUN_KEY_TAG
    from orchestrator.tracking.spill import spill_path

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    target = client.create_run("0", run_name="target", tags={RUN_KEY_TAG: "other" if owner == "another job" else "k"})
    target_id = target.info.run_id
    opened = {"op": "open", "handle": "h1", "t": 1, "experiment": "e", "run_key": "k", "run_name": "job",
              "floor_key": "train/loss", "tracking_uri": server_name(uri), "resolved": None}
    first = json.dumps(opened) + "\n"
    spill = spill_path(tmp_path, uri, "k")
    spill.write_text(first + json.dumps({"op": "metrics", "handle": "h1", "t": 2, "points": [["m", 1.0, 2, 1]],
                                         "per_step": False}) + "\n")
    head = hashlib.sha256(first.encode()).hexdigest()[:16]
    # no tag of its own in the record (one naming "other" would be as good): the store's tag is what counts
    record = {"offset": len(first), "runs": {"h1": _resolved(target_id)}, "server": server_name(uri), "head": head}
    spill.with_name(spill.name + ".offset").write_text(json.dumps(record))
    result = replay(spill, uri)
    sent = MlflowClient(uri).get_run(target_id).data.metrics
    if owner == "another job":
        assert sent == {} and result.points == 0
        assert all("no run is known for handle h1" in r for r in result.refusals)
    else:
        assert sent == {"m": 1.0} and result.points == 1 and result.refusals == ()
