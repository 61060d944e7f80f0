"""Real step times for the calibration benchmark: several models trained data-parallel on a Ray
cluster of CPU "nodes" that exchange gradients over gloo (a real, slow network).

Every model is profiled the way `orchestrator profile` does it, on one worker (this process, one
thread: forward+backward and optimizer timed apart, median after warm-up). Each placement is one
plain Ray Train `TorchTrainer` run whose workers time every model in turn: DDP steps (the
observed step time, the median after warm-up) and the same steps under `no_sync` (compute only;
the slowest rank's median). Nothing here comes from `trainers/loop.py`; the models come from
`trainers.models.build_model`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.planner import NodeSample, Observation, Placement, Profile, ProfileSample

WARMUP = 5  # first steps left out: allocator warm-up, lazy gloo connections
STEPS = 20  # timed steps: the online refit's minimum for a trusted median


@dataclass(frozen=True, slots=True)
class Workload:
    """A model and the random batches it is timed on."""

    name: str
    model: str
    kwargs: dict[str, Any]
    shape: tuple[int, ...]  # one sample's input shape (tokens: [context + 1])
    batch: int  # local batch per worker
    tokens: int = 0  # vocabulary size for a language model, 0 for a classifier


def _data(w: Workload, batch: int) -> tuple[Any, Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    if w.tokens:
        seq = torch.randint(0, w.tokens, (batch, *w.shape), generator=gen)
        return seq[:, :-1], seq[:, 1:]
    return torch.randn(batch, *w.shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen)


def _loss(model: Any, x: Any, y: Any) -> Any:
    import torch.nn.functional as F

    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _model(w: Workload) -> tuple[Any, Any]:
    import torch

    from trainers.models import build_model

    torch.manual_seed(0)
    model = build_model(w.model, w.kwargs)
    return model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


def profile(w: Workload, batches: tuple[int, ...]) -> Profile:
    """One worker's profile of `w`: this process, one thread, as a worker with one CPU gets."""
    import torch

    torch.set_num_threads(1)
    model, opt = _model(w)
    samples = []
    for batch in batches:
        x, y = _data(w, batch)
        fb, op = [], []
        for _ in range(WARMUP + STEPS):
            start = time.perf_counter()
            _loss(model, x, y).backward()
            mid = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            fb.append(mid - start)
            op.append(time.perf_counter() - mid)
        fwd_bwd, optimizer = statistics.median(fb[WARMUP:]), statistics.median(op[WARMUP:])
        samples.append(ProfileSample(local_batch=batch, step_time_s=fwd_bwd + optimizer, fwd_bwd_s=fwd_bwd,
                                     optimizer_s=optimizer))
    params = [p for p in model.parameters() if p.requires_grad]
    return Profile(model=w.name, device="cpu (1 thread)", param_count=sum(p.numel() for p in params),
                   grad_bytes=sum(p.numel() * p.element_size() for p in params), samples=samples,
                   max_local_batch=max(batches), precision="fp32")


def _timed(model: Any, opt: Any, w: Workload, batch: tuple[Any, Any], *, warmup: int,
           steps: int) -> tuple[list[float], list[float]]:
    """(synced, alone): step times with gradient sync and under `no_sync`, taken in turns, so
    both medians see the same contention from whatever else this machine runs meanwhile."""
    import contextlib

    synced, alone = [], []
    for _ in range(warmup + steps):
        for sync, times in ((True, synced), (False, alone)):
            start = time.perf_counter()
            with contextlib.nullcontext() if sync else model.no_sync():
                _loss(model, *batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    return synced[warmup:], alone[warmup:]


def worker_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: time every workload with and without gradient sync, report medians."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import ray.train

    torch.set_num_threads(1)
    counts = {"warmup": config["warmup"], "steps": config["steps"]}
    medians: dict[str, float] = {}
    for raw in config["workloads"]:
        w = Workload(**{**raw, "shape": tuple(raw["shape"])})
        model, opt = _model(w)
        ddp = DistributedDataParallel(model)
        batch = _data(w, w.batch)
        synced, unsynced = _timed(ddp, opt, w, batch, **counts)
        alone = torch.tensor([statistics.median(unsynced)])
        dist.all_reduce(alone, op=dist.ReduceOp.MAX)  # the group waits for its slowest worker
        medians[f"{w.name}/step"], medians[f"{w.name}/compute"] = statistics.median(synced), float(alone)
    # Ray Train V2 keeps the metrics of checkpointed reports only: rank 0 attaches an empty one.
    with tempfile.TemporaryDirectory() as folder:
        first = ray.train.get_context().get_world_rank() == 0
        ray.train.report(medians, checkpoint=ray.train.Checkpoint.from_directory(folder) if first else None)


def measure(placement: Placement, workloads: list[Workload], *, resources: dict[str, float] | None = None,
            warmup: int = WARMUP, steps: int = STEPS) -> dict[str, float]:
    """One TorchTrainer run at `placement` (Ray must be connected): medians per workload. Each
    worker takes one CPU and `resources` (default one "slot", which only worker nodes offer), so
    the placement strategy alone decides how many share a node."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from orchestrator.ray_session import LoopbackTorchConfig

    extra = {"slot": 1} if resources is None else resources
    strategy = "STRICT_PACK" if placement.nodes == 1 else "STRICT_SPREAD" if placement.gpus_per_node == 1 else "SPREAD"
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            worker_loop, train_loop_config={"workloads": [asdict(w) for w in workloads], "warmup": warmup,
                                            "steps": steps},
            scaling_config=ray.train.ScalingConfig(num_workers=placement.gpus, placement_strategy=strategy,
                                                   use_gpu="GPU" in extra,  # logical GPUs: the workers
                                                   resources_per_worker={"CPU": 1, **extra}),  # still use the CPU
            # every node of this cluster is this machine: the process group meets at a file
            torch_config=LoopbackTorchConfig(backend="gloo"),
            run_config=ray.train.RunConfig(name=f"calibration-{placement}", storage_path=storage),
        )
        return dict(trainer.fit().metrics)


def observations(profiles: dict[str, Profile], placement: Placement, medians: dict[str, float],
                 workloads: list[Workload]) -> list[Observation]:
    return [Observation(profile=profiles[w.name], nodes=placement.nodes, gpus_per_node=placement.gpus_per_node,
                        local_batch=w.batch, step_time_s=medians[f"{w.name}/step"],
                        compute_step_time_s=medians[f"{w.name}/compute"], source="bench_calibration")
            for w in workloads]


def with_node_samples(profile: Profile, w: Workload, medians_by_placement: dict[Placement, dict[str, float]]) -> Profile:
    """The profile plus what the profiler's node measurement gives: all workers of one node
    stepping without gradient sync (the no-sync medians of the single-node placements)."""
    samples = [NodeSample(gpus_per_node=p.gpus_per_node, local_batch=w.batch, step_time_s=m[f"{w.name}/compute"])
               for p, m in medians_by_placement.items() if p.nodes == 1 and p.gpus_per_node > 1]
    return profile.replace(node_samples=tuple(samples)) if samples else profile
