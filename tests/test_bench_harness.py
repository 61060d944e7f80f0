"""The benchmarks' stand-ins keep up with the code they stand beside (`make bench` is not run by
`make test`; it broke twice unseen)."""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.bare_ray_train import StepRecorder

TRAINERS = Path(__file__).resolve().parents[1] / "trainers"


def test_the_bare_baselines_recorder_answers_every_call_the_loop_makes_to_the_progress_actor() -> None:
    """The loop began asking the progress actor `given_up()`; the bare baseline's recorder had no
    such method, so every bare run failed at its first step and `make bench` measured nothing."""
    called = {name for path in TRAINERS.rglob("*.py")
              for name in re.findall(r"progress\.(\w+)\.remote\(", path.read_text())}
    assert {"publish", "stop_requested", "given_up", "register_worker"} <= called
    assert sorted(name for name in called if not callable(getattr(StepRecorder, name, None))) == []
