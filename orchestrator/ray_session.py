"""Connecting to Ray: join a cluster at an address, or start an embedded one that only this
machine's loopback can reach and that only holders of its generated token can use.

Ray binds its servers (GCS, raylet, workers, agents) to the node's IP address, and resolves even
an explicit ``127.0.0.1`` to the machine's routable address. Its own single-machine switch,
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, makes it take the loopback address as the node's address
instead, so every server listens on 127.0.0.1; the variable is set in this process's environment
(the Ray processes it starts inherit it) and the constant Ray read at import is updated.

Torch's process group meets at a TCPStore that listens on every interface. An embedded Ray's
workers all run on this machine, so they meet at a file instead (`LoopbackTorchConfig`), and gloo
and NCCL are pointed at the loopback interface.

Token auth: unless ``RAY_AUTH_MODE`` says otherwise, the embedded Ray runs with
``RAY_AUTH_MODE=token`` and a fresh random token in ``RAY_AUTH_TOKEN``, passed down the same way
to its own processes and never written to disk. ``RAY_AUTH_MODE=disabled`` opts out.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import secrets
import signal
import socket
import tempfile
import threading
import uuid
from pathlib import Path

import psutil
import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

from orchestrator.errors import BAD_HOST_NAME, UserError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Ray's switch for single-machine clusters (its default on Windows and macOS): off, the node's
# address is the loopback address and nothing listens elsewhere.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Logical CPUs an embedded Ray declares beyond the machine's cores, so Ray Data's read tasks still
# run when every core hosts a training worker.
EMBEDDED_EXTRA_CPUS = 2
# Every worker process runs Ray Train V2; Ray Data's own progress bars stay off (the driver shows
# one bar for the job; without tqdm each worker would also warn that it is missing).
WORKER_ENV = {"RAY_TRAIN_V2_ENABLED": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
# Ray Data 2.60's Parquet reader (DataSourceV2) starts a pool of footer-reading actors for every
# execution of a dataset, 32 by default: on a small cluster that is 32 Python processes started
# (one per actor) before the first batch, for each of the train and validation sets. Footer reads
# are I/O-bound and each reader drives `RAY_DATA_PARQUET_FOOTER_IO_CONCURRENCY` (128) reads at
# once, so one reader serves thousands of files (a second one cost a digits job ~4 CPU-s on the
# 2-core test cluster for nothing); set the variable yourself to change it. Ray Data reads it
# where the dataset is planned (the driver) and in its tasks (the job's runtime_env).
FOOTER_READERS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FOOTER_READERS = 1

# How long a cluster's address may take to accept a TCP connection before it is called unreachable.
REACH_TIMEOUT_S = 5.0

_embedded = False


def connect_ray(address: str | None) -> None:
    """Join the cluster at `address`, or start an embedded local Ray bound to 127.0.0.1."""
    global _embedded
    # Ray Data builds the Parquet file indexer (and reads this variable) in the driver's process.
    os.environ.setdefault(FOOTER_READERS_ENV, str(FOOTER_READERS))
    if ray.is_initialized():
        return
    _quiet_ray_data()
    # ray.init() installs its own SIGTERM handler; the caller's (a graceful stop) stays in charge.
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if address and address != "local":  # "local": a new single-machine Ray, i.e. the embedded one
            check_reachable(address)
            if _is_loopback(address):  # else Ray rewrites 127.0.0.1 to this machine's routable address
                loopback_only()
            try:
                ray.init(address=address, runtime_env={"env_vars": worker_env()}, log_to_driver=False)
            except (ConnectionError, ValueError) as exc:  # "auto" with no cluster, a malformed address
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(f"Ray address {address!r}: {first}") from None
            return
        loopback_only()
        embedded_token()
        ray.init(address="local", _node_ip_address=LOOPBACK, num_cpus=(os.cpu_count() or 1) + EMBEDDED_EXTRA_CPUS,
                 include_dashboard=False, runtime_env={"env_vars": {**worker_env(), **_loopback_collectives()}},
                 log_to_driver=False)
        _embedded = True
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)


def shutdown_quietly() -> None:
    """Ray's exit-time shutdown done now, with Ctrl-C ignored: a second Ctrl-C once a job had ended
    landed in Ray's atexit callback ("Exception ignored in atexit callback ... KeyboardInterrupt", a
    traceback, Ray's processes left behind a while). It takes seconds; nothing is left to stop."""
    if not ray.is_initialized():
        return
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        ray.shutdown()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _host_port(address: str) -> tuple[str, str]:
    """(host, port) of `host:port` or `ray://host:port` (an IPv6 host keeps its brackets)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return host, port


def _is_loopback(address: str) -> bool:
    """Does `address` (`host:port`, `ray://host:port`) name this machine's loopback interface?"""
    host = _host_port(address)[0].strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_reachable(address: str) -> None:
    """A `host:port` (or `ray://host:port`) nothing answers at is one line within seconds; Ray
    itself retries its GCS connection for minutes, logging a warning at each try."""
    if address.startswith(("http://", "https://")):
        raise UserError(f"Ray address {address!r}: that is a dashboard (Jobs) URL; give the cluster's GCS "
                        "address (host:6379) or ray://host:10001, or use `orchestrator submit`")
    host, port = _host_port(address)
    if not host or not port.isdigit():
        return  # "auto" and the like: Ray resolves them and says what is wrong
    if not 0 < int(port) < 65536:
        raise UserError(f"Ray address {address!r}: port {port} is not a port (1-65535)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"Ray address {address!r}: nothing answers at {host}:{port} ({reason}); is the cluster up?")\
            from None
    except UnicodeError:  # `a..b`, a part past 63 characters: the name is refused before any lookup
        raise UserError(f"Ray address {address!r}: {host!r} is not a host name ({BAD_HOST_NAME})") from None


def worker_env() -> dict[str, str]:
    """The environment every Ray process of the job gets (its runtime_env's env_vars)."""
    return {**WORKER_ENV, FOOTER_READERS_ENV: os.environ.get(FOOTER_READERS_ENV, str(FOOTER_READERS))}


def _quiet_ray_data() -> None:
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] != "1"


def embedded() -> bool:
    """Whether this process started the Ray it is connected to (an embedded, single-machine Ray)."""
    return _embedded and ray.is_initialized()


def loopback_only() -> None:
    """Make Ray processes started from here take 127.0.0.1 as their node's address."""
    os.environ[SINGLE_MACHINE_ENV] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def embedded_token() -> None:
    """Token auth for an embedded Ray: a fresh token unless the user set one or opted out."""
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":
        log.warning("RAY_AUTH_MODE=disabled: the embedded Ray accepts any local process as a client")
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")  # Ray caches the auth mode it read at import
    AuthenticationTokenLoader.instance().reset_cache()


def _loopback_collectives() -> dict[str, str]:
    """gloo and NCCL listen on the interface these name (by default the host name's, routable)."""
    name = loopback_interface()
    return {var: os.environ.get(var, name) for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")} if name else {}


def loopback_interface() -> str | None:
    """The name of the interface that holds 127.0.0.1 (`lo` on Linux, `lo0` on macOS)."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == LOOPBACK for a in addresses):
            return name
    return None


# The process-group backend chosen by the workers themselves: NCCL for CUDA tensors where their
# torch sees CUDA, with gloo beside it for the loop's small CPU flags (stop and cache agreement;
# NCCL takes CUDA tensors only, and a CUDA flag would cost a host sync); gloo alone otherwise
# (logical GPUs on CPU nodes). Asking rank 0 once the group is up costs no process;
# asking a separate GPU task, as before, started one more Python worker per job.
AUTO_BACKEND = "auto"
CUDA_BACKEND = "cpu:gloo,cuda:nccl"  # Ray Train sets NCCL's environment for it too (_is_backend_nccl)


def torch_config(backend: str = AUTO_BACKEND) -> TorchConfig:
    """Ray Train's torch config: the process group meets at a file under an embedded Ray, where
    every worker runs on this machine; at Ray's TCPStore on a cluster."""
    return LoopbackTorchConfig(backend=backend) if embedded() else AutoTorchConfig(backend=backend)


class AutoTorchConfig(TorchConfig):
    @property
    def backend_cls(self) -> type:
        return _AutoBackend


class LoopbackTorchConfig(TorchConfig):
    @property
    def backend_cls(self) -> type:
        return _FileStoreBackend


def _resolved(worker_group, backend_config: TorchConfig) -> TorchConfig:  # noqa: ANN001 - Ray's type
    if backend_config.backend != AUTO_BACKEND:
        return backend_config
    import torch

    cuda = worker_group.execute_single(0, torch.cuda.is_available)  # by reference: torch's, on the worker
    return dataclasses.replace(backend_config, backend=CUDA_BACKEND if cuda else "gloo")


class _AutoBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:  # noqa: ANN001 - Ray's type
        super().on_start(worker_group, _resolved(worker_group, backend_config))


class _FileStoreBackend(_TorchBackend):
    """Ray Train's torch backend with a FileStore rendezvous (`file://`, a fresh file per worker
    group) instead of the TCPStore that `env://` opens on every interface."""

    _store: Path | None = None

    def on_start(self, worker_group, backend_config: TorchConfig) -> None:  # noqa: ANN001 - Ray's type
        backend_config = _resolved(worker_group, backend_config)
        self._store = Path(tempfile.gettempdir()) / f"orchestrator-pg-{uuid.uuid4().hex}"
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([
            worker_group.execute_single_async(
                rank, _setup_torch_process_group, backend=backend_config.backend, world_rank=rank,
                world_size=len(worker_group), init_method=self._store.as_uri(), timeout_s=backend_config.timeout_s,
            )
            for rank in range(len(worker_group))
        ])

    def on_shutdown(self, worker_group, backend_config: TorchConfig) -> None:  # noqa: ANN001
        try:
            super().on_shutdown(worker_group, backend_config)
        finally:
            if self._store is not None:
                self._store.unlink(missing_ok=True)
