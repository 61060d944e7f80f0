"""`make bench`: every benchmark, side by side with its bare alternative, in one run.

    python -m benchmarks.run [--only step,tracking,startup,parts,data,profiler,planner] [--repeats 3]

Order: the planner and the tracking cost (no Ray); cold starts while no Ray of ours runs; then one
local Ray for the warm start-ups, which are also the per-step runs, the data pipeline and the
profiler. Prints the
table and writes benchmarks/results/latest.json and latest.md (partial.* with --only). Exit 1 if
a benchmark failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from benchmarks.harness import LoadSampler, SectionResult, Workspace, setup_environment

SECTIONS = ("step", "tracking", "startup", "parts", "data", "profiler", "planner")
log = logging.getLogger("benchmarks")
T = TypeVar("T")


def _attempt(name: str, failures: dict[str, str], fn: Callable[[], T]) -> T | None:
    """Run one benchmark; a failure is noted (table, exit status 1) and the others still run."""
    started = time.perf_counter()
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        failures[name] = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        return None
    finally:
        log.warning("%s: %.0f s", name, time.perf_counter() - started)


def run(only: set[str], *, repeats: int, cold_repeats: int, ws: Workspace) -> dict[str, SectionResult]:
    from benchmarks import (
        bench_compile,
        bench_data,
        bench_planner,
        bench_profiler,
        bench_startup,
        bench_startup_parts,
        bench_step,
        bench_tracking,
    )
    from benchmarks.sessions import PATHS, interleaved, local_ray
    from benchmarks.workloads import CNN_STEP, RESNET_STEP, default_workloads

    results: dict[str, SectionResult | None] = {}
    failures: dict[str, str] = {}
    if "planner" in only:
        results["planner"] = _attempt("planner", failures, lambda: bench_planner.summarize(bench_planner.run()))
    CNN_STEP.prepare(ws)
    RESNET_STEP.prepare(ws)
    store_s = bench_startup.create_store(ws)
    if "tracking" in only:
        results["tracking"] = _attempt("tracking", failures, lambda: bench_tracking.measure(ws, repeats=repeats))
    cold = _attempt("startup", failures, lambda: bench_startup.measure_cold(ws, repeats=cold_repeats)) \
        if "startup" in only else None
    with local_ray() as address:
        # The warm start-ups and the per-step runs are the same runs: each starts a trainer anyway.
        paths, steps = (PATHS, bench_step.STEPS) if "step" in only else (("ours", "bare"), bench_startup.COLD_STEPS)
        warm = _attempt("step" if "step" in only else "startup", failures, lambda: interleaved(
            paths, CNN_STEP, ws, repeats=repeats, steps=steps, address=address, label="warm",
        )) if only & {"step", "startup"} else None
        if "step" in only and warm:
            results["step"] = bench_step.summarize(warm)
            resnet = _attempt("step (resnet)", failures, lambda: interleaved(
                ("ours", "raw", "bare"), RESNET_STEP, ws, repeats=repeats, steps=bench_step.RESNET_STEPS,
                address=address, label="resnet"))
            background = _attempt("step (background)", failures, lambda: bench_step.measure_background(
                RESNET_STEP, ws, repeats=repeats, steps=bench_step.RESNET_STEPS))
            if resnet:
                extra = bench_step.summarize_resnet(resnet, background)
                results["step"].rows += extra.rows
                results["step"].notes += extra.notes
                results["step"].details.update(extra.details)
        if "startup" in only and (warm or cold):
            results["startup"] = bench_startup.summarize(warm, cold, store_s=store_s)
        workloads = default_workloads()
        if "parts" in only:
            results["parts"] = _attempt("parts", failures, lambda: bench_startup_parts.measure(
                ws, workloads[:2], repeats=repeats))
        if "data" in only:
            results["data"] = _attempt("data", failures, lambda: bench_data.measure(ws, workloads))
        if "profiler" in only:
            results["profiler"] = _attempt("profiler", failures, lambda: bench_profiler.measure(ws, workloads))
            compile_cost = _attempt("profiler (compile)", failures, bench_compile.measure)
            if results["profiler"] and compile_cost:
                results["profiler"].rows += compile_cost.rows
                results["profiler"].details["compile"] = compile_cost.details
    sections = {}
    for name in SECTIONS:
        if name in only:
            section = results.get(name) or SectionResult()
            section.skipped = section.skipped or failures.get(name)
            sections[name] = section
    return sections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmarks side by side with the bare alternatives.")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of the warm runs (start-up and per-step), pairs of tracking blocks")
    parser.add_argument("--cold-repeats", type=int, default=1,
                        help="rounds of the cold starts (each starts and stops a whole Ray)")
    parser.add_argument("--workspace", help="keep scratch files (data, MLflow, logs) here instead of a temp folder")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        parser.error(f"--only: unknown {sorted(only - set(SECTIONS))}; choose from {', '.join(SECTIONS)}")
    logging.basicConfig(level=logging.WARNING, format="bench: %(message)s")
    setup_environment()

    from benchmarks import report

    started = time.perf_counter()
    with LoadSampler() as load, Workspace(Path(args.workspace) if args.workspace else None) as ws:
        sections = run(only, repeats=args.repeats, cold_repeats=args.cold_repeats, ws=ws)
    meta = {**report.environment(), "total_s": time.perf_counter() - started, "load_average_1m": load.summary(),
            "command": " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])])}
    report.print_table(sections, meta)
    # Only a run of everything replaces latest.* (what the README quotes).
    json_path, md_path = report.write(sections, meta, name="latest" if only == set(SECTIONS) else "partial")
    print(f"wrote {json_path.relative_to(json_path.parents[2])} and {md_path.relative_to(md_path.parents[2])}")
    failed = [name for name, s in sections.items() if (s.skipped or "").startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
