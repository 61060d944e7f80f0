"""The embedded Ray of `orchestrator run`, attacked as a neighbour on the network or the machine
would: every socket the job's processes listen on must be loopback, and a client without the
job's generated token must be refused.

The job runs as a user runs it: a real `orchestrator run` process with none of the test suite's
Ray settings (no RAY_AUTH_MODE, no loopback switch, a HOME without a Ray token), so what holds
here is what the code itself sets up.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.live_servers import BIN, ROOT, base_env, is_loopback, listeners, short_tmpdir, start, stop

pytestmark = pytest.mark.slow


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _gcs_port(root: psutil.Process) -> int | None:
    for proc in root.children(recursive=True):
        try:
            if proc.name() == "gcs_server":
                return next(c.laddr.port for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN)
        except (psutil.Error, StopIteration):
            continue
    return None


def _connect_without_token(port: int, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in base_env(HOME=str(home)).items() if not k.startswith("RAY_AUTH")}
    code = f"import ray; ray.init(address='127.0.0.1:{port}'); print('CONNECTED')"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)


def test_embedded_job_listens_on_loopback_only_and_refuses_clients_without_its_token(
    tmp_path: Path, digits_data: Path
) -> None:
    home = short_tmpdir("orch-home-")
    env = {k: v for k, v in base_env(HOME=str(home)).items()
           if not k.startswith(("RAY_AUTH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"))}
    log = tmp_path / "run.log"
    args = [str(BIN / "orchestrator"), "run", str(ROOT / "configs" / "digits.yaml"), "--workers", "2",
            "--set", f"data.path={digits_data}", "--set", f"checkpoint.storage_path={tmp_path / 'runs'}",
            "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "--set", "training.epochs=null", "--set", "training.max_steps=120", "--set", "resources.profile=false",
            "--set", "data.val_fraction=0"]  # (a validation set adds one more split coordinator, alike)
    proc = start(args, log=log, env=env, cwd=tmp_path)
    root = psutil.Process(proc.pid)
    seen: dict[tuple[str, int], str] = {}
    attack: subprocess.CompletedProcess | None = None
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            seen.update(listeners(_tree(root)))
            port = _gcs_port(root) if attack is None else None
            if port is not None:
                attack = _connect_without_token(port, home)
            time.sleep(0.2)
        assert proc.wait(timeout=5) == 0, log.read_text()[-3000:]
    finally:
        stop(proc)
    names = set(seen.values())
    assert {"gcs_server", "raylet"} <= names, f"the job's Ray servers were never seen listening: {seen}"
    exposed = {addr: name for addr, name in seen.items() if not is_loopback(addr[0])}
    assert not exposed, f"listening off loopback: {exposed}"
    assert attack is not None, "the GCS port was never found"
    assert attack.returncode != 0 and "CONNECTED" not in attack.stdout
    assert "Authentication" in attack.stderr or "token" in attack.stderr.lower(), attack.stderr[-2000:]
    assert not (home / ".ray" / "auth_token").exists(), "the generated token was written to disk"
