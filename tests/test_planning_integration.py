"""Profile on one worker, plan, and a planned run that logs profile, plan, plot and prediction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.calibrations import CLUSTER_ARTIFACT, CLUSTER_KEY_TAG, cluster_key
from orchestrator.planner import OBSERVATIONS_ARTIFACT, ClusterSpec, Plan, Profile, load_cluster

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"


def orchestrator(*args: str, cwd: Path, timeout: int = 600, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_profile_then_plan_from_the_cli(ray_cluster, job_overrides, tmp_path: Path) -> None:
    proc = orchestrator("profile", str(DIGITS), "-o", "profile.json", "--address", ray_cluster.address,
                        *sets(job_overrides), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = Profile.load(tmp_path / "profile.json")
    assert profile.model == "cnn" and profile.param_count > 0
    assert profile.grad_bytes == 4 * profile.param_count  # fp32 gradients
    assert [s.local_batch for s in profile.samples] == [8, 16, 32, 64]  # doubling up to the global batch
    assert all(s.fwd_bwd_s and s.optimizer_s for s in profile.samples)
    assert profile.data_samples_per_s and profile.data_samples_per_s > 0

    again = orchestrator("profile", str(DIGITS), "-o", "again.json", "--address", ray_cluster.address,
                         *sets(job_overrides), cwd=tmp_path)
    assert "cached" in again.stdout  # same config digest and device: no second measurement

    cluster = ROOT / "configs" / "clusters" / "dgx_a100.yaml"
    proc = orchestrator("plan", "--profile", "profile.json", "--cluster", str(cluster), "--global-batch", "64",
                        "--json", "--plot", "scaling.png", "-o", "plan.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    saved = Plan.load(tmp_path / "plan.json")
    assert printed["workers"] == saved.workers >= 1
    assert saved.explanation.startswith(f"Chose {saved.workers} GPU")
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_workers_of_one_node_are_timed_stepping_together(ray_cluster, job_overrides) -> None:
    """Per-node contention: 2 workers packed on one node, released together after their warm-up
    (their start-ups differ by more than their timed steps take), so their steps overlap."""
    from orchestrator.config import load_config
    from orchestrator.profiler import _measure_node

    job = load_config(DIGITS, job_overrides).localized()
    sample = _measure_node(job, use_gpu=False, gpus=2, local_batch=64)
    assert sample is not None and sample["gpus_per_node"] == 2 and sample["step_time_s"] > 0


def test_bad_profile_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(json.dumps({"version": 99, "model": "x"}))
    cluster = ROOT / "configs" / "clusters" / "cpu_local.yaml"
    proc = orchestrator("plan", "--profile", "p.json", "--cluster", str(cluster), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "profile.version" in proc.stderr


def test_auto_workers_profile_plan_and_log_prediction(ray_cluster, job_overrides, tmp_path: Path) -> None:
    proc = orchestrator("run", str(DIGITS), "--address", ray_cluster.address,
                        *sets(job_overrides + ["training.max_steps=30", "data.val_fraction=0"]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Chose " in proc.stderr  # the plan's one-sentence explanation
    run_id = proc.stdout.split("MLflow run: ")[1].split()[0]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    artifacts = {a.path for folder in ("profile", "plan") for a in client.list_artifacts(run_id, folder)}
    assert {"profile/profile.json", "plan/plan.json", "plan/scaling.png"} <= artifacts
    plan = Plan.from_dict(json.loads(Path(client.download_artifacts(run_id, "plan/plan.json", str(tmp_path))).read_text()))
    run = client.get_run(run_id)
    assert run.data.tags["workers"] == str(plan.workers)
    assert "| GPUs |" in run.data.tags["mlflow.note.content"]  # the plan table in the run description
    metrics = run.data.metrics
    assert metrics["plan/predicted_step_time_s"] == pytest.approx(plan.step_time_s)
    assert metrics["plan/observed_step_time_s"] > 0
    # The cluster it was planned on, by key, for `orchestrator calibrate --experiment` to group runs by
    assert {CLUSTER_ARTIFACT, OBSERVATIONS_ARTIFACT} <= artifacts
    cluster = ClusterSpec.load(client.download_artifacts(run_id, CLUSTER_ARTIFACT, str(tmp_path)))
    assert run.data.tags[CLUSTER_KEY_TAG] == cluster_key(cluster)
    assert run.data.tags["plan.calibration"].startswith("network calibrated from probe-network")
    calibrated = orchestrator("calibrate", "--experiment", "digits", "--tracking-uri",
                              f"sqlite:///{tmp_path / 'mlflow.db'}", "-o", "cluster.yaml", cwd=tmp_path, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert calibrated.returncode == 0, calibrated.stderr[-3000:]
    assert f"from 1 run(s) on cluster {cluster_key(cluster)}" in calibrated.stdout
    assert load_cluster(tmp_path / "cluster.yaml").calibration.source == "jobs"
