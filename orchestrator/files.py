"""Reading the user's YAML and JSON files: a missing or malformed file is one line naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import UserError


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    return path


def read_yaml(path: str | Path, what: str) -> Any:
    """`yaml.safe_load` of a file (None when it is empty)."""
    path = _existing(path, what)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML{where}") from None


def read_json(path: str | Path, what: str) -> Any:
    path = _existing(path, what)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno})") from None
