"""Rank 0's deferred metric sink: points logged while MLflow opens keep their order and time."""

from __future__ import annotations

import threading
import time

import pytest

from trainers.metric_sink import DeferredSink


class FakeBuffer:
    def __init__(self) -> None:
        self.points: list[tuple[int, dict, int | None]] = []
        self.closed = False

    def add(self, metrics, *, step, timestamp_ms=None) -> None:
        self.points.append((step, dict(metrics), timestamp_ms))

    @property
    def pending(self) -> int:
        return 0

    def flush(self, timeout_s: float) -> bool:
        return True

    def close(self, timeout_s=None):
        self.closed = True


def test_points_logged_while_opening_arrive_first_in_order_with_their_own_time() -> None:
    opened, buffer = threading.Event(), FakeBuffer()

    def open_sink() -> FakeBuffer:
        opened.wait(5)
        return buffer

    sink = DeferredSink(open_sink)
    before = int(time.time() * 1000)
    sink.add({"train/loss": 1.0}, step=1)
    sink.add({"train/loss": 0.5}, step=2)
    assert sink.pending == 2 and buffer.points == []
    opened.set()
    assert sink.flush(5)
    sink.add({"train/loss": 0.25}, step=3)
    assert [p[0] for p in buffer.points] == [1, 2, 3]
    early_time = buffer.points[0][2]
    assert early_time is not None and before <= early_time <= int(time.time() * 1000)
    assert buffer.points[2][2] is None  # logged after opening: the buffer stamps it itself
    sink.close()
    assert buffer.closed


def test_a_failed_open_reaches_the_training_thread_but_not_close() -> None:
    def open_sink() -> FakeBuffer:
        raise ConnectionError("tracking server down")

    sink = DeferredSink(open_sink)
    assert sink.close(5) is None  # the loop's cleanup does not hide the first error
    with pytest.raises(RuntimeError, match="tracking server down"):
        sink.add({"train/loss": 1.0}, step=1)
    with pytest.raises(RuntimeError):
        sink.flush(1)
