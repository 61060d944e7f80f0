"""Recovery benchmark: a training worker's process is killed on a warm cluster; how long until the
job trains again, and how many steps it trains twice.

A multi-node `ray.cluster_utils.Cluster` (a head and two nodes with one logical GPU each, as in the
tests) runs the digits job on 2 workers, checkpointing every ``CHECKPOINT_EVERY`` steps. Once the
job is warm (past its first checkpoint) one worker process is SIGKILLed, alternately rank 1 and
rank 0 (which also holds the unsent MLflow points); after the restarted group has trained
``SETTLE_STEPS`` steps, the next. Per failure:

* recovery_s: kill -> rank 0 of the new worker group reports its first optimizer step (the
  progress actor's clock; the same machine's). Split into detection (kill -> the controller
  reports the failure) and restart (-> first step).
* steps_redone: the last step reported before the failure minus the step resumed from: the work
  lost, at most one checkpoint interval plus the steps trained while the failure went unnoticed.

Run as ``python benchmarks/bench_recovery.py`` (prints JSON) or call ``run()``.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import LoadSampler, Workspace, setup_environment

KILLS = 3
CHECKPOINT_EVERY = 10
# Kills land mid-interval (a checkpoint + 5 steps, as far as the driver's polling allows): the
# first once the job is past its first checkpoint, the next after the restarted group has trained
# SETTLE_STEPS steps.
WARM_STEPS = 15
SETTLE_STEPS = 15
WORKERS = 2
# The driver polls the progress actor this often (seconds): the kill's aim.
POLL_S = "0.1"


@contextmanager
def multinode_cluster() -> Iterator[Any]:
    """Head (CPUs only) plus two nodes declaring one logical GPU each; connected, then shut down."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    for _ in range(WORKERS):
        cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


class Killer:
    """The driver's progress hook: kills a worker when the job is warm, records when."""

    def __init__(self, job: Any, kills: int) -> None:
        self.job, self.left = job, kills
        self.kills: list[dict[str, Any]] = []
        self._next_at = WARM_STEPS
        self.groups_seen = 1

    def status(self, message: str) -> None:
        if message.startswith("restart "):
            self.groups_seen += 1

    def sized(self, prepared: Any, sizing: Any, resumed: Any) -> None:
        pass

    def progress(self, step: int, total: int, info: dict[str, Any]) -> None:
        import ray

        from orchestrator.driver import find_actor
        from orchestrator.driver.identity import job_key

        if not self.left or step < self._next_at or self.groups_seen != len(self.kills) + 1:
            return  # the previous kill's restart is not running yet
        local = self.job.localized()
        workers = ray.get(find_actor(job_key(local.checkpoint.storage_path, local.name)).workers.remote())
        if len(workers) < WORKERS:
            return
        rank = 1 if len(self.kills) % 2 == 0 else 0
        at = time.time()
        os.kill(workers[rank]["pid"], signal.SIGKILL)
        self.kills.append({"rank": rank, "at": at, "step_seen": step})
        self.left -= 1
        after = step + SETTLE_STEPS
        self._next_at = after - after % CHECKPOINT_EVERY + CHECKPOINT_EVERY // 2 + CHECKPOINT_EVERY


def failures(kills: list[dict[str, Any]], result: Any) -> list[dict[str, Any]]:
    """Join each kill with the failure the controller reported and the group that followed."""
    restarts = result.groups[1:]
    rows = []
    for kill, group in zip(kills, restarts):
        failure = next((f for f in result.failures if f.at_ms / 1000 >= kill["at"]), None)
        last_step = failure.step if failure else kill["step_seen"]
        first = group.first_step_ms / 1000 if group.first_step_ms else float("nan")
        rows.append({
            "rank_killed": kill["rank"],
            "step_at_kill": kill["step_seen"],
            "recovery_s": round(first - kill["at"], 2),
            "detection_s": round(failure.at_ms / 1000 - kill["at"], 2) if failure else None,
            "restart_s": round(first - failure.at_ms / 1000, 2) if failure else None,
            "last_step_before": last_step,
            "resumed_from": group.resumed_from,
            "steps_redone": last_step - (group.resumed_from or 0),
        })
    return rows


def run(kills: int = KILLS) -> dict[str, Any]:
    setup_environment()
    os.environ.setdefault("ORCH_PROGRESS_POLL_S", POLL_S)  # read when orchestrator.constants is imported
    from orchestrator.config import load_config
    from orchestrator.driver import run_job
    from trainers.data import prepare_dataset

    steps = WARM_STEPS + kills * (SETTLE_STEPS + 2 * CHECKPOINT_EVERY) + 20
    with Workspace() as ws, LoadSampler() as load, multinode_cluster():
        data = prepare_dataset("digits", ws.data_dir("digits"))
        job = load_config(REPO / "configs" / "digits.yaml", [
            f"data.path={data}", f"checkpoint.storage_path={ws.storage('recovery')}",
            f"tracking.tracking_uri={ws.tracking_uri}", "tracking.registered_model=null",
            f"training.max_steps={steps}", f"checkpoint.every_steps={CHECKPOINT_EVERY}", "training.log_every=1",
            "data.val_fraction=0", "resources.profile=false", "resources.use_gpu=true",
        ])
        killer = Killer(job, kills)
        start = time.time()
        result = run_job(job, workers=WORKERS, ui=killer)
        wall = time.time() - start
    rows = failures(killer.kills, result)
    if len(rows) != kills or result.final_step != steps:
        raise RuntimeError(f"expected {kills} recoveries and {steps} steps, got {rows} and {result.final_step}")
    recovery = [r["recovery_s"] for r in rows]
    redone = [r["steps_redone"] for r in rows]
    return {
        "workers": WORKERS, "checkpoint_every_steps": CHECKPOINT_EVERY, "steps": steps, "job_wall_s": round(wall, 1),
        "recovery_s_median": statistics.median(recovery), "recovery_s_range": [min(recovery), max(recovery)],
        "steps_redone_median": statistics.median(redone), "steps_redone_range": [min(redone), max(redone)],
        "restarts_in_mlflow": result.restarts, "failures": rows, "load_average": load.summary(),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
