"""A worker's training shard, kept in memory after its first pass when it fits a budget.

Ray Data streams and collates every batch of every epoch; for a shard that fits in memory, the
later epochs can index tensors instead, as a plain PyTorch loop does. The first pass (after every
(re)start) still streams from Ray Data and records what it yields; the cached epochs then visit
that same shard in a fresh random order (seeded per epoch and rank). The last partial batch of
the first pass (fewer rows than a local batch) is dropped there and stays out of the cache.
The validation shard is kept the same way (`EvalCache`), whole and in order.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class ShardCache:
    """Collects ``(x, y)`` batches during a streaming pass; replays them shuffled afterwards.

    Gives up (and frees what it holds) as soon as the shard's estimated size passes
    ``budget_bytes``: the estimate is the first batch's bytes per sample times ``expected_samples``,
    so every rank, holding equal shards of the same columns, decides alike.
    """

    def __init__(self, *, budget_bytes: float, expected_samples: int) -> None:
        self._budget, self._expected = budget_bytes, expected_samples
        self._xs: list[torch.Tensor] = []
        self._ys: list[torch.Tensor] = []
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self.enabled = budget_bytes > 0
        self.estimate_bytes = 0.0

    @property
    def ready(self) -> bool:
        return self._x is not None

    def add(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        if not self.enabled or self.ready:
            return
        if not self._xs:
            per_sample = _nbytes(x) + (_nbytes(y) if y is not None else 0)
            self.estimate_bytes = per_sample / max(len(x), 1) * self._expected
            if self.estimate_bytes > self._budget:
                self.enabled = False
                return
        self._xs.append(x.detach().cpu())
        if y is not None:
            self._ys.append(y.detach().cpu())

    def seal(self) -> bool:
        """End of the first full pass: join the batches; True when the cache can serve epochs."""
        if self.enabled and self._xs and not self.ready:
            self._x = torch.cat(self._xs)
            self._y = torch.cat(self._ys) if self._ys else None
        self._xs, self._ys = [], []
        return self.ready

    def drop(self) -> None:
        self.enabled, self._x, self._y, self._xs, self._ys = False, None, None, [], []

    def batches(self, batch_size: int, *, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Full batches of the cached shard in a random order drawn from `seed`."""
        if self._x is None:
            raise RuntimeError("the shard cache is not sealed yet")
        order = torch.randperm(len(self._x), generator=torch.Generator().manual_seed(seed))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            yield self._x[index], None if self._y is None else self._y[index]


def _nbytes(t: torch.Tensor) -> int:
    return t.element_size() * t.numel()


class EvalCache:
    """A worker's validation shard, kept as the batches its first pass yielded (in order, the last
    partial one included) while their bytes stay within ``budget_bytes``: later evaluations then
    read memory instead of starting one more Ray Data execution per epoch."""

    def __init__(self, *, budget_bytes: float) -> None:
        self._budget = budget_bytes
        self._batches: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._bytes = 0
        self.enabled = budget_bytes > 0
        self.ready = False

    def add(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        if not self.enabled or self.ready:
            return
        self._bytes += _nbytes(x) + (_nbytes(y) if y is not None else 0)
        if self._bytes > self._budget:
            self.drop()
            return
        self._batches.append((x.detach().cpu(), None if y is None else y.detach().cpu()))

    def seal(self) -> bool:
        self.ready = self.enabled
        return self.ready

    def drop(self) -> None:
        self.enabled, self.ready, self._batches = False, False, []

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        if not self.ready:
            raise RuntimeError("the evaluation cache is not sealed yet")
        return iter(self._batches)
