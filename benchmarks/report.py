"""The results: a rich table on the terminal, ``results/latest.md`` (quoted by the README) and
``results/latest.json`` (every figure, per repeat)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, RESULTS, Row, SectionResult, Stat

COLUMNS = ("Benchmark", "Measure", "Ours", "Baseline", "Ratio", "Goal", "Spread (min-max)", "n")
COMMAND = "make bench"


def fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 0.01:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return f"{value:.2g}"


def fmt_ratio(value: float) -> str:
    # Three decimals where the goals live (1.02, 1.10); magnitudes beyond.
    return f"{value:.3f}" if value < 10 else fmt(value)


def _stat(stat: Stat | None, unit: str) -> str:
    return "" if stat is None else f"{fmt(stat.median)} {unit}"


def _goal(row: Row) -> str:
    if not row.goal:
        return ""
    mark = {True: " (met)", False: " (missed)", None: ""}[row.met]
    return row.goal + mark


def cells(row: Row) -> tuple[str, ...]:
    spread_of = row.ratio or row.ours
    baseline = _stat(row.baseline, row.unit)
    if baseline and row.baseline_label:
        baseline += f" ({row.baseline_label})"
    ratio = f"{fmt_ratio(row.ratio.median)} {row.ratio_label}" if row.ratio else ""
    spread = f"{fmt(spread_of.lo)}-{fmt(spread_of.hi)}" if spread_of else ""
    n = str(spread_of.n) if spread_of else ""
    return (row.section, row.measure, _stat(row.ours, row.unit), baseline, ratio, _goal(row), spread, n)


def environment() -> dict[str, Any]:
    import ray
    import torch

    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "git_commit": _git_commit(),
    }


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def markdown(sections: dict[str, SectionResult], meta: dict[str, Any]) -> str:
    lines = [
        f"Measured with `{COMMAND}` on {meta['date']}: {meta['machine']}, torch {meta['torch']}, "
        f"Ray {meta['ray']}, commit {meta['git_commit']}; {meta['total_s']:.0f} s in all. Medians over "
        "repeats; every ratio is taken per repeat from runs made back to back, then its median shown. "
        f"The machine is shared: its 1-minute load average was {_load(meta)} during the run, so "
        "absolute figures drift and even ratios carry the noise shown in the spread column.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(("---", "---", "---:", "---:", "---:", "---", "---:", "---:")) + "|",
    ]
    for result in sections.values():
        for row in result.rows:
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells(row)) + " |")
    notes = _notes(sections)
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def _notes(sections: dict[str, SectionResult]) -> list[str]:
    notes = []
    for name, result in sections.items():
        if result.skipped:
            notes.append(f"{name}: {result.skipped}")
        notes += [f"{name}: {note}" for note in result.notes]
        notes += [f"{name}, {row.measure}: {row.note}" for row in result.rows if row.note]
    return list(dict.fromkeys(notes))


def _load(meta: dict[str, Any]) -> str:
    load = meta["load_average_1m"]
    return f"{load['min']:.1f}-{load['max']:.1f} (median {load['median']:.1f}) on {os.cpu_count()} cores"


def print_table(sections: dict[str, SectionResult], meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{COMMAND}: {meta['machine']}, {meta['total_s']:.0f} s, load average {_load(meta)}")
    for i, column in enumerate(COLUMNS):
        table.add_column(column, justify="right" if i in (2, 3, 4, 6, 7) else "left", overflow="fold")
    for result in sections.values():
        for row in result.rows:
            style = {True: "green", False: "red", None: None}[row.met]
            table.add_row(*cells(row), style=style)
    console = Console()
    if not console.is_terminal:  # make, CI logs: do not squeeze the table into 80 columns
        console.width = 200
    console.print(table)
    for note in _notes(sections):
        console.print(f"[dim]- {note}[/dim]", highlight=False)


def write(sections: dict[str, SectionResult], meta: dict[str, Any], *, name: str = "latest",
          folder: Path = RESULTS) -> tuple[Path, Path]:
    """NAME.json and NAME.md, each written to a .tmp file first and renamed into place."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": meta,
        "sections": {name: {"rows": [r.to_dict() for r in res.rows], "details": res.details,
                            "notes": res.notes, "skipped": res.skipped} for name, res in sections.items()},
    }
    paths = folder / f"{name}.json", folder / f"{name}.md"
    for path, text in zip(paths, (json.dumps(data, indent=2, default=str) + "\n", markdown(sections, meta))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths
