"""Real server processes for the integration tests: started on 127.0.0.1 at a free port, stopped
by their own process group (never by name: other Ray clusters and servers share this machine)."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# MLflow's clients, server and UI report usage to an outside host unless told not to; tests talk
# to 127.0.0.1 only.
NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
os.environ.update(NO_TELEMETRY)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: each socket stays bound until all are chosen (ports chosen one
    at a time can repeat: a head's GCS and dashboard once got the same one, and `ray start` failed)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))  # every server a test starts listens on loopback only
        return [s.getsockname()[1] for s in sockets]


def short_tmpdir(prefix: str) -> Path:
    """Ray puts Unix sockets under its temp dir; pytest's tmp paths are too long for them."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def base_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this venv first on PATH, no inherited Ray address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1", **NO_TELEMETRY})
    env.update(extra)
    return env


def start(args: list[str], *, log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def stop(proc: subprocess.Popen, *, sig: int = signal.SIGTERM, timeout_s: float = 5) -> None:
    """Signal the process group the test started (daemons such as `ray start`'s outlive their
    parent), then SIGKILL whatever of the group is left after `timeout_s`."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _group_alive(proc):
        time.sleep(0.2)
    if _group_alive(proc):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)


def _group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the leader, or the group never looks empty
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(check: Callable[[], bool], *, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout_s}s\n{tail}")


def http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@dataclass
class MlflowServer:
    """`mlflow server` with a sqlite backend and proxied artifacts, as docs/tracking-server.md sets it up."""

    root: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def start(self) -> MlflowServer:
        args = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", "1"]
        # No job runner: MLflow 3 otherwise forks several huey consumers (GenAI jobs) per server.
        env = base_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.proc = start(args, log=self.log, env=env, cwd=self.root)
        wait_until(lambda: http_ok(f"{self.uri}/health"), timeout_s=90, what="mlflow server", log=self.log)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            stop(self.proc, sig=sig)
            self.proc = None


@contextmanager
def mlflow_server(prefix: str = "orch-mlflow-") -> Iterator[MlflowServer]:
    """A started server in a fresh temp dir; stopped and removed on exit."""
    root = short_tmpdir(prefix)
    server = MlflowServer(root, free_port())
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# Every server of a head beside the GCS and the dashboard: their fixed default ports would clash
# with the other heads that tests start on this machine.
OTHER_PORTS = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
               "--metrics-export-port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port")


@dataclass
class RayHead:
    """`ray start --head` with token auth, every port chosen free, its own temp dir."""

    root: Path
    token: str
    dashboard_port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token_file(self) -> Path:
        return self.root / "token"

    @property
    def log(self) -> Path:
        return self.root / "ray-start.log"

    def env(self, **extra: str) -> dict[str, str]:
        """A child's environment that finds this cluster (and no other) with the right token."""
        return base_env(**{"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file),
                           "RAY_TMPDIR": str(self.root), "HOME": str(self.root), **extra})

    def start(self, *, num_cpus: int = 4) -> RayHead:
        self.token_file.write_text(self.token)
        gcs, self.dashboard_port, *others = free_ports(2 + len(OTHER_PORTS))
        ports = {"--port": gcs, "--dashboard-port": self.dashboard_port, **dict(zip(OTHER_PORTS, others))}
        args = [str(BIN / "ray"), "start", "--head", "--dashboard-host", "127.0.0.1", "--temp-dir",
                str(self.root / "ray"), "--num-cpus", str(num_cpus), "--include-dashboard=true",
                "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())]
        self.proc = start(args, log=self.log, env=self.env(), cwd=self.root)
        return self._wait_ready()

    def _wait_ready(self) -> RayHead:
        auth = {"Authorization": f"Bearer {self.token}"}
        wait_until(lambda: http_ok(f"{self.address}/api/jobs/", auth), timeout_s=120, what="ray head", log=self.log)
        return self

    def start_documented(self, block: str, *, gcs_port: int = 6379, dashboard_port: int = 8265) -> RayHead:
        """Run a documented head start-up (a bash block) as written, with the venv's bin off PATH
        (Ray is started as `.venv/bin/ray`, the environment not activated) and HOME in this head's
        folder (the token goes to ~/.ray/auth_token). Only ports change: free ones replace the
        documented GCS and dashboard ports, and `ray start` gets free ports for its other servers."""
        gcs, self.dashboard_port, *others = free_ports(2 + len(OTHER_PORTS))
        script = block.replace(f"={gcs_port}", f"={gcs}").replace(f"={dashboard_port}", f"={self.dashboard_port}")
        extra = " ".join(f"{k}={v}" for k, v in zip(OTHER_PORTS, others))
        script = re.sub(r"(ray start --head[^\n]*)", lambda m: f"{m.group(1)} {extra}", shell_lines(script))
        env = {k: v for k, v in self.env().items() if not k.startswith("RAY_AUTH_TOKEN")}  # a user's shell
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != BIN)
        self.proc = start(["bash", "-ec", script], log=self.log, env=env, cwd=ROOT)
        if self.proc.wait(timeout=180) != 0:  # `ray start` returns once the head runs; its daemons stay in the group
            raise RuntimeError(f"documented head start-up failed:\n{self.log.read_text(errors='replace')[-3000:]}")
        self.token = (self.root / ".ray" / "auth_token").read_text().strip()
        self.token_file.write_text(self.token)
        return self._wait_ready()

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)  # the GCS ignores SIGTERM for a long while: SIGKILL follows in seconds
            self.proc = None


def run_cli(args: list[str], *, env: dict[str, str], cwd: Path = ROOT, timeout_s: float = 300
            ) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "orchestrator"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout_s)


def doc_blocks(path: Path, heading: str) -> list[str]:
    """The fenced ```bash blocks of one section of a markdown file, as written."""
    section = path.read_text().split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def shell_lines(block: str) -> str:
    """A shell block with its continuation lines joined, one command per line."""
    return block.replace("\\\n", " ")


def make_project(root: Path, digits_data: Path) -> Path:
    """A project folder as a user has it: the digits config, and the data at its relative path."""
    shutil.copy(ROOT / "configs" / "digits.yaml", root / "digits.yaml")
    shutil.copytree(digits_data, root / "data" / "digits")
    return root


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def listeners(procs: list[psutil.Process]) -> dict[tuple[str, int], str]:
    """(address, port) -> process name, for every listening TCP socket of these processes."""
    found: dict[tuple[str, int], str] = {}
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found[(conn.laddr.ip, conn.laddr.port)] = proc.name()
        except psutil.Error:
            continue
    return found
