"""Rank 0's MLflow metric sink, opened off the training thread.

Opening it imports MLflow and reads the run's history (to skip steps logged before a restart):
seconds on a busy core, which would otherwise sit between the worker group's start and step 1.
Points logged meanwhile wait here, with the time they were logged, and go to the real buffer
(orchestrator.tracking.MetricBuffer) in order once it is open. If opening fails, the training
thread gets that error at its next call, as it would have at start.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any


class DeferredSink:
    def __init__(self, open_sink: Callable[[], Any]) -> None:
        self._lock = threading.Lock()
        self._early: list[tuple[dict[str, float], int, int]] = []
        self._sink: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._open, args=(open_sink,), name="mlflow-open", daemon=True)
        self._thread.start()

    def _open(self, open_sink: Callable[[], Any]) -> None:
        try:
            sink = open_sink()
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread
            self._error = exc
            return
        with self._lock:
            for metrics, step, timestamp_ms in self._early:
                sink.add(metrics, step=step, timestamp_ms=timestamp_ms)
            self._early, self._sink = [], sink

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"could not open the MLflow metric sink: {self._error}") from self._error

    def add(self, metrics: Mapping[str, float], *, step: int) -> None:
        self._raise_if_failed()
        with self._lock:
            if self._sink is None:
                self._early.append((dict(metrics), step, int(time.time() * 1000)))
                return
        self._sink.add(metrics, step=step)

    @property
    def pending(self) -> int:
        with self._lock:
            return self._sink.pending if self._sink is not None else len(self._early)

    def _opened(self, timeout_s: float) -> Any:
        self._thread.join(timeout_s)
        self._raise_if_failed()
        return self._sink

    def flush(self, timeout_s: float) -> bool:
        started = time.monotonic()
        sink = self._opened(timeout_s)
        return sink is not None and sink.flush(max(timeout_s - (time.monotonic() - started), 0.0))

    def close(self, timeout_s: float | None = None) -> Any:
        """Close the real buffer (what MetricBuffer.close returns); never raises, as it runs
        while the loop unwinds from another error too."""
        self._thread.join(timeout_s if timeout_s is not None else 60.0)
        return self._sink.close(timeout_s) if self._sink is not None else None
