"""The profiler's ladder (`trainers.profiling._climb`) with a fake bench: what stops it, and what
it says fits; a node's workers stepping together (`stepping`). No model, no processes."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from trainers.profiling import _climb, gradient_noise_scale, overlapping_median, stepping


class _Bench:
    """Times a rung in `rung_s` seconds (the first also `compile_s`); a step above `memory` samples OOMs."""

    def __init__(self, *, memory: int, compile_s: float = 0.0, rung_s: float = 0.0) -> None:
        self.memory, self.compile_s, self.rung_s = memory, compile_s, rung_s
        self.device = torch.device("cuda")  # what the ladder is told it runs on; nothing touches it
        self.timed: list[int] = []
        self.checked: list[int] = []
        self.step = self

    def discard(self) -> None:
        pass

    def time_batch(self, rows: Any, size: int) -> dict[str, Any]:
        if size > self.memory:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        time.sleep(self.rung_s + (self.compile_s if not self.timed else 0.0))
        self.timed.append(size)
        return {"local_batch": size, "step_time_s": 0.01 * size}

    def fits(self, rows: Any, size: int) -> bool:
        self.checked.append(size)
        return size <= self.memory


SIZES = [8, 16, 32, 64, 128]


def test_the_ladder_climbs_until_memory_runs_out() -> None:
    bench = _Bench(memory=32)
    samples, meta = _climb(bench, {}, SIZES, time.perf_counter(), budget_s=60, check_fit=True)
    assert [s["local_batch"] for s in samples] == [8, 16, 32] and meta == {"oom_at_local_batch": 64}
    assert bench.checked == []  # within the budget every rung is timed


def test_past_the_budget_the_rungs_left_are_checked_to_fit_not_timed() -> None:
    """A first rung that compiles for longer than the budget must not leave max_local_batch at it
    (GPT-2 small on an H200: 8 where 64 fits)."""
    bench = _Bench(memory=64, compile_s=0.05)
    samples, meta = _climb(bench, {}, SIZES, time.perf_counter(), budget_s=0.01, check_fit=True)
    assert [s["local_batch"] for s in samples] == [8] and bench.timed == [8]
    assert meta == {"stopped_by_budget_at": 8, "fits_unmeasured": [16, 32, 64], "oom_at_local_batch": 128}
    assert bench.checked == [16, 32, 64, 128]  # stops at the first that does not fit


def test_without_a_fit_check_the_budget_just_stops_the_ladder() -> None:
    bench = _Bench(memory=1024, compile_s=0.05)
    samples, meta = _climb(bench, {}, SIZES, time.perf_counter(), budget_s=0.01)
    assert [s["local_batch"] for s in samples] == [8] and meta == {"stopped_by_budget_at": 8}
    assert bench.checked == []


def test_the_noise_scale_is_none_unless_the_norms_give_a_finite_positive_one() -> None:
    # E|G_B|^2 = |G|^2 + tr(S)/B with |G|^2 = 1, tr(S) = 64: B_simple = 64
    assert gradient_noise_scale((8, [1 + 64 / 8] * 3), (32, [1 + 64 / 32] * 3)) == pytest.approx(64)
    nan, inf = float("nan"), float("inf")
    for small, big in (([nan] * 3, [3.0] * 3), ([inf] * 3, [inf] * 3), ([1.0] * 3, [2.0] * 3)):
        assert gradient_noise_scale((8, small), (32, big)) is None, (small, big)


def test_a_nodes_workers_time_their_steps_together_whatever_their_start_up() -> None:
    """Workers of one node start seconds apart (a process, the model, compiling each); 20 short
    steps each would not overlap and the contention would go unmeasured: each waits for the others
    once warmed up."""
    barrier = threading.Barrier(2)
    timed: list[Any] = [None, None]

    def worker(i: int, start_up_s: float) -> None:
        time.sleep(start_up_s)
        timed[i] = stepping(lambda: time.sleep(0.002), steps=20, ready=barrier.wait)

    threads = [threading.Thread(target=worker, args=(i, s)) for i, s in enumerate((0.0, 0.5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(timed[0]) == len(timed[1]) == 20
    assert abs(timed[0][0][0] - timed[1][0][0]) < 0.1 and overlapping_median(timed) is not None
