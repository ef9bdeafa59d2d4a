# Two commands on a fresh machine: `make sweep` and `make test`. Both create .venv from pyproject.toml.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SPEC ?= sweeps/quickstart.yaml

# Real images for tests and benchmarks when the shared data folder sits beside the checkout; optional.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)),)
export GRNN_DATA_ROOT ?= $(SHARED_DATA)
endif

# Ray: no usage reporting; tests run their embedded Ray without token auth in a temp dir of their own.
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv sweep report test test-slow test-faults lint bench clean cluster-test

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,audit]'
	touch $(STAMP)

sweep: $(STAMP)
	$(PY) -m orchestrator.sweep $(SPEC)
	$(PY) -m orchestrator.report results/$$(basename $(SPEC) .yaml)

report: $(STAMP)
	$(PY) -m orchestrator.report results/$$(basename $(SPEC) .yaml)

test: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -m "not slow and not faults" -q

test-slow: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -m slow -q

test-faults: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -m faults -q

lint: $(STAMP)
	$(PY) -m ruff check grnn_engine orchestrator tests benchmarks
	$(PY) -m mypy

# Both lab cluster paths run for real on this machine: a single-node Slurm running cluster/slurm/sweep.sbatch,
# and `ray up` of cluster/onprem.yaml over SSH to 127.0.0.1. Needs root (Debian packages); not part of `test`.
cluster-test: $(STAMP)
	PY=$(abspath $(PY)) bash cluster/test/cluster_test.sh

bench: $(STAMP)
	$(PY) benchmarks/engine.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
