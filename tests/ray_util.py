"""Helpers for the real-Ray fault-tolerance and autoscaling tests (no fakes of Ray here).

`AutoscalingHead` starts what `ray.cluster_utils.AutoscalingCluster` starts (a head whose
autoscaler launches fake nodes on this machine), but without its `ray stop --force`, which would
kill every Ray process of the user (the session cluster, and anyone else's), and without the
`example.yaml` the pip wheel lacks: the config is built here. Its processes are found by their
session folder and ended by pid.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from live_servers import free_ports
from mlflow.tracking import MlflowClient


def metric_steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))]


def assert_unique_monotone(values: list[int]) -> None:
    assert values, "no metric points logged"
    assert all(a < b for a, b in itertools.pairwise(values)), f"steps repeat or go back: {values}"


def wait_until_idle(timeout_s: float = 120) -> None:
    """Until the session cluster's CPUs and GPUs are all free again: an earlier test's worker
    group or placement group is torn down asynchronously, and a test about how many workers
    arrive must not count slots it still holds."""
    import ray

    def idle() -> bool:
        total, free = ray.cluster_resources(), ray.available_resources()
        return all(free.get(k, 0) >= total.get(k, 0) for k in ("CPU", "GPU"))

    wait_for(idle, timeout_s=timeout_s, what="the session cluster to be idle", every_s=0.25)


def wait_for(predicate: Any, *, timeout_s: float, what: str, every_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def _autoscaling_config(*, head_cpus: int, gcs_address: str, worker_types: dict[str, Any]) -> dict[str, Any]:
    """The fake multi-node provider's config (the wheel's missing example.yaml, filled in)."""
    return {
        "cluster_name": "orchestrator-test",
        "max_workers": sum(t["max_workers"] for t in worker_types.values()),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            **{name: {"node_config": {}, "min_workers": 0, **spec} for name, spec in worker_types.items()},
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        **{k: {} for k in ("auth", "docker", "file_mounts")},
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                           "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts_sync_continuously": False,
    }


class AutoscalingHead:
    """A Ray head with the v1 autoscaler and the fake multi-node provider, on free ports."""

    def __init__(self, *, head_cpus: int, worker_types: dict[str, Any]) -> None:
        import ray

        self.folder = tempfile.mkdtemp(prefix="orch-as-", dir="/tmp")  # short: Ray's socket paths
        gcs, *self._ports = free_ports(5)  # chosen together: none repeats
        self.address = f"{ray.util.get_node_ip_address()}:{gcs}"
        config = _autoscaling_config(head_cpus=head_cpus, gcs_address=self.address, worker_types=worker_types)
        self.config_path = Path(self.folder) / "autoscaling.json"
        self.config_path.write_text(json.dumps(config))
        self.head_cpus = head_cpus
        self._proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> str:
        ray_cli = str(Path(sys.executable).with_name("ray"))
        ports = dict(zip(("dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
                          "metrics-export-port"), self._ports))
        cmd = [ray_cli, "start", "--head", "--block", f"--port={self.address.rsplit(':', 1)[1]}",
               f"--autoscaling-config={self.config_path}", f"--num-cpus={self.head_cpus}", "--num-gpus=0",
               f"--temp-dir={self.folder}", "--include-dashboard=false", "--disable-usage-stats",
               *(f"--{flag}={port}" for flag, port in ports.items())]
        env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        env.pop("RAY_ADDRESS", None)
        with open(Path(self.folder) / "ray-start.log", "w") as log:  # the child keeps its own handle
            self._proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._gcs_up, timeout_s=timeout_s, what=f"the autoscaling head at {self.address}")
        return self.address

    def _gcs_up(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise AssertionError(f"ray start exited: {(Path(self.folder) / 'ray-start.log').read_text()[-2000:]}")
        # The monitor reports, and the head's raylet has registered.
        return bool(self.kv_get(b"__autoscaling_status")) and self.alive_nodes() >= 1

    def kv_get(self, key: bytes) -> bytes | None:
        from ray._raylet import GcsClient

        try:
            return GcsClient(address=self.address).internal_kv_get(key, namespace=None, timeout=5)
        except Exception:  # noqa: BLE001 - not up yet
            return None

    def pending_request(self) -> list[dict[str, float]]:
        """The autoscaler's standing resource request (v1 keeps it in the GCS key-value store)."""
        raw = self.kv_get(b"autoscaler_resource_request")
        return json.loads(raw) if raw else []

    def alive_nodes(self) -> int:
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        try:
            nodes = GcsClient(address=self.address).get_all_node_info(timeout=5)
        except Exception:  # noqa: BLE001 - not up yet
            return 0
        return sum(1 for info in nodes.values() if info.state == GcsNodeInfo.ALIVE)

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: its command line names the session folder."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(self.folder in arg for arg in p.info["cmdline"] or []):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def shutdown(self) -> None:
        """End, by pid, every process of this cluster: `ray start` and what it started (found by the
        session folder in their command lines), what the autoscaler started for fake nodes, and
        their workers (children, whose command lines Ray rewrites). SIGTERM first, then SIGKILL."""
        family = {p.pid: p for p in self.processes()}
        if self._proc is not None and self._proc.poll() is None:
            family[self._proc.pid] = psutil.Process(self._proc.pid)
        for p in list(family.values()):
            try:
                family.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                continue
        for p in family.values():
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(list(family.values()), timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(alive, timeout=10)
        if self._proc is not None:
            self._proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


class RecordingUI:
    """The driver's UI for tests: keeps every status line; optional hooks run when the job is
    sized (before its workers start) and at every progress poll (to inject a fault)."""

    def __init__(self, *, on_sized: Any = None, on_progress: Any = None) -> None:
        self.statuses: list[str] = []
        self.sizing: Any = None
        self.last_step = 0
        self._on_sized, self._on_progress = on_sized, on_progress

    def status(self, message: str) -> None:
        self.statuses.append(message)

    def sized(self, prepared: Any, sizing: Any, resumed: bool | None) -> None:
        self.sizing = sizing
        if self._on_sized is not None:
            self._on_sized(prepared, sizing, resumed)

    def progress(self, step: int, total: int, info: dict[str, float]) -> None:
        self.last_step = step
        if self._on_progress is not None:
            self._on_progress(step, total, info)


def workers_of(job: Any) -> dict[int, dict[str, Any]]:
    """Rank -> {pid, node_id} of the running job's current worker group (from its progress actor)."""
    import ray

    from orchestrator.driver import find_actor
    from orchestrator.driver.identity import job_key

    local = job.localized()
    return ray.get(find_actor(job_key(local.checkpoint.storage_path, local.name)).workers.remote())
