"""Imports go one way: the orchestrator uses the trainers, never the reverse; the planner stays
pure (no Ray, no torch); the driver's controller and policies import neither Ray nor MLflow; no
source file grows much past 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def top_level(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def sources(*parts: str) -> list[Path]:
    base = ROOT.joinpath(*parts)
    return sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]


@pytest.mark.parametrize("path", sources("trainers"), ids=lambda p: str(p.relative_to(ROOT)))
def test_trainers_import_nothing_from_the_orchestrator(path: Path) -> None:
    assert "orchestrator" not in top_level(imported_modules(path))


@pytest.mark.parametrize("path", [p for part in (("orchestrator", "planner"),) for p in sources(*part)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_planner_imports_neither_ray_nor_torch(path: Path) -> None:
    assert not top_level(imported_modules(path)) & {"ray", "torch", "mlflow"}


@pytest.mark.parametrize("name", ["controller", "ending", "policies", "ports", "recorder", "result"])
def test_the_controller_and_its_policies_need_no_ray_and_no_mlflow(name: str) -> None:
    path = ROOT / "orchestrator" / "driver" / f"{name}.py"
    assert not top_level(imported_modules(path)) & {"ray", "mlflow"}


def test_the_controller_imports_without_ray_or_mlflow() -> None:
    import subprocess
    import sys

    code = ("import sys; import orchestrator.driver.controller, orchestrator.driver.policies; "
            "print(sorted(m for m in ('ray', 'mlflow', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_check_would_catch_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from orchestrator.config import JobConfig\n")
    assert "orchestrator" in top_level(imported_modules(bad))


MAX_LINES = 420  # the style guide's "no file over ~400 lines"


@pytest.mark.parametrize("folder", ["orchestrator", "trainers", "benchmarks", "tests"])
def test_no_python_file_is_much_over_400_lines(folder: str) -> None:
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concern: {long}"
