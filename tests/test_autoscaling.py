"""Autoscaling with Ray's fake multi-node autoscaler: the job asks for GPU workers, GPU nodes appear,
the job trains on them, and its request is withdrawn afterwards so the autoscaler scales down.

The cluster belongs to this module (a head whose v1 autoscaler launches fake nodes on this machine;
see `tests/ray_util.py`), and the job runs through `orchestrator run --address`, in its own process:
the session cluster this test process may be connected to is never touched.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray_util import AutoscalingHead, wait_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"


@pytest.fixture(scope="module")
def autoscaling_head() -> Iterator[AutoscalingHead]:
    head = AutoscalingHead(head_cpus=2, worker_types={"gpu_node": {"resources": {"CPU": 2, "GPU": 1}, "max_workers": 2}})
    try:
        head.start()
        yield head
    finally:
        head.shutdown()
    assert not head.processes(), "processes of the autoscaling cluster survived its shutdown"


def test_requested_gpus_bring_up_nodes_then_the_request_is_released(
    autoscaling_head: AutoscalingHead, job_overrides: list[str], tmp_path: Path
) -> None:
    assert autoscaling_head.alive_nodes() == 1  # the head alone, without GPUs
    overrides = job_overrides + ["resources.use_gpu=true", "resources.profile=false", "training.max_steps=20",
                                 "data.val_fraction=0", "resources.autoscale_timeout_s=180"]
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", str(DIGITS), "--workers", "2",
         "--address", autoscaling_head.address, *[a for o in overrides for a in ("--set", o)]],
        capture_output=True, text=True, timeout=480, cwd=tmp_path, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final step: 20" in proc.stdout
    # resources.autoscale: auto found the autoscaler, and the driver waited for the GPU workers
    # (a progress line each time the count changed) before it started Ray Train: the GPU nodes
    # came for this request (Ray Train's own request, and Ray Data's, come later or ask for CPUs).
    assert re.search(r"autoscaler: 2/2 GPU workers available \(\d+ s of 180 s\)", proc.stderr)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(proc.stdout.split("MLflow run: ")[1].split()[0])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["autoscale.wanted"], tags["autoscale.arrived"], tags["autoscale.shortfall"]) == ("2", "2", "0")
    assert tags["worker_group.1"].startswith("2 workers")

    # Released: nothing asks the autoscaler for GPUs any more (neither this job nor Ray Train), so
    # it removes the idle GPU nodes.
    assert not [b for b in autoscaling_head.pending_request() if b.get("GPU")]
    wait_for(lambda: autoscaling_head.alive_nodes() == 1, timeout_s=120, what="the GPU nodes to be scaled down")
