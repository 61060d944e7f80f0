"""GPU check of the training step the loop and the profiler share, with torch alone.

The lent GPU machine has PyTorch but neither Ray nor MLflow (and nothing can be installed there
but small wheels), so this checks what runs on the GPU itself, on one GPU:

1. `trainers.step.TrainStep` on a GPT-2-small-sized GPT (12 layers, width 768, context 1024, bf16,
   torch.compile, local batch 16) never waits for the device: 30 steps run under
   ``torch.cuda.set_sync_debug_mode("error")``, which raises on any host sync; and its tokens/s
   against a raw PyTorch loop of the same model (forward, backward, AdamW, zero_grad), side by
   side, with the model FLOPs utilisation of each.
2. The profiler's worker half (`trainers.profiling.measure`) on the shipped ``synthetic_resnet``
   and ``tiny_gpt`` configs, and on the GPT-2-small GPT up to local batch 64: GPU-seconds it takes
   (one GPU: its wall time is its GPU time), the ladder, the peak memory per batch size.

    python -m benchmarks.gpu_step --out DIR [--dry-run]    # --dry-run: tiny sizes on the CPU

Writes ``gpu_step.json`` and ``gpu_step.md`` to DIR after every stage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 peak, FLOP/s (NVIDIA data sheets; "with sparsity" figures are twice these).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12}
GPT2_SMALL = ["model.kwargs.n_layer=12", "model.kwargs.n_head=12", "model.kwargs.n_embd=768",
              "model.kwargs.context=1024", "data.dataset_kwargs.seq_len=1024", "data.features.shape=[1025]",
              "training.precision=bf16", "training.compile=true"]
DRY_GPT = ["model.kwargs.n_layer=2", "model.kwargs.n_head=2", "model.kwargs.n_embd=64", "model.kwargs.context=64",
           "data.dataset_kwargs.seq_len=64", "data.features.shape=[65]", "training.precision=bf16"]


def job(name: str, overrides: list[str], data_root: Path, *, label: str | None = None) -> Any:
    """A shipped config with overrides; its data set prepared under `data_root/label`."""
    from orchestrator.config import load_config
    from trainers.data import ensure_prepared

    job = load_config(REPO / "configs" / f"{name}.yaml", [f"data.path={data_root / (label or name)}", *overrides])
    ensure_prepared(job.data.dataset, job.data.paths[0], **job.data.dataset_kwargs)
    return job


def step_stage(gpt: Any, *, device: torch.device, steps: int, warmup: int, local_batch: int) -> dict[str, Any]:
    """Ours (TrainStep) and a raw loop, alternating windows; ours under the sync check."""
    from trainers.data.collate import Collate
    from trainers.models import build_model
    from trainers.profiling import sample_rows
    from trainers.step import TrainStep, compiled, make_optimizer

    cfg = gpt.worker_config()
    x, _ = Collate(cfg.data)(sample_rows(cfg, local_batch))
    x = x.to(device)
    tokens_per_step = local_batch * (x.shape[1] - 1)

    def ours() -> Any:
        torch.manual_seed(0)
        model = build_model(cfg.model.name, cfg.model.kwargs).to(device)
        step = TrainStep(compiled(model, cfg.training), make_optimizer(model, cfg.training), cfg=cfg.training,
                         device=device)
        return lambda: step([(x, None)])

    def raw() -> Any:
        import torch.nn.functional as F

        torch.manual_seed(0)
        model = build_model(cfg.model.name, cfg.model.kwargs).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.training.lr, weight_decay=cfg.training.weight_decay)
        if cfg.training.compile:  # each transformer block on its own, as torchtitan (and our step) compile
            for block in model.blocks:
                block.compile()
        forward = model

        def one() -> torch.Tensor:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                logits = forward(x[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        return one

    timed: dict[str, list[float]] = {"ours": [], "raw": []}
    steps_of = {"ours": ours(), "raw": raw()}
    for fn in steps_of.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    sync_error = None
    for _ in range(3):  # alternating windows, so drift in clocks or load hits both alike
        for path, fn in steps_of.items():
            _sync(device)
            start = time.perf_counter()
            if path == "ours" and device.type == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            try:
                losses = [fn() for _ in range(steps)]
            except RuntimeError as exc:  # a host sync inside the step
                sync_error = f"{type(exc).__name__}: {exc}"[:500]
                losses = []
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
            _sync(device)
            timed[path].append((time.perf_counter() - start) / steps)
            assert not losses or torch.isfinite(torch.stack(losses)).all()
    per_token = _flops_per_token(cfg)
    peak = next((f for card, f in PEAK_BF16_FLOPS.items() if card in _device_name(device)), None)
    figures = {}
    for path, seconds in timed.items():
        step_s = statistics.median(seconds)
        rate = tokens_per_step / step_s
        figures[path] = {"step_s": step_s, "tokens_per_s": rate, "mfu": rate * per_token / peak if peak else None,
                         "windows_s": seconds}
    return {"model": dict(cfg.model.kwargs), "local_batch": local_batch, "steps_per_window": steps,
            "host_sync_in_step": sync_error, "ours": figures["ours"], "raw": figures["raw"],
            "ours_vs_raw_tokens_per_s": figures["ours"]["tokens_per_s"] / figures["raw"]["tokens_per_s"],
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None}


def profile_stage(jobs: dict[str, Any], *, budget_s: float) -> dict[str, Any]:
    from trainers.profiling import measure

    found = {}
    for name, j in jobs.items():
        start = time.perf_counter()
        profile = measure(j.worker_config().model_dump(mode="json"), budget_s=budget_s, data_s=0)
        found[name] = {"gpu_seconds": round(time.perf_counter() - start, 1), "device": profile["device"],
                       "max_local_batch": profile["max_local_batch"], "meta": profile["meta"],
                       "step_time_s": {s["local_batch"]: s["step_time_s"] for s in profile["samples"]},
                       "peak_memory_bytes": {s["local_batch"]: s.get("peak_memory_bytes") for s in profile["samples"]}}
    return found


def _flops_per_token(cfg: Any) -> int:
    from trainers.models import build_model

    with torch.device("meta"):
        return build_model(cfg.model.name, cfg.model.kwargs).flops_per_token()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"


def markdown(results: dict[str, Any]) -> str:
    lines = [f"GPU step check on {results['device']}, torch {results['torch']}, {results.get('total_s', 0):.0f} s "
             "(`python -m benchmarks.gpu_step`).", ""]
    step = results.get("step")
    if step:
        lines += [f"GPT {step['model']}, local batch {step['local_batch']}: host sync inside TrainStep: "
                  f"{step['host_sync_in_step'] or 'none'}.", "", "| path | step (ms) | tokens/s | MFU |",
                  "|---|---:|---:|---:|"]
        for path in ("ours", "raw"):
            f = step[path]
            mfu = f"{100 * f['mfu']:.1f} %" if f["mfu"] is not None else "n/a"
            lines.append(f"| {path} | {1e3 * f['step_s']:.1f} | {f['tokens_per_s']:,.0f} | {mfu} |")
        lines += ["", f"ours/raw tokens/s: {step['ours_vs_raw_tokens_per_s']:.3f}", ""]
    for name, p in (results.get("profile") or {}).items():
        memory = ", ".join(f"{b}: {(m or 0) / 2**30:.1f} GiB" for b, m in p["peak_memory_bytes"].items())
        lines.append(f"- profile {name}: {p['gpu_seconds']} GPU-s, max local batch {p['max_local_batch']}, "
                     f"stopped {p['meta'].get('stopped_by_budget_at') or p['meta'].get('oom_at_local_batch') or '-'}; "
                     f"peak memory {memory}")
    for stage, error in results.get("errors", {}).items():
        lines.append(f"\n{stage} failed: {error}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--only", choices=("step", "profile"), help="run one stage")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.dry_run
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
    started = time.perf_counter()

    def stage(name: str, fn: Any) -> None:
        try:
            results[name] = fn()
        except Exception as exc:  # noqa: BLE001 - recorded; the next stage still runs
            import traceback

            traceback.print_exc()
            results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:2000]
        results["total_s"] = time.perf_counter() - started
        (out / "gpu_step.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (out / "gpu_step.md").write_text(markdown(results))

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        gpt = job("tiny_gpt", GPT2_SMALL if cuda else DRY_GPT, data, label="gpt")
        if args.only != "profile":
            stage("step", lambda: step_stage(gpt, device=torch.device("cuda" if cuda else "cpu"),
                                             steps=30 if cuda else 3, warmup=10 if cuda else 2,
                                             local_batch=16 if cuda else 4))
        ladder = ["training.global_batch_size=64"] if cuda else ["training.global_batch_size=8"]
        if args.only != "step":
            stage("profile", lambda: profile_stage({
                "synthetic_resnet": job("synthetic_resnet", [] if cuda else ["model.kwargs.width=8"], data),
                "tiny_gpt": job("tiny_gpt", [] if cuda else ["training.global_batch_size=8"], data),
                "gpt2_small": job("tiny_gpt", (GPT2_SMALL if cuda else DRY_GPT) + ladder, data, label="gpt"),
            }, budget_s=20.0))
    print(markdown(results))
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())
