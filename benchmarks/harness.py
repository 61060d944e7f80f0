"""What every benchmark shares: the environment, a scratch workspace, statistics and result rows."""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# Set before Ray is imported here and in every process a benchmark starts: every Ray server on
# 127.0.0.1, no token prompt for local clusters, no usage stats, gloo over loopback, Ray Train V2.
ENV_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback only (orchestrator/ray_session.py)
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "GLOO_SOCKET_IFNAME": "lo",
    "RAY_TRAIN_V2_ENABLED": "1",
}


def setup_environment() -> None:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a process a benchmark starts: ours, plus the repo on PYTHONPATH."""
    env = {**os.environ, **ENV_DEFAULTS, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("RAY_ADDRESS", None)  # every benchmark names the cluster it means
    return env


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True, slots=True)
class Stat:
    """Median and range of repeated measurements (one value per repeat)."""

    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            raise ValueError("no measurements")
        return cls(statistics.median(values), min(values), max(values), len(values))


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> Stat:
    """Ratio of each repeat's pair, measured back to back, so slow spells on the machine cancel."""
    return Stat.of([a / b for a, b in zip(numerators, denominators, strict=True)])


def after_warmup(values: Sequence[float], warmup: int = 5) -> list[float]:
    # The loop's own rule for `observed_step_time_s` (trainers/loop.py: _summary).
    return list(values[min(warmup, len(values) // 2):])


# ---------------------------------------------------------------------------------------------
# Result rows: one line of the table each


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One measurement: our path, the bare alternative, their ratio and the goal it is held to."""

    section: str
    measure: str
    unit: str
    ours: Stat | None = None
    baseline: Stat | None = None
    baseline_label: str = ""
    ratio: Stat | None = None
    ratio_label: str = ""
    goal: str = ""
    met: bool | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SectionResult:
    """What one benchmark hands back: rows for the table, and raw figures for latest.json."""

    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # printed under the table
    skipped: str | None = None  # why the benchmark did not run


class LoadSampler:
    """The machine's 1-minute load average every few seconds, in a daemon thread: the context
    (other people's jobs on a shared machine) every figure was measured in."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), name="load-sampler", daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(every_s)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        return {"min": min(self.samples), "median": statistics.median(self.samples), "max": max(self.samples)}


# ---------------------------------------------------------------------------------------------
# Scratch space: data sets, MLflow store, checkpoints, logs; removed at the end


class Workspace:
    def __init__(self, root: Path | None = None) -> None:
        self._tmp = None if root else tempfile.TemporaryDirectory(prefix="bench-")
        self.root = Path(root or self._tmp.name)  # type: ignore[union-attr]
        for sub in ("data", "runs", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    def data_dir(self, name: str) -> Path:
        return self.root / "data" / name

    def storage(self, run_name: str) -> Path:
        return self.root / "runs" / run_name

    def log(self, name: str) -> Path:
        return self.root / "logs" / name

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
