"""The process-group backend the workers get: NCCL takes CUDA tensors only, so a GPU job's
group also carries gloo for the loop's small CPU flags (stop and cache agreement)."""

from __future__ import annotations

import os
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _is_backend_nccl

from orchestrator.ray_session import AUTO_BACKEND, CUDA_BACKEND, _resolved


class _Group:
    """Stands in for Ray Train's worker group: rank 0 answers whether its torch sees CUDA."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def execute_single(self, rank: int, fn: Any) -> bool:
        assert rank == 0
        return self.cuda


def test_cuda_workers_get_nccl_with_gloo_beside_it_and_cpu_workers_gloo() -> None:
    assert _resolved(_Group(cuda=True), TorchConfig(backend=AUTO_BACKEND)).backend == CUDA_BACKEND
    assert set(CUDA_BACKEND.split(",")) == {"cpu:gloo", "cuda:nccl"}
    assert _is_backend_nccl(CUDA_BACKEND)  # Ray Train still sets NCCL's environment for it
    assert _resolved(_Group(cuda=False), TorchConfig(backend=AUTO_BACKEND)).backend == "gloo"
    assert _resolved(_Group(cuda=True), TorchConfig(backend="gloo")).backend == "gloo"  # an explicit choice stays


def test_joining_a_cluster_at_a_loopback_address_keeps_it_loopback(monkeypatch: Any) -> None:
    # Without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the shell, ray.init rewrote 127.0.0.1:PORT to
    # this machine's routable address, where nothing listens, and retried for minutes.
    import ray

    from orchestrator import ray_session

    seen: list[tuple[str, str | None]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_session, "check_reachable", lambda address: None)
    monkeypatch.setattr(ray, "init", lambda address, **_: seen.append((address, os.environ.get(ray_session.SINGLE_MACHINE_ENV))))
    for address, loopback in (("127.0.0.1:6379", True), ("ray://localhost:10001", True), ("[::1]:6379", True),
                              ("10.1.2.3:6379", False), ("head.example:6379", False)):
        monkeypatch.delenv(ray_session.SINGLE_MACHINE_ENV, raising=False)
        ray_session.connect_ray(address)
        assert seen[-1] == (address, "0" if loopback else None)


def test_ray_is_shut_down_with_ctrl_c_ignored(monkeypatch: Any) -> None:
    """A second Ctrl-C once a job had ended landed in Ray's own atexit shutdown: a traceback."""
    import signal

    import ray

    from orchestrator import ray_session

    during = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: during.append(signal.getsignal(signal.SIGINT)))
    before = signal.getsignal(signal.SIGINT)
    ray_session.shutdown_quietly()
    assert during == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is before
