"""How a constant global batch is split over any number of workers (pure arithmetic)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BatchSplit:
    local_batch: int  # samples per worker per micro-step
    accumulation: int  # micro-steps per optimizer step
    workers: int

    @property
    def global_batch(self) -> int:
        return self.local_batch * self.accumulation * self.workers


def split_global_batch(
    global_batch: int, *, workers: int, max_local_batch: int | None = None, accumulation: int | None = None
) -> BatchSplit:
    """Smallest accumulation whose local batch fits `max_local_batch` and divides evenly.

    The global batch (and with it the learning-rate schedule) stays what the config says for any
    worker count; when it does not divide by the workers the nearest smaller multiple is used.
    """
    if workers <= 0 or global_batch <= 0:
        raise ValueError(f"workers and global_batch must be > 0, got {workers}, {global_batch}")
    per_worker = max(global_batch // workers, 1)
    if accumulation is not None:
        return BatchSplit(max(per_worker // accumulation, 1), accumulation, workers)
    local = _largest_divisor(per_worker, at_most=max(min(max_local_batch or per_worker, per_worker), 1))
    return BatchSplit(local, per_worker // local, workers)


def _largest_divisor(n: int, *, at_most: int) -> int:
    """The largest divisor of `n` that is <= `at_most` (the local batch of the smallest
    accumulation), in min(at_most, sqrt(n)) trials whatever the size of `n`."""
    root = math.isqrt(n)
    if at_most <= root:
        return next(d for d in range(at_most, 0, -1) if n % d == 0)
    # Divisors above sqrt(n) pair with those below it: the largest within reach is n // (the
    # smallest small divisor whose pair is within it), else the largest small divisor.
    for small in range(max(1, -(-n // at_most)), root + 1):
        if n % small == 0:
            return n // small
    return next(d for d in range(root, 0, -1) if n % d == 0)
