"""The foundation end to end, on a real multi-node Ray cluster and a real MLflow sqlite store."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from ray_util import RecordingUI

from orchestrator.config import load_config
from orchestrator.driver import run_job

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"


def steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)]


def assert_unique_monotone(values: list[int]) -> None:
    assert values, "no metric points logged"
    assert all(a < b for a, b in zip(values, values[1:])), f"steps repeat or go back: {values}"


def test_cli_two_workers_train_digits_and_register_model(ray_cluster, job_overrides, tmp_path: Path) -> None:
    # Profiling and planning through the CLI: test_planning_integration.py.
    overrides = job_overrides + ["tracking.registered_model=digits-test", "resources.profile=false"]
    sets = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", str(DIGITS), "--workers", "2",
         "--address", ray_cluster.address, *sets],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered model version: 1" in proc.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    run_id = proc.stdout.split("MLflow run: ")[1].split()[0]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["training.global_batch_size"] == "64"
    assert run.data.params["model.name"] == "cnn"
    assert run.data.tags["workers"] == "2"
    assert_unique_monotone(steps(client, run_id))
    accuracy = client.get_metric_history(run_id, "val/accuracy")
    assert len(accuracy) == 15  # one evaluation per epoch
    assert max(m.value for m in accuracy) >= 0.95

    # The registered model loads back with mlflow.pytorch and predicts the held-out digits.
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model("models:/digits-test/1")
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data[-300:] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    import torch

    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    assert (predicted == digits.target[-300:]).mean() >= 0.95


def test_interrupted_job_resumes_same_run_without_duplicate_steps(ray_cluster, job_overrides) -> None:
    # 200 steps (~4 s here; epochs of 28, no held-out rows), asked to stop at step 25: a stop takes
    # the driver's poll and rank 0's next check, up to ~1 s, so the job must outlast that by far.
    total = 200
    job = load_config(DIGITS, job_overrides + ["training.epochs=null", f"training.max_steps={total}",
                                               "data.val_fraction=0", "checkpoint.every_steps=50",
                                               "resources.profile=false"])
    stop = threading.Event()

    def stop_after_step_25(step: int, total: int, info: dict) -> None:
        if step >= 25:
            stop.set()

    first = run_job(job, workers=2, ui=RecordingUI(on_progress=stop_after_step_25), stop=stop)
    assert first.stopped
    assert 25 <= first.final_step < total
    client = MlflowClient(job.localized().tracking.tracking_uri)
    assert client.get_run(first.run_id).info.status == "KILLED"

    second = run_job(job, workers=2)
    assert not second.stopped and second.run_id == first.run_id
    assert second.final_step == total  # the count continued, not restarted
    assert second.groups[0].resumed_from == first.final_step
    logged = steps(client, first.run_id)
    assert_unique_monotone(logged)
    assert logged[-1] == total
    assert client.get_run(first.run_id).info.status == "FINISHED"

    again = run_job(job, workers=2)  # finished: said so, nothing run
    assert again.already_complete is not None and again.already_complete["step"] == total and again.run_id == first.run_id


def test_missing_column_fails_before_any_worker(job_overrides, tmp_path: Path) -> None:
    sets = [a for o in job_overrides + ["data.features.column=pixelz"] for a in ("--set", o)]
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", str(DIGITS), *sets],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.features.column: column 'pixelz' not found" in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing was launched


def test_held_out_rows_make_the_validation_set_and_none_make_none(ray_cluster, job_overrides) -> None:
    from orchestrator.driver.data import load_datasets

    held_out = load_datasets(load_config(DIGITS, job_overrides).localized())
    assert held_out.val is not None and 0 < held_out.train_rows < 1797  # digits: 1,797 rows
    none = load_datasets(load_config(DIGITS, [*job_overrides, "data.val_fraction=0"]).localized())
    assert none.val is None and none.train_rows == 1797  # Ray Train gets no "val" set (fit.py)


def test_a_diverged_job_fails_in_one_line_and_leaves_no_checkpoint_of_nan_weights(ray_cluster, job_overrides) -> None:
    """lr 1e30: the weights overflow within a few steps. The driver stops the group at the first NaN
    loss and fails the run; the stop's checkpoint of NaN weights is not written, so what a resume
    would load (the newest checkpoint, if any) holds numbers."""
    import torch

    from orchestrator.errors import UserError
    from trainers import checkpoint as ckpt

    job = load_config(DIGITS, job_overrides + ["training.lr=1e30", "training.epochs=null", "training.max_steps=400",
                                               "data.val_fraction=0", "checkpoint.every_steps=1",
                                               "resources.profile=false"])
    with pytest.raises(UserError, match=r"^train/loss: (nan|inf) at step \d+: training diverged; lower training.lr"):
        run_job(job, workers=2)
    run_dir = Path(job.localized().checkpoint.storage_path) / job.name
    for folder in (p for p in run_dir.glob(f"{ckpt.DIR_PREFIX}*") if p.is_dir()):
        state = ckpt.read(folder)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()), folder.name
    client = MlflowClient(job.localized().tracking.tracking_uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
