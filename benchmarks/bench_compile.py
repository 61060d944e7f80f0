"""Compile cost of `training.compile`: a GPT-2-small-shaped GPT (12 blocks of width 768) compiled
per block in place (`trainers.step.compiled`, torchtitan's way) against the whole model compiled
at once (`torch.compile(model)`, what it did before), side by side.

Compiling is CPU work (tracing, inductor's code generation, the C++/Triton compiler), and it is
most of what profiling a compiled transformer costs: one GPU sits idle while it runs. Each run is
a fresh process with its own empty inductor cache, so neither reuses the other's kernels; the
figure is the first training step (compile + one step) and the median of the next ten steps,
three pairs interleaved.
Context 64 and local batch 2 keep the CPU steps short; compile time hardly depends on them.

    python -m benchmarks.bench_compile [--repeats 3]          # prints JSON
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

from benchmarks.harness import Row, SectionResult, Stat, child_env, paired_ratios

SECTION = "profiler"
GPT2_SHAPE = {"vocab_size": 256, "context": 64, "n_layer": 12, "n_head": 12, "n_embd": 768, "dropout": 0.0}
STEPS = 10
REPEATS = 3  # the steady CPU step is noisy on a shared machine: a median of three interleaved pairs

_CHILD = """
import json, sys, time, torch
from trainers.config import TrainingConfig
from trainers.models import build_model
from trainers.step import TrainStep, compiled, make_optimizer
whole = sys.argv[1] == "whole"
torch.manual_seed(0)
cfg = TrainingConfig(max_steps=1, compile=True)
model = build_model("gpt", json.loads(sys.argv[2]))
module = torch.compile(model) if whole else compiled(model, cfg)
step = TrainStep(module, make_optimizer(model, cfg), cfg=cfg, device=torch.device("cpu"))
tokens = torch.randint(0, 256, (2, 64))
times = []
for _ in range(1 + int(sys.argv[3])):
    start = time.perf_counter()
    step([(tokens, None)])
    times.append(time.perf_counter() - start)
print(json.dumps({"first_s": times[0], "step_s": sorted(times[1:])[len(times[1:]) // 2]}))
"""


def _run(variant: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"inductor-{variant}-") as cache:
        out = subprocess.run([sys.executable, "-c", _CHILD, variant, json.dumps(GPT2_SHAPE), str(STEPS)],
                             env=child_env(TORCHINDUCTOR_CACHE_DIR=cache), capture_output=True, text=True,
                             check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(repeats: int = REPEATS) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {"per_block": [], "whole": []}
    for _ in range(repeats):  # interleaved, so a slow spell of the machine hits both
        for variant in ("per_block", "whole"):
            results[variant].append(_run(variant))
    return results


def summarize(results: dict[str, list[dict[str, float]]]) -> SectionResult:
    ours, whole = results["per_block"], results["whole"]
    first = [r["first_s"] for r in ours]
    base = [r["first_s"] for r in whole]
    rows = [
        Row(section=SECTION, measure="compile a GPT-2-small-shaped GPT (12 x 768) on the CPU: first step",
            unit="s", ours=Stat.of(first), baseline=Stat.of(base), baseline_label="whole model compiled",
            ratio=paired_ratios(base, first), ratio_label="whole/per-block",
            note="per block in place (trainers.step.compiled); fresh process and inductor cache each"),
        Row(section=SECTION, measure="the same, median of the next steps", unit="s",
            ours=Stat.of([r["step_s"] for r in ours]), baseline=Stat.of([r["step_s"] for r in whole]),
            baseline_label="whole model compiled",
            ratio=paired_ratios([r["step_s"] for r in ours], [r["step_s"] for r in whole]),
            ratio_label="per-block/whole", note="CPU steps; the GPU step is benchmarks/gpu_step.py's"),
    ]
    return SectionResult(rows=rows, details=results)


def measure(repeats: int = REPEATS) -> SectionResult:
    return summarize(run(repeats))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=REPEATS)
    print(json.dumps(run(parser.parse_args().repeats), indent=2))
