"""One optimizer step, as training runs it: the loop trains with it and the profiler times it, so
a profile measures exactly the step that trains (precision, compile, gradient clipping,
accumulation with `no_sync`).

Fit for a GPU: a step never waits for the device. The loss comes back as a detached tensor on the
device (averaged over the micro-batches), converted to a number only when it is logged, many
steps at a time; training steps compute no accuracy.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from trainers.config import TrainingConfig

Batch = tuple[torch.Tensor, torch.Tensor | None]


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _logits_and_targets(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    if y is None:  # next-token prediction on the shifted tokens
        x, y = x[:, :-1], x[:, 1:]
    logits = model(x)
    return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy: classification, or next-token prediction when y is None."""
    logits, targets = _logits_and_targets(model, x, y)
    return F.cross_entropy(logits.float(), targets)


def eval_sums(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """[summed loss, correct, count] of one evaluation batch, on the device."""
    logits, targets = _logits_and_targets(model, x, y)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    correct = (logits.argmax(dim=-1) == targets).sum()
    return torch.stack([loss.double(), correct.double(), torch.tensor(float(targets.numel()), device=loss.device,
                                                                       dtype=torch.float64)])


def make_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, *, cfg: TrainingConfig, total_steps: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.lr_schedule == "linear":
        return max(1.0 - progress, 0.0)
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg=cfg, total_steps=total_steps))


def compiled(model: torch.nn.Module, cfg: TrainingConfig) -> torch.nn.Module:
    """`model` under `training.compile`, as torchtitan compiles a transformer: each block of its
    stack of identical blocks compiled on its own, in place (`repeated_blocks`), so one
    compilation serves every layer (the compile time of one block, not of the whole model; the
    same fusions inside each block), DDP's gradient hooks stay between compiled graphs and the
    state dict keeps its keys. A model without such a stack is compiled whole."""
    if not cfg.compile:
        return model
    blocks = repeated_blocks(model)
    if not blocks:
        return torch.compile(model)
    for block in blocks:
        block.compile()
    return model


def eager() -> contextlib.AbstractContextManager:
    """Compiled modules run eagerly inside (`torch.compiler.set_stance`, torch >= 2.6): the same
    results without compiling another shape. Older torch compiles as usual."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The first `nn.ModuleList` (DDP unwrapped) of two or more modules of one class: a
    transformer's layers. Empty when there is none."""
    for module in getattr(model, "module", model).modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            return list(module)
    return []


class TrainStep:
    """Forward and backward over one optimizer step's micro-batches, then the optimizer.

    `model` is what trains: DDP-wrapped (its `no_sync` skips the all-reduce on every micro-batch
    but the last) and/or compiled, or a plain module on one device.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, cfg: TrainingConfig,
                 device: torch.device, scheduler: Any = None) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.cfg, self.device = cfg, device
        self._params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        loss = self.accumulate(micro_batches)
        self.apply()
        return loss

    def accumulate(self, micro_batches: Sequence[Batch], *, sync: bool = True) -> torch.Tensor:
        """Forward and backward of every micro-batch; gradients are all-reduced with the last one
        (never when `sync` is False: a compute-only step). Returns the mean loss, detached."""
        total = torch.zeros((), device=self.device)
        count = len(micro_batches)
        for i, (x, y) in enumerate(micro_batches):
            with self._sync(sync and i == count - 1), autocast_for(self.device, self.cfg.precision):
                loss = loss_of(self.model, x, y)
                (loss / count).backward()
            total += loss.detach()
        return total / count

    def apply(self) -> None:
        """Clip, step the optimizer (and the schedule), clear the gradients."""
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self._params, self.cfg.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def discard(self) -> None:
        """Drop gradients accumulated by a compute-only step (nothing was applied)."""
        self.optimizer.zero_grad(set_to_none=True)

    def _sync(self, sync: bool) -> contextlib.AbstractContextManager:
        no_sync = getattr(getattr(self.model, "_orig_mod", self.model), "no_sync", None)
        return contextlib.nullcontext() if sync or no_sync is None else no_sync()
