"""Figures past the planner's bounds (orchestrator/planner/base.py: far beyond any real job or
cluster, and where float64 would overflow or underflow) are one line naming the file and the
field, exit code 2; a damaged stored calibration is passed over with a warning; figures at the
bounds still plan. Before: OverflowError, TypeError or a Prediction's ValidationError, exit 1."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from planner_util import make_cluster, make_profile, profile_dict

from orchestrator.calibrations import newest, stored_path
from orchestrator.errors import UserError
from orchestrator.planner import Observation, Profile, calibrate, load_cluster, load_observations, plan, predict
from orchestrator.planner import base
from orchestrator.planner.types import FIT_RANGE, MAX_GPUS

ROOT = Path(__file__).resolve().parents[1]
DGX = ROOT / "configs" / "clusters" / "dgx_a100.yaml"
CALIBRATION = ("calibration: {source: jobs, measured_at: '2026-01-01T00:00:00Z', intra_GBps: 200.0, inter_GBps: 20.0, "
               "base_latency_us: 5.0, latency_us: 1.0, inter_latency_us: 5.0, overlap: 0.5")


def orchestrator(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, "XDG_CACHE_HOME": str(cwd / "cache")})


def with_sample(**sample: Any) -> dict[str, Any]:
    data = profile_dict()
    data["samples"].append({"local_batch": 256, "step_time_s": 0.25, **sample})
    return data


@pytest.mark.parametrize(("data", "message"), [
    (profile_dict(grad_bytes=10**400), r"profile\.grad_bytes: must be <= 1e\+15, got an integer of about 401 digits"),
    ({**with_sample(local_batch=10**30), "max_local_batch": 10**30},
     r"profile\.samples\[3\]\.local_batch: must be <= 2,147,483,648, got 1000000000000000000000000000000"),
    ({**with_sample(local_batch=2**63), "max_local_batch": 2**63},
     r"profile\.samples\[3\]\.local_batch: must be <= 2,147,483,648, got 9223372036854775808"),
    (with_sample(step_time_s=1e308), r"profile\.samples\[3\]\.step_time_s: must be <= 1e\+06, got 1e\+308"),
    (with_sample(step_time_s=5e-324),
     r"profile\.samples\[3\]\.step_time_s: must be >= 1e-09 \(a nanosecond\), got 5e-324"),
    (profile_dict(data_samples_per_s=5e-324), r"profile\.data_samples_per_s: must be >= 1e-06 .*, got 5e-324"),
])
def test_extreme_profile_figures_are_one_line_naming_the_file_and_field(data: dict[str, Any], message: str,
                                                                        tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: {message}$"):
        Profile.load(path)


def dgx(line: str) -> str:
    """The shipped DGX cluster file with `line` added, in place of the line setting the same key."""
    key = line.split(":")[0] + ":"
    return "".join(x for x in DGX.read_text().splitlines(keepends=True) if not x.startswith(key)) + line + "\n"


@pytest.mark.parametrize(("line", "message"), [
    ("intra_node_GBps: 5.0e-324", r"cluster\.intra_node_GBps: must be >= 0\.001 \(1 MB/s\), got 5e-324"),
    ("link_efficiency: 5.0e-324", r"cluster\.link_efficiency: must be >= 0\.001 .*, got 5e-324"),
    (CALIBRATION + ", jitter: 1.0e+308}", r"cluster\.calibration\.jitter: must be <= 10, got 1e\+308"),
    (CALIBRATION + ", residuals: {low: -1.0, median: 0.0, high: 800.0, n: 5, method: in-sample}}",
     r"cluster\.calibration\.residuals\.high: must be <= 13\.8155, got 800\.0"),
    ("1.5: 3", r"cluster: keys must be strings \(field names\), got 1\.5"),
    ("null: 3", r"cluster: keys must be strings \(field names\), got None"),
    ("1: 2", r"cluster: keys must be strings \(field names\), got 1"),
    (CALIBRATION.replace("'2026-01-01T00:00:00Z'", "t" * 5000) + "}",
     r"cluster\.calibration\.measured_at: must be an ISO 8601 time .*, got 'tttt*\.\.\. \(5,002 characters\)"),
])
def test_extreme_cluster_figures_and_keys_are_one_line_naming_the_file_and_field(line: str, message: str,
                                                                                  tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(dgx(line))
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: {message}$"):
        load_cluster(path)


def test_a_nested_non_string_key_is_one_line_not_a_type_error() -> None:
    raw = {"profile": {**profile_dict(), 7: 1}, "nodes": 1, "gpus_per_node": 2, "local_batch": 32, "step_time_s": 0.1}
    with pytest.raises(UserError, match=r"^observation\.profile: keys must be strings \(field names\), got 7$"):
        Observation.from_dict(raw)


def test_figures_at_the_bounds_still_plan() -> None:
    """The bounds are tight enough: every prediction at them is finite and positive."""
    top = {"local_batch": base.MAX_BATCH, "step_time_s": base.MAX_SECONDS, "optimizer_s": base.MAX_SECONDS / 2}
    extremes = [
        make_profile(grad_bytes=base.MAX_BYTES, data_samples_per_s=base.MIN_RATE, max_local_batch=base.MAX_BATCH,
                     samples=[{"local_batch": 1, "step_time_s": base.MIN_SECONDS}, top],
                     node_samples=[{"gpus_per_node": 8, "local_batch": 1, "step_time_s": base.MAX_SECONDS}]),
        make_profile(data_samples_per_s=base.MAX_RATE, gradient_noise_scale=1e308,
                     samples=[{"local_batch": base.MAX_BATCH, "step_time_s": base.MIN_SECONDS}],
                     max_local_batch=base.MAX_BATCH),
    ]
    slow = dict(intra_node_GBps=base.MIN_GBPS, inter_node_GBps=base.MIN_GBPS, link_efficiency=base.MIN_EFFICIENCY,
                latency_us=base.MAX_LATENCY_US, gpu_hour_cost=base.MAX_USD_PER_GPU_HOUR)
    low = base.MIN_GBPS * base.MIN_EFFICIENCY / FIT_RANGE
    wide = {"low": -base.MAX_RESIDUAL, "median": 0.0, "high": base.MAX_RESIDUAL, "n": 3}
    clusters = [make_cluster(**slow)] + [make_cluster(calibration={
        "source": "jobs", "measured_at": "2026-01-01T00:00:00Z", "intra_GBps": gbps, "inter_GBps": gbps,
        "base_latency_us": latency, "latency_us": latency, "inter_latency_us": latency, "overlap": 0.0,
        "jitter": base.MAX_JITTER, "residuals": {**wide, "method": method}})
        for gbps, latency, method in ((low, base.MAX_LATENCY_US * FIT_RANGE, "in-sample"),
                                      (base.MAX_GBPS * FIT_RANGE, 0.0, "all-reduce"))]
    runs = [(profile, cluster, batch) for profile in extremes for cluster in clusters for batch in (None, 2**53)]
    runs.append((extremes[0], make_cluster(nodes=MAX_GPUS // 8, **slow), 2**53))  # the most ranks and ring hops
    for profile, cluster, batch in runs:
        chosen = plan(profile, cluster, objective="min_cost", global_batch=batch, total_samples=base.MAX_INTEGER)
        assert all(math.isfinite(v) and v > 0 for v in (chosen.choice.cost, chosen.time_to_finish_s,
                                                         chosen.choice.step_time_high_s, chosen.choice.throughput_low))


def test_predict_and_plan_arguments_past_the_bounds_are_one_line() -> None:
    with pytest.raises(UserError, match=r"^predict\.nodes: must be <= 1,000,000, got 9007199254740992$"):
        predict(make_profile(), make_cluster(), nodes=2**53, gpus_per_node=1, local_batch=1)
    with pytest.raises(UserError, match=r"^predict\.local_batch: the global batch .* must be <= 2\*\*53"):
        predict(make_profile(), make_cluster(), nodes=1, gpus_per_node=1, local_batch=2**53, accumulation=2**53)
    with pytest.raises(UserError, match=r"^plan\.deadline_s: must be <= 3,600,000,000, got 1e\+300$"):
        plan(make_profile(), make_cluster(), total_samples=10**6, deadline_s=1e300)
    for accumulation in (2**64, 2**31 + 1):  # 2**64: pydantic's ValidationError of an int64 row that overflowed
        with pytest.raises(UserError, match=r"^plan\.accumulation: must be an integer 1 to 2\*\*31 or None, got \d+$"):
            plan(make_profile(), make_cluster(), accumulation=accumulation)


def test_an_observed_step_on_more_gpus_than_the_planner_plans_is_one_line_naming_the_file(tmp_path: Path) -> None:
    """Each count was held to 10**6 alone, so 10**6 x 10**6 GPUs was taken and calibrated on."""
    path = tmp_path / "obs.json"
    obs = {"profile": profile_dict(), "nodes": MAX_GPUS // 8, "gpus_per_node": 8, "local_batch": 64,
           "step_time_s": 0.5}
    path.write_text(json.dumps([obs, {**obs, "nodes": MAX_GPUS // 8 + 1}]))
    message = r"observations\[1\]\.nodes: 8,193 nodes x 8 GPUs is 65,544 GPUs; the planner plans up to 65,536"
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: {message}$"):
        load_observations(path)
    with pytest.raises(UserError, match=r"^observation\.nodes: 1,000,000 nodes x 1,000,000 GPUs is "):
        Observation(**{**obs, "nodes": 10**6, "gpus_per_node": 10**6})
    assert Observation.from_dict(obs).nodes == MAX_GPUS // 8  # at the bound: taken


@pytest.mark.parametrize(("step", "message"), [
    (1e307, r"observations\[0\]\.step_time_s: must be <= 1e\+06, got 1e\+307"),
    (5e-324, r"observations\[0\]\.step_time_s: must be >= 1e-09 \(a nanosecond\), got 5e-324"),
])
def test_extreme_observations_are_one_line_naming_the_file(step: float, message: str, tmp_path: Path) -> None:
    path = tmp_path / "obs.json"
    obs = {"profile": profile_dict(), "nodes": 2, "gpus_per_node": 8, "local_batch": 64, "step_time_s": step}
    path.write_text(json.dumps([obs]))
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: {message}$"):
        load_observations(path)


def test_an_observations_file_with_an_integer_past_4300_digits_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "obs.json"
    for text in ('[{"nodes": ' + "1" * 5000 + "}]", '{"nodes": ' + "1" * 5000 + "}\n"):  # and a key given twice
        path.write_text(text.replace("1" * 5000, '1, "nodes": 2'))
        with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: not valid JSON \(duplicate key 'nodes'\)"):
            load_observations(path)
        path.write_text(text)
        with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: not valid JSON \(Exceeds the limit"):
            load_observations(path)


def test_observations_no_calibration_explains_are_one_line() -> None:
    fast = profile_dict(samples=[{"local_batch": 32, "step_time_s": 1e-6}], max_local_batch=32, grad_bytes=1000)
    obs = {"profile": fast, "nodes": 2, "gpus_per_node": 8, "local_batch": 32, "step_time_s": 1e6}
    with pytest.raises(UserError, match=r"^calibrate\.observations: the observed step times are .* times off"):
        calibrate(make_cluster(), [obs])


@pytest.mark.parametrize("damage", ["1: 2", CALIBRATION + ", residuals: {low: -1000.0, median: 0.0, high: 1000.0, "
                                            "n: 5, method: in-sample}}"])
def test_a_damaged_stored_calibration_is_passed_over_with_a_warning(damage: str, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    spec = load_cluster(DGX)
    stored_path(spec, tmp_path).write_text(dgx(damage))
    with caplog.at_level(logging.WARNING, logger="orchestrator.calibrations"):
        assert newest(spec, tmp_path) == (spec, None)
    [record] = caplog.records
    said = record.getMessage()
    assert said.startswith(f"ignoring a stored calibration: {stored_path(spec, tmp_path)}: cluster")
    assert "\n" not in said


def test_plan_on_a_damaged_cache_and_bad_deadlines_from_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(json.dumps(profile_dict()))
    spec = load_cluster(DGX)
    stored = stored_path(spec, tmp_path / "cache" / "orchestrator" / "clusters")
    stored.parent.mkdir(parents=True)
    stored.write_text(dgx("null: 3"))
    proc = orchestrator("plan", "--profile", "p.json", "--cluster", str(DGX), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ignoring a stored calibration" in proc.stderr and "keys must be strings" in proc.stderr
    for hours, got in (("0", "0.0"), ("1e308", "1e+308")):
        proc = orchestrator("plan", "--profile", "p.json", "--cluster", str(DGX), "--total-samples", "1000",
                            "--deadline-hours", hours, cwd=tmp_path)
        assert (proc.returncode, proc.stderr) == (
            2, f"error: --deadline-hours: must be a number of hours > 0 and at most 1,000,000, got {got}\n")


def test_a_deadline_in_hours_names_where_it_came_from() -> None:
    assert base.deadline_from_hours(None, "x") is None and base.deadline_from_hours(2, "x") == 7200
    for bad in (0, -1.0, math.inf, math.nan, 1e308, True, "2"):
        with pytest.raises(UserError, match=r"^resources\.deadline_hours: must be a number of hours > 0"):
            base.deadline_from_hours(bad, "resources.deadline_hours")  # type: ignore[arg-type]


def test_a_cluster_too_large_to_read_back_is_not_written(tmp_path: Path) -> None:
    """30,000 all-reduce samples (a run's logged cluster): calibrate stored it, and plan then ignored
    it as more than a cluster file holds. Now nothing unreadable is written."""
    from orchestrator.planner import save_cluster

    samples = [{"bytes": 2**20 + i, "nodes": 1, "gpus_per_node": 2, "seconds": 0.01} for i in range(30_000)]
    big = make_cluster().replace(allreduce_samples=tuple(samples))
    with pytest.raises(UserError, match=r"more than 100,000 values.*: not written \(30,000 all-reduce samples\)$"):
        save_cluster(big, tmp_path / "big.yaml")
    assert not (tmp_path / "big.yaml").exists()
    assert load_cluster(save_cluster(make_cluster(), tmp_path / "ok.yaml")) == make_cluster()
