# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch and versions known to work together (see constraints.txt).
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt

export RAY_USAGE_STATS_ENABLED ?= 0
export GLOO_SOCKET_IFNAME ?= lo
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/orchestrator run configs/digits.yaml

test: $(STAMP)
	$(BIN)/python -m pytest tests -q --durations=12

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) runs data mlflow.db mlruns .pytest_cache
