"""A rank's training state (model, optimizer, scheduler, step) as a checkpoint holds it, and
resuming it from the run's newest verified checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import torch

from trainers import checkpoint as ckpt
from trainers.config import WorkerConfig
from trainers.errors import UserError
from trainers.models import build_model
from trainers.step import make_optimizer, make_scheduler


@dataclass
class TrainState:
    model: torch.nn.Module  # unwrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0

    @classmethod
    def build(cls, cfg: WorkerConfig, total_steps: int, device: torch.device) -> TrainState:
        model = build_model(cfg.model.name, cfg.model.kwargs).to(device)
        optimizer = make_optimizer(model, cfg.training)
        return cls(model, optimizer, make_scheduler(optimizer, cfg.training, total_steps))

    def to_dict(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "rng": ckpt.rng_state(), **extra}

    def finite(self) -> bool:
        """Whether every weight and buffer is a number: a diverged step leaves NaN or inf ones."""
        flags = [torch.isfinite(t).all() for t in (*self.model.parameters(), *self.model.buffers())
                 if t.is_floating_point()]
        return bool(torch.stack(flags).all()) if flags else True  # one host sync, not one per tensor

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        ckpt.restore_rng(state["rng"])


@dataclass(frozen=True, slots=True)
class Resume:
    step: int
    checkpoint: str
    skipped: tuple[str, ...] = ()
    latest: bool = False  # the folder is Ray Train's latest checkpoint: its fit's result unless another is reported


def restore(state: TrainState, run_dir: Path | None) -> Resume | None:
    """Load the newest verified checkpoint of the run: on local storage the newest folder that
    holds its checksum and fits this job (newer than Ray's latest when Ray had not registered it
    yet, older when the newest is corrupt); on remote storage Ray's latest."""
    latest = ray.train.get_checkpoint()
    if latest is not None and latest.filesystem.type_name != "local":
        with latest.as_directory() as folder:
            ckpt.apply_state(state.load, ckpt.read(Path(folder)), Path(latest.path))
        return Resume(state.step, Path(latest.path).name, latest=True)
    folder = Path(latest.path).parent if latest is not None else run_dir
    restored = ckpt.restore_newest(folder, state.load) if folder is not None else None
    if restored is None:
        if latest is not None:
            raise UserError(f"checkpoint: Ray Train registered {latest.path}, but no checkpoint folder is left "
                            f"under {folder}; start afresh with --new-run")
        return None
    return Resume(state.step, restored.folder.name, restored.skipped,
                  latest=latest is not None and restored.folder.name == Path(latest.path).name)
