"""What a submitted job runs first on the cluster: pick the Python that can run it, or say why none can.

Ray Jobs runs an entrypoint through the head's shell, so a bare ``python`` is whatever that shell's
PATH finds. A head started as ``.venv/bin/ray start`` without the environment on PATH runs Ray from
the venv but the job under the system Python (``No module named 'typer'``). The entry script
therefore tries, in order: ``$ORCH_PYTHON`` alone when it is set (on the head, or in the submitting
shell, which ships every ``ORCH_*`` variable); else the Python this node's Ray starts its workers
with (read from the raylet that started the job supervisor, the script's parent; Linux only), then
``python3`` and ``python`` on PATH. Each candidate is checked before use (Python >= 3.10 and the
project's packages importable, without importing them); when none passes, the job fails with one
line that names every candidate and what it lacks.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

# The entry script's name inside the job's working_dir.
ENTRY_FILE = "orchestrator-entry.sh"
# Import names of pyproject's runtime dependencies, and of the two packages shipped as py_modules.
REQUIRED_MODULES = ("ray", "torch", "mlflow", "pyarrow", "yaml", "pydantic", "typer", "rich", "psutil",
                    "matplotlib", "sklearn", "numpy", "orchestrator", "trainers")
# Runs under every candidate, however old: no f-strings, and double quotes only (the shell quotes it
# in single quotes). find_spec locates a package without importing it (torch alone takes seconds).
_CHECK = """\
import sys
if sys.version_info < (3, 10):
    sys.exit("Python %d.%d, the job needs >= 3.10" % sys.version_info[:2])
import importlib.util
missing = [m for m in MODULES if importlib.util.find_spec(m) is None]
sys.exit("cannot import " + ", ".join(missing) if missing else 0)
"""

_SCRIPT = """\
# Written by `orchestrator submit` (orchestrator/job_entry.py): run `python -m orchestrator "$@"`
# under a Python on this node that can run the job, or say in one line why there is none.
check='CHECK'
tried=""

ray_python() {
    # Our parent is Ray's job supervisor, a worker that the raylet started with the Python named in
    # its --python_worker_command (the interpreter Ray itself runs under).
    raylet=$(sed -n 's/^PPid:[[:space:]]*//p' "/proc/$PPID/status" 2>/dev/null)
    [ -n "$raylet" ] || return 0
    tr '\\0' '\\n' < "/proc/$raylet/cmdline" 2>/dev/null | sed -n 's/^--python_worker_command=//p' |
        sed 's/^"\\([^"]*\\)".*/\\1/;t;s/ .*//'
}

run_with() {  # run_with PYTHON ARGS...: exec PYTHON -m orchestrator ARGS if it passes the check
    py=$1
    shift
    [ -n "$py" ] || return 0
    if ! command -v "$py" >/dev/null 2>&1; then
        tried="$tried; $py: not found"
        return 0
    fi
    if reason=$("$py" -c "$check" 2>&1); then
        echo "orchestrator: running the job under $(command -v "$py")"
        exec "$py" -m orchestrator "$@"
    fi
    tried="$tried; $py: $(printf '%s\\n' "$reason" | tail -n 1)"
}

if [ -n "${ORCH_PYTHON:-}" ]; then
    run_with "$ORCH_PYTHON" "$@"
else
    run_with "$(ray_python)" "$@"
    run_with python3 "$@"
    run_with python "$@"
fi
echo "error: no Python on this node can run the job (${tried#; }); start Ray from the environment" \\
    "that has the project installed, or set ORCH_PYTHON to its python (see docs/cluster-jobs.md)" >&2
exit 2
"""


def entry_script() -> str:
    check = _CHECK.replace("MODULES", json.dumps(REQUIRED_MODULES))  # double quotes only
    return _SCRIPT.replace("CHECK", check)


def write_entry(folder: Path) -> Path:
    path = folder / ENTRY_FILE
    path.write_text(entry_script())
    return path


def entrypoint(args: list[str]) -> str:
    """The job's shell command: `exec` keeps Ray's job supervisor the script's parent."""
    return f"exec sh {ENTRY_FILE} {shlex.join(args)}"
