"""The training loop's own decisions, with Ray Train's report and data shards faked (no processes)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray.train
import torch

from orchestrator.config import load_config
from trainers import checkpoint as ckpt
from trainers import loop
from trainers.batching import split_global_batch
from trainers.config import WorkerConfig
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


def test_a_group_resumed_at_the_last_step_reports_it_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A driver killed after its workers trained the last step (or while it registered the model): the
    # rerun's group resumed from that checkpoint and reported nothing, so its fit ended "at step 0 of
    # 120 without an error" and every rerun failed. Now it reports the step and its weights again.
    cfg = WorkerConfig.model_validate(load_config(DIGITS).localized().worker_config().model_dump(mode="json"))
    state = loop.TrainState.build(cfg, 30, torch.device("cpu"))
    state.step = 30
    ckpt.write(tmp_path / "checkpoint_000000030", state.to_dict({}), step=30)
    reported: list[tuple[dict[str, Any], str | None, int]] = []

    def report(metrics: dict[str, Any], checkpoint: Any = None, checkpoint_dir_name: str | None = None) -> None:
        step = ckpt.read(Path(checkpoint.path))["step"] if checkpoint is not None else -1
        reported.append((metrics, checkpoint_dir_name, step))

    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: SimpleNamespace())  # never read
    reporter = Reporter()
    worker = SimpleNamespace(cfg=cfg, args=loop.LoopArgs(config={}, steps_per_epoch=10, total_steps=30,
                                                         run_dir=str(tmp_path)),
                             rank=0, split=split_global_batch(64, workers=1, max_local_batch=None), state=state,
                             reporter=reporter)
    loop._train(worker, loop.Resume(30, "checkpoint_000000030"))
    assert reported == [({"step": 30}, "checkpoint_000000030.1", 30)]
    started, saved, ended = reporter.events
    assert isinstance(started, GroupStarted) and started.step == 30 and started.resumed_from == 30
    assert isinstance(saved, CheckpointSaved) and ended == GroupEnded(step=30, reason="finished")
