"""How a constant global batch is split over any number of workers (pure arithmetic)."""

from __future__ import annotations

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
    limit = max_local_batch or per_worker
    for accum in range(1, per_worker + 1):
        if per_worker % accum == 0 and per_worker // accum <= limit:
            return BatchSplit(per_worker // accum, accum, workers)
    return BatchSplit(1, per_worker, workers)
