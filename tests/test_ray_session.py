"""The process-group backend the workers get: NCCL takes CUDA tensors only, so a GPU job's
group also carries gloo for the loop's small CPU flags (stop and cache agreement)."""

from __future__ import annotations

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
