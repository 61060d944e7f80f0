"""One job, one identity (no Ray): the lock on a job's storage prefix, the config digest a rerun
is checked against, `--new-run`, a finished job, and storage URIs that are never made absolute."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyarrow import fs

from orchestrator import constants
from orchestrator.config import validate
from orchestrator.driver.identity import claim, job_key
from orchestrator.driver.lock import JobLock
from orchestrator.errors import UserError
from orchestrator.storage import Storage

ROOT = Path(__file__).resolve().parents[1]


def job(storage: str, **training):
    return validate({"name": "digits", "model": {"name": "mlp", "kwargs": {"hidden": 8}},
                     "data": {"path": "data", "features": {"column": "x", "dtype": "float32"}},
                     "training": {"max_steps": 10, "lr": 0.01, **training},
                     "checkpoint": {"storage_path": storage}})


def test_a_second_driver_of_the_same_job_is_refused_naming_the_holder(tmp_path: Path) -> None:
    """The second driver is a real process: the lock holds across processes, and dies with its holder."""
    first = claim(job(str(tmp_path)))
    code = ("from orchestrator.driver.identity import claim; from orchestrator.config import validate; import json,sys; "
            "claim(validate(json.loads(sys.argv[1])))")
    args = [sys.executable, "-c", code, json.dumps(job(str(tmp_path)).to_dict())]
    refused = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode != 0 and "digits: this job is already running (pid " in refused.stderr
    assert f"pid {os.getpid()} on " in refused.stderr and str(tmp_path / "digits" / ".lock") in refused.stderr
    first.release()
    assert subprocess.run(args, capture_output=True, text=True, cwd=ROOT).returncode == 0  # free again


@pytest.mark.parametrize("content", [b"\xff\xfe", b"[" * 100_000, b"[1]", b'{"pid": 1'])
def test_a_held_lock_whose_file_was_damaged_still_refuses_in_one_line(tmp_path: Path, content: bytes) -> None:
    first = JobLock(Storage(str(tmp_path)), "digits")
    first.acquire()
    (tmp_path / "digits" / ".lock").write_bytes(content)  # edited while held: the flock still holds
    with pytest.raises(UserError, match=r"^digits: this job is already running \(another driver; lock "):
        JobLock(Storage(str(tmp_path)), "digits").acquire()
    first.release()


def test_a_link_planted_at_the_lock_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "runs" / "digits").mkdir(parents=True)
    (tmp_path / "runs" / "digits" / ".lock").symlink_to(victim)
    with pytest.raises(UserError, match=r"^checkpoint\.storage_path: cannot write .*\.lock is a symbolic link; remove it\)$"):
        JobLock(Storage(str(tmp_path / "runs")), "digits").acquire()
    assert victim.read_text() == "precious\n"


def _ray_snapshot(*names: str) -> str:
    results = [{"checkpoint_dir_name": n, "metrics": {}} for n in names]
    return json.dumps({"ray_version": "2.60.0", "checkpoint_results": results, "checkpoint_report_indices": [0] * len(names),
                       "latest_checkpoint_result": results[-1], "pending_training_results": [],
                       "pending_validation_specs": [], "current_report_index": len(names),
                       "validated_checkpoint_dir_names": [], "timed_out_validation_checkpoint_dir_names": [],
                       "failed_validation_checkpoint_dir_names": []})


@pytest.mark.parametrize("name", ["{victim}", "../../victim", "checkpoint_1/../../../victim"])
def test_a_ray_snapshot_naming_a_checkpoint_outside_the_run_is_refused(tmp_path: Path, name: str) -> None:
    """Ray Train deletes the checkpoints its snapshot lists past keep_last, by the path it joins to the
    run folder: a planted one naming /home/... would have the job delete that folder."""
    victim = tmp_path / "victim"
    victim.mkdir()
    run = tmp_path / "runs" / "digits"
    run.mkdir(parents=True)
    (run / "checkpoint_manager_snapshot.json").write_text(_ray_snapshot("checkpoint_000000010", name.format(victim=victim)))
    with pytest.raises(UserError, match=r"checkpoint_manager_snapshot\.json: names checkpoint .* outside the run folder"):
        claim(job(str(tmp_path / "runs")))
    assert victim.is_dir()
    (run / "checkpoint_manager_snapshot.json").write_text(_ray_snapshot("checkpoint_000000010", "checkpoint_000000020.1"))
    claim(job(str(tmp_path / "runs"))).release()  # Ray's own names pass


def test_a_rerun_knows_its_checkpoints_step_and_its_mlflow_run_before_its_workers_start(tmp_path: Path) -> None:
    """What a rerun stopped before its group's first report says it stands at (it said step 0 and no run)."""
    first = claim(job(str(tmp_path)))
    assert (first.checkpoint_step, first.run_id) == (0, None)
    first.save_run_id("run-1")
    first.release()
    snapshot = json.loads(_ray_snapshot("checkpoint_000000020", "checkpoint_000000030"))
    snapshot["latest_checkpoint_result"]["metrics"] = {"step": 30}  # what the loop reports with its checkpoint
    (tmp_path / "digits" / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    again = claim(job(str(tmp_path)))
    assert (again.checkpoint_step, again.run_id) == (30, "run-1")
    again.release()


def test_a_storage_path_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("kept\n")
    for storage, why in ((tmp_path / "file" / "runs", "Not a directory"), (Path("/proc/orchestrator-test"), ".+")):
        with pytest.raises(UserError, match=rf"^checkpoint\.storage_path: cannot write {storage / 'digits'} \({why}\)$"):
            claim(job(str(storage)))
    assert (tmp_path / "file").read_text() == "kept\n"


def test_a_folder_in_place_of_the_record_or_the_lock_is_one_line_naming_it(tmp_path: Path) -> None:
    """A folder at job.json was taken for no record (a first run), whose write then failed naming
    its temporary file (`.job.json.s_pajwso: Is a directory`); one at .lock named the job's folder."""
    (tmp_path / "digits" / "job.json").mkdir(parents=True)
    with pytest.raises(UserError, match=rf"^{tmp_path}/digits/job.json: not a regular file \(a folder\?\); move it aside$"):
        claim(job(str(tmp_path)))
    (tmp_path / "digits" / "job.json").rmdir()
    (tmp_path / "digits" / ".lock").unlink()  # the refused claim's (released) lock file
    (tmp_path / "digits" / ".lock").mkdir()
    with pytest.raises(UserError, match=rf"^checkpoint\.storage_path: cannot write {tmp_path}/digits/\.lock \(Is a directory\)$"):
        claim(job(str(tmp_path)))
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == [".lock"]


def test_a_storage_uri_no_filesystem_reads_is_one_line() -> None:
    """`run --set checkpoint.storage_path=ftp://...` ended in a 110-line ArrowInvalid traceback (exit 1)."""
    with pytest.raises(UserError, match=r"^checkpoint\.storage_path: ftp://host/runs: Unrecognized filesystem type"):
        claim(job("ftp://host/runs"))


def test_a_full_disk_leaves_no_half_written_record_and_names_the_file(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    storage = Storage(str(tmp_path))
    storage.write_json("job.json", {"restarts": 1})

    def full(*_: object) -> None:  # what a write past the last free block raises: no file name
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError) as raised:
        storage.write_json("job.json", {"restarts": 2})
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "job.json")
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"]  # no .job.json.<random> left behind
    assert json.loads((tmp_path / "job.json").read_text()) == {"restarts": 1}


def test_a_changed_config_is_refused_naming_the_fields_unless_new_run(tmp_path: Path) -> None:
    claim(job(str(tmp_path))).release()
    with pytest.raises(UserError, match=r"config changed since this job ran \(model.kwargs.hidden, training.lr\)"):
        claim(job(str(tmp_path), lr=0.1).model_copy(update={"model": job(str(tmp_path)).model.model_copy(
            update={"kwargs": {"hidden": 16}})}))
    longer = claim(job(str(tmp_path), max_steps=50))  # the length is safe to change
    assert longer.state.generation == 1
    longer.release()
    fresh = claim(job(str(tmp_path), lr=0.1), new_run=True)
    assert fresh.state.generation == 2 and fresh.run_dir == str(tmp_path / "digits" / "run-2")
    assert fresh.key != job_key(str(tmp_path), "digits") and fresh.key == job_key(str(tmp_path), "digits", 2)
    fresh.release()
    claim(job(str(tmp_path), lr=0.1)).release()  # the new generation is now what is checked


def test_a_finished_job_is_complete_until_its_length_changes(tmp_path: Path) -> None:
    identity = claim(job(str(tmp_path)))
    assert not identity.complete
    identity.mark_finished(step=10, run_id="r", model_version="2")
    identity.release()
    again = claim(job(str(tmp_path)))
    assert again.complete and again.state.finished["model_version"] == "2"
    again.release()
    assert not claim(job(str(tmp_path), max_steps=20)).complete


def test_a_finished_job_rerun_reads_no_data_unless_new_run_changed_or_its_model_is_owed(tmp_path: Path) -> None:
    """A rerun of a finished job took 4 s to say it is complete, 3 of them importing torch to check
    data it does not train on (and a removed built-in data set was prepared again)."""
    from orchestrator.driver.job import RayPorts, SilentUI

    def configured(**changes):
        raw = job(str(tmp_path), **changes.pop("training", {})).to_dict()
        raw["data"]["path"] = str(tmp_path / "removed")  # checking the data now fails
        raw["tracking"].update(changes)
        return validate(raw)

    identity = claim(configured())
    identity.mark_finished(step=10, run_id="r", model_version="2")
    identity.release()
    ports = RayPorts(configured(), None, None, False, SilentUI())
    assert ports.claim().complete
    ports.identity.release()
    for new_run, changed in ((True, configured()), (False, configured(training={"lr": 0.5}))):
        with pytest.raises(UserError, match="^data.path: .*removed not found"):
            RayPorts(changed, None, None, new_run, SilentUI()).claim()
    owed = claim(configured(registered_model="m"))
    owed.mark_finished(step=10, run_id="r", model_version=None, checkpoint="c")  # MLflow was down
    owed.release()
    with pytest.raises(UserError, match="^data.path: "):  # logging the model reads an input example
        RayPorts(configured(registered_model="m"), None, None, False, SilentUI()).claim()


def test_run_of_a_finished_job_says_so_without_importing_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`orchestrator run` of a complete job: its import of torch (for the data check, and through
    `ray_session` to shut down a Ray it never started) was 3 of the 4 seconds it took."""
    import yaml

    from orchestrator.config import load_config

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job(str(tmp_path)).to_dict()))  # its data, ./data, is not there
    identity = claim(load_config(config, []).localized())  # as the driver claims it
    identity.mark_finished(step=10, run_id="r", model_version=None)
    identity.release()
    code = ("import sys; from orchestrator.cli import main; sys.argv[1:] = ['run', sys.argv[1]]\n"
            "try: main()\nexcept SystemExit as exc: assert not exc.code, exc.code\nprint('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, cwd=tmp_path,
                          env={**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
                               "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("complete: trained to step 10") and done.stdout.endswith("False\n")


def test_object_storage_is_never_made_absolute_and_takes_a_lease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "LOCK_HEARTBEAT_S", 0.2)
    monkeypatch.setattr(constants, "LOCK_SETTLE_S", 0.05)
    bucket = fs.SubTreeFileSystem(str(tmp_path), fs.LocalFileSystem())
    uri = "s3://bucket/runs"
    assert job(uri).localized().checkpoint.storage_path == uri
    storage = Storage(uri, filesystem=bucket)
    first = JobLock(storage, "digits")
    first.acquire()
    lease = json.loads((tmp_path / "bucket" / "runs" / "digits" / ".lock.json").read_text())
    assert lease["pid"] == os.getpid()
    with pytest.raises(UserError, match="already running .* lock s3://bucket/runs/digits/.lock.json"):
        JobLock(storage, "digits").acquire()
    first.release()
    assert not (tmp_path / "bucket" / "runs" / "digits" / ".lock.json").exists()
    second = JobLock(storage, "digits")
    second.acquire()
    second._stop.set()  # its driver "dies": the lease is no longer renewed
    second._beat.join()
    time.sleep(constants.LOCK_HEARTBEAT_S * 3.5)
    third = JobLock(storage, "digits")
    third.acquire()  # a stale lease is taken over
    third.release()


@pytest.mark.parametrize(("content", "says"), [
    (b'{"name": "digits", "generati', "not valid JSON (Unterminated string starting at, line 1)"),
    (b"\xff\xfe", "not UTF-8 text"),
    (b"[" * 100_000, "nested too deeply to be JSON this program wrote"),
    (b'{"name": "digits", "generation": ' + b"1" * 5000 + b"}", "not valid JSON (Exceeds the limit (4300 digits)"),
    (b"[1, 2]", "not a job record (no mapping with a job name)"),
    (b'{"name": "digits", "generation": "2"}', "not a job record (generation is str)"),
    (b'{"name": "digits", "trained": [1]}', "not a job record (trained is list)"),
    # edited: a rerun trained from step 0 in run-0/ (run--1/) under a new MLflow run, without a word
    (b'{"name": "digits", "generation": 0}', "not a job record (generation 0 is no run of it)"),
    (b'{"name": "digits", "generation": -1}', "not a job record (generation -1 is no run of it)"),
])
def test_a_damaged_job_record_is_one_line_and_the_lock_is_released(tmp_path: Path, content: bytes, says: str) -> None:
    claim(job(str(tmp_path))).release()
    record = tmp_path / "digits" / "job.json"
    record.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(f"{record}: {says}")) as caught:
        claim(job(str(tmp_path)))
    assert "\n" not in str(caught.value) and record.read_bytes() == content  # left as it was for the user
    free = JobLock(Storage(str(tmp_path)), "digits")
    free.acquire()  # not held by the refused claim
    free.release()


def test_a_holder_whose_lease_was_taken_over_stops_renewing_it_and_says_it_lost_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder misses three beats (storage down, the driver paused) and another driver takes the
    job over: the first must not write its lease back (both would run the job, renewing in turn)."""
    monkeypatch.setattr(constants, "LOCK_HEARTBEAT_S", 0.2)
    monkeypatch.setattr(constants, "LOCK_SETTLE_S", 0.05)
    storage = Storage("s3://bucket/runs", filesystem=fs.SubTreeFileSystem(str(tmp_path), fs.LocalFileSystem()))
    lease = tmp_path / "bucket" / "runs" / "digits" / ".lock.json"
    first = JobLock(storage, "digits")
    first.acquire()
    write, down = first._write_lease, [True]
    monkeypatch.setattr(first, "_write_lease", lambda: (_ for _ in ()).throw(OSError("503")) if down[0] else write())
    time.sleep(constants.LOCK_HEARTBEAT_S * 3.5)
    second = JobLock(storage, "digits")
    second.acquire()
    down[0] = False
    time.sleep(constants.LOCK_HEARTBEAT_S * 3)
    assert _lease_token(lease) == second._token
    assert first.lost is not None and first.lost.startswith(f"pid {os.getpid()} on ")
    first.release()  # leaves the new holder's lease alone
    assert _lease_token(lease) == second._token
    second.release()


def _lease_token(lease: Path) -> str:
    """The lease's token as a reader sees it. This stand-in for object storage (pyarrow's local
    filesystem) rewrites the file in place, so a read between the holder's truncate and write finds
    it empty (a full run read '' once); an object PUT is never seen half done."""
    deadline = time.monotonic() + 2
    while True:
        try:
            return json.loads(lease.read_text())["token"]
        except json.JSONDecodeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_spellings_of_one_storage_place_are_one_job_with_one_mlflow_run(tmp_path: Path) -> None:
    """They share the job's lock, job.json and checkpoints: a rerun written with a trailing slash or
    as a file:// URI must not open a second MLflow run that lacks every step before the checkpoint."""
    spellings = [str(tmp_path), f"{tmp_path}/", f"file://{tmp_path}", f"file://{tmp_path}/"]
    keys = set()
    for where in spellings:
        identity = claim(job(where).localized())
        keys.add(identity.key)
        identity.release()
    assert keys == {job_key(str(tmp_path), "digits")}
    assert job_key("s3://bucket/runs/", "digits") == job_key("s3://bucket/runs", "digits")
    assert job_key("s3://bucket/runs", "digits") != job_key("s3://bucket/other", "digits")
