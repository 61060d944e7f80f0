"""The training loop's own decisions, with Ray Train's report and data shards faked (no processes)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray
import ray.train
import torch

from orchestrator.config import load_config
from trainers import checkpoint as ckpt
from trainers import loop
from trainers import state as state_module
from trainers.batching import split_global_batch
from trainers.config import WorkerConfig
from trainers.errors import UserError
from trainers.events import CheckpointSaved, GroupEnded, GroupStarted

DIGITS = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"


class Reporter:
    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.events: list[Any] = []

    def started(self, event: GroupStarted) -> None:
        self.events.append(event)

    def send(self, event: Any) -> None:
        self.events.append(event)

    def flush(self) -> None:
        pass


def _worker(run_dir: Path, *, step: int, total: int) -> SimpleNamespace:
    """Rank 0 of one worker on the digits job, at `step` of `total`, its checkpoints in `run_dir`."""
    cfg = WorkerConfig.model_validate(load_config(DIGITS).localized().worker_config().model_dump(mode="json"))
    state = state_module.TrainState.build(cfg, total, torch.device("cpu"))
    state.step = step
    return SimpleNamespace(cfg=cfg, args=loop.LoopArgs(config={}, steps_per_epoch=10, total_steps=total,
                                                       run_dir=str(run_dir)),
                           rank=0, split=split_global_batch(64, workers=1, max_local_batch=None), state=state,
                           reporter=Reporter())


def test_a_group_resumed_at_the_last_step_reports_it_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A driver killed after its workers trained the last step (or while it registered the model): the
    # rerun's group resumed from that checkpoint and reported nothing, so its fit ended "at step 0 of
    # 120 without an error" and every rerun failed. Now it reports the step and its weights again.
    worker = _worker(tmp_path, step=30, total=30)
    ckpt.write(tmp_path / "checkpoint_000000030", worker.state.to_dict({}), step=30)
    reported: list[tuple[dict[str, Any], str | None, int]] = []

    def report(metrics: dict[str, Any], checkpoint: Any = None, checkpoint_dir_name: str | None = None) -> None:
        step = ckpt.read(Path(checkpoint.path))["step"] if checkpoint is not None else -1
        reported.append((metrics, checkpoint_dir_name, step))

    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: SimpleNamespace())  # never read
    loop._train(worker, state_module.Resume(30, "checkpoint_000000030"))
    assert reported == [({"step": 30}, "checkpoint_000000030.1", 30)]
    started, saved, ended = worker.reporter.events
    assert isinstance(started, GroupStarted) and started.step == 30 and started.resumed_from == 30
    assert isinstance(saved, CheckpointSaved) and ended == GroupEnded(step=30, reason="finished")



@pytest.mark.parametrize("registered", [20, 30])
def test_a_group_resumed_at_the_last_step_ray_train_holds_copies_no_checkpoint(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, registered: int) -> None:
    # A driver SIGKILLed while it registered the model, again and again: each rerun's group reported
    # the last step's checkpoint again as checkpoint_<step>.1, .2, ..., which Ray Train tracked, so
    # with keep_last they pushed the older distinct checkpoints out. A copy is reported only where
    # Ray Train's latest is older (a driver killed before it registered the last one).
    worker = _worker(tmp_path, step=0, total=30)
    for step in (20, 30):
        worker.state.step = step
        ckpt.write(tmp_path / ckpt.dir_name(step), worker.state.to_dict({}), step=step)
    latest = ray.train.Checkpoint(str(tmp_path / ckpt.dir_name(registered)))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: latest)
    resume = state_module.restore(worker.state, tmp_path)
    assert resume is not None and (resume.checkpoint, resume.latest) == ("checkpoint_000000030", registered == 30)
    reported: list[tuple[dict[str, Any], str | None]] = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None, checkpoint_dir_name=None:
                        reported.append((metrics, checkpoint_dir_name)))
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: SimpleNamespace())  # never read
    loop._train(worker, resume)
    copy = None if registered == 30 else "checkpoint_000000030.1"
    assert reported == [({"step": 30}, copy)]

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_checkpoint_the_storage_refuses_is_one_line_and_leaves_no_torn_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, code: int
) -> None:
    # The storage filled up (or went read-only) while Ray Train copied a checkpoint in: the worker
    # failed with pyarrow's OSError, Ray Train restarted the group up to max_failures, and each
    # restart left another torn checkpoint folder before the driver said anything.
    def report(metrics: dict[str, Any], checkpoint: Any = None, checkpoint_dir_name: str | None = None) -> None:
        (tmp_path / checkpoint_dir_name).mkdir()
        (tmp_path / checkpoint_dir_name / "state.pt").write_bytes(b"part")
        raise OSError(code, f"Error writing bytes to file. Detail: [errno {code}]")

    monkeypatch.setattr(ray.train, "report", report)
    worker = _worker(tmp_path, step=20, total=30)
    with pytest.raises(UserError, match=rf"^checkpoint.storage_path: cannot write {tmp_path}/checkpoint_000000020 "
                                        rf"\({os.strerror(code)}\); free space or make it writable"):
        loop._save_and_report(worker)
    assert list(tmp_path.iterdir()) == []

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError(errno.ECONNREFUSED, "refused")  # not the storage saying no: Ray Train's to handle

    monkeypatch.setattr(ray.train, "report", unreachable)
    with pytest.raises(ConnectionError):
        loop._save_and_report(worker)


def test_a_group_asked_to_stop_while_it_started_leaves_before_building_anything(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C while Ray Train started the group: the workers built the model, started the data and
    # trained to their first stop check (15 steps) and a checkpoint, some 20 s, before the driver exited.
    asked: list[str] = []
    progress = SimpleNamespace(given_up=SimpleNamespace(remote=lambda: None),
                               stop_requested=SimpleNamespace(remote=lambda: asked.append("stop") or True))
    monkeypatch.setattr(ray, "get", lambda answer: answer)  # the fake actor answers at once
    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 0))
    monkeypatch.setattr(loop, "_start", lambda args: pytest.fail("the group started training"))
    loop.train_loop_per_worker(loop.LoopArgs(config={}, steps_per_epoch=10, total_steps=30, progress=progress).to_dict())
    assert asked == ["stop"]
