"""GPU check (run by benchmarks/gpu_check.sh): one GPU, under 5 minutes, results in one folder.

1. Our trainer (``orchestrator run --workers 1``) vs a raw PyTorch loop on the same GPU, for
   ``tiny_gpt`` scaled to GPT-2 small (12 layers, width 768, 12 heads, context 1024; the byte
   vocabulary of 256, not GPT-2's 50,257), bf16 and ``torch.compile`` on both, global batch 16:
   tokens/s, model FLOPs utilisation (``GPT.flops_per_token()`` x tokens/s / the card's dense bf16
   peak), the raw loop's peak memory.
2. Profiler cost on ``synthetic_resnet`` and ``tiny_gpt`` as shipped, and on the GPT-2-small-sized
   GPT with its ladder up to local batch 128: GPU-seconds to profile, the largest local batch that
   fitted (capped by the config's global batch), CUDA memory peak per batch size.

``--dry-run``, or a machine without CUDA: the same code paths on CPU with tiny sizes (no MFU).
Every stage writes ``gpu_check.json`` and ``gpu_check.md`` again, so a stage cut short by the time
limit still leaves the ones before it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.harness import Workspace, setup_environment
from benchmarks.workloads import Workload, default_workloads

# Dense bf16 peak, FLOP/s (NVIDIA data sheets; "with sparsity" figures are twice these). The first
# name contained in the device's name wins, so the specific variants come first.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12}
TRAINER_GOAL = 0.97  # our tokens/s >= 97 % of the raw loop's
MFU_GOAL = 0.40


@dataclass(frozen=True, slots=True, kw_only=True)
class Sizes:
    gpt: tuple[str, ...]  # overrides that scale tiny_gpt for the trainer comparison
    gpt_ladder_batch: int  # the scaled GPT is also profiled up to this local batch: memory per batch
    profile: dict[str, tuple[str, ...]]  # overrides for the profiled default configs, by name
    steps: int  # optimizer steps each trainer run times (after `warmup`)
    warmup: int  # steps left out: compilation, first batches


GPT2_SMALL = (
    "model.kwargs.n_layer=12", "model.kwargs.n_head=12", "model.kwargs.n_embd=768", "model.kwargs.context=1024",
    "model.kwargs.dropout=0.0", "data.dataset_kwargs.seq_len=1024", "data.features.shape=[1025]",
    "training.precision=bf16", "training.compile=true", "training.global_batch_size=16", "training.max_steps=100000",
)
GPU = Sizes(gpt=GPT2_SMALL, gpt_ladder_batch=128, profile={}, steps=60, warmup=10)
DRY = Sizes(
    gpt=("model.kwargs.n_layer=2", "model.kwargs.n_head=2", "model.kwargs.n_embd=64", "model.kwargs.context=64",
         "data.dataset_kwargs={seq_len: 64, max_bytes: 300000}", "data.features.shape=[65]",
         "training.precision=bf16", "training.compile=true", "training.global_batch_size=8",
         "training.max_steps=100000"),
    gpt_ladder_batch=16,
    profile={"synthetic_resnet": ("model.kwargs.width=8", "model.kwargs.depth=1", "training.global_batch_size=16"),
             "tiny_gpt": ("training.global_batch_size=16",)},
    steps=10, warmup=3,
)


def peak_flops(device: str) -> float | None:
    return next((flops for card, flops in PEAK_BF16_FLOPS.items() if card in device), None)


def flops_per_token(job: Any) -> int:
    import torch

    from trainers.models import build_model

    with torch.device("meta"):  # sizes only: no memory, no initialisation cost
        return build_model(job.model.name, job.model.kwargs).flops_per_token()


# ---------------------------------------------------------------------------------------------
# Stages


def profile_stage(ws: Workspace, workloads: list[Workload], *, use_gpu: bool) -> dict[str, Any]:
    from benchmarks.bench_profiler import missing, profile_cost

    if missing():
        return {"skipped": missing()}
    found = {}
    for workload in workloads:
        workload.prepare(ws)
        profile, wall = profile_cost(workload.job(ws, run_name=f"profile-{workload.name}"), use_gpu=use_gpu)
        found[workload.name] = {
            "device": profile.device, "device_seconds": profile.meta.get("profile_seconds"), "wall_s": wall,
            "max_local_batch": profile.max_local_batch, "oom_at_local_batch": profile.meta.get("oom_at_local_batch"),
            "peak_memory_bytes_by_local_batch": {s.local_batch: s.peak_memory_bytes for s in profile.samples},
            "step_time_s_by_local_batch": {s.local_batch: s.step_time_s for s in profile.samples},
        }
    return found


def trainer_stage(ws: Workspace, gpt: Workload, *, sizes: Sizes, address: str, device: str,
                  cuda: bool) -> dict[str, Any]:
    from benchmarks.raw_ddp import run_raw_ddp
    from benchmarks.sessions import run_orchestrator

    job = gpt.prepare(ws)
    tokens_per_step = job.training.global_batch_size * (job.data.features.shape[0] - 1)
    per_token = flops_per_token(job)
    peak = peak_flops(device)

    def figures(step_s: float) -> dict[str, Any]:
        rate = tokens_per_step / step_s
        return {"step_s": step_s, "tokens_per_s": rate, "mfu": rate * per_token / peak if peak else None}

    ours = run_orchestrator(gpt, ws, run_name="gpu-ours", steps=sizes.warmup + sizes.steps, address=address,
                            workers=1)
    ours_figures = figures(statistics.fmean(ours.step_times[sizes.warmup:sizes.warmup + sizes.steps]))
    raw = run_raw_ddp(job, workers=1, steps=sizes.warmup + sizes.steps, warmup=sizes.warmup,
                      device="cuda" if cuda else "cpu")
    raw_figures = {**figures(raw.window_s / raw.window_steps), "peak_memory_bytes": raw.peak_memory_bytes}
    return {
        "model": dict(job.model.kwargs), "global_batch": job.training.global_batch_size,
        "tokens_per_step": tokens_per_step, "flops_per_token": per_token, "peak_flops": peak,
        "ours": ours_figures, "raw": raw_figures,
        "ours_vs_raw": ours_figures["tokens_per_s"] / raw_figures["tokens_per_s"],
        "goals": {"ours_vs_raw_min": TRAINER_GOAL, "mfu_min": MFU_GOAL},
    }


# ---------------------------------------------------------------------------------------------
# Output


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [f"GPU check on {meta['device']} ({'dry run' if meta['dry_run'] else 'full sizes'}), "
             f"{meta.get('total_s', 0):.0f} s: `benchmarks/gpu_check.sh`.", ""]
    profiles = results.get("profiler", {})
    if "skipped" in profiles:
        lines.append(f"Profiler: {profiles['skipped']}")
    elif profiles:
        lines += ["| config | profiling (device s) | max local batch | OOM at | peak memory by local batch |",
                  "|---|---:|---:|---:|---|"]
        for name, p in profiles.items():
            memory = ", ".join(f"{b}: {_gib(m)}" for b, m in p["peak_memory_bytes_by_local_batch"].items())
            lines.append(f"| {name} | {p['device_seconds'] or 0:.1f} | {p['max_local_batch']} | "
                         f"{p['oom_at_local_batch'] or '-'} | {memory} |")
    trainer = results.get("trainer")
    if trainer and "ours" in trainer:
        lines += ["", f"GPT {trainer['model']}, global batch {trainer['global_batch']}, "
                  f"{trainer['flops_per_token'] / 1e6:.0f} MFLOP/token:", "",
                  "| path | step (ms) | tokens/s | MFU |", "|---|---:|---:|---:|"]
        for path in ("ours", "raw"):
            f = trainer[path]
            mfu = f"{100 * f['mfu']:.1f} %" if f["mfu"] is not None else "n/a"
            lines.append(f"| {path} | {1e3 * f['step_s']:.1f} | {f['tokens_per_s']:,.0f} | {mfu} |")
        lines += ["", f"ours/raw tokens/s: {trainer['ours_vs_raw']:.3f} (goal >= {TRAINER_GOAL}); "
                  f"raw loop peak memory {_gib(trainer['raw']['peak_memory_bytes'])}."]
    for stage, error in results.get("errors", {}).items():
        lines.append(f"\n{stage} failed: {error}")
    return "\n".join(lines) + "\n"


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.1f} GiB"


def save(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(results))


def stage(name: str, results: dict[str, Any], out: Path, fn: Callable[[], dict[str, Any]]) -> None:
    started = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # noqa: BLE001 - recorded; the next stage still runs
        import traceback

        traceback.print_exc()
        results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:2000]
    results["meta"].setdefault("stage_seconds", {})[name] = round(time.perf_counter() - started, 1)
    save(results, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and logs")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: prove the code paths")
    args = parser.parse_args(argv)
    setup_environment()
    import torch

    from benchmarks.sessions import local_ray

    cuda = torch.cuda.is_available() and not args.dry_run
    sizes = GPU if cuda else DRY
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    out = Path(args.out)
    results: dict[str, Any] = {"meta": {"device": device, "dry_run": not cuda, "torch": torch.__version__,
                                        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}}
    started = time.perf_counter()
    _, resnet, tiny = default_workloads()
    gpt = replace(tiny, name="gpt2_small" if cuda else "gpt_dry", overrides=tiny.overrides + sizes.gpt)
    profiled = [replace(w, overrides=w.overrides + sizes.profile.get(w.name, ())) for w in (resnet, tiny)]
    profiled.append(replace(gpt, overrides=gpt.overrides + (f"training.global_batch_size={sizes.gpt_ladder_batch}",)))
    with Workspace() as ws, local_ray() as address:
        # The trainer comparison first: it matters most, and the time limit cuts from the end.
        stage("trainer", results, out, lambda: trainer_stage(ws, gpt, sizes=sizes, address=address, device=device,
                                                              cuda=cuda))
        stage("profiler", results, out, lambda: profile_stage(ws, profiled, use_gpu=cuda))
        results["meta"]["total_s"] = time.perf_counter() - started
        save(results, out)
        shutil.copytree(ws.root / "logs", out / "logs", dirs_exist_ok=True)
    print(markdown(results))
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())
