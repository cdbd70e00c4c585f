# `make install` then `make test` on a fresh machine. The venv lives in .venv at the repo root.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test test-all test-slurm check fmt run bench gpu-kit clean

install:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	# Take the local CPU torch first, so resolving the rest never pulls a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"

test:
	$(BIN)/python -m pytest -q -m "not slow" --durations=25 tests

test-all:
	$(BIN)/python -m pytest -q tests

# The SLURM tests on a real SLURM: the one answering here, else a two-node test bed (two slurmd on
# this host) started and stopped around them (needs root and `cluster/slurm/testbed install` once).
test-slurm:
	if sinfo >/dev/null 2>&1; then \
		$(BIN)/python -m pytest -q -m slow tests/cluster/test_slurm.py; \
	else \
		export SPD_RAY_SLURM_NODES=2 && eval "$$(cluster/slurm/testbed start)" && \
		SPD_RAY_TEST_SLURM=1 $(BIN)/python -m pytest -q -m slow tests/cluster/test_slurm.py; \
		status=$$?; cluster/slurm/testbed stop; exit $$status; \
	fi

check:
	$(BIN)/shellcheck cluster/slurm/ray.sbatch cluster/slurm/submit cluster/slurm/testbed benchmarks/gpu_kit.sh benchmarks/gpu_session.sh
	$(BIN)/ruff check spd_ray tests benchmarks cluster
	$(BIN)/ruff format --check spd_ray tests benchmarks cluster
	$(BIN)/mypy

fmt:
	$(BIN)/ruff format spd_ray tests benchmarks cluster
	$(BIN)/ruff check --fix spd_ray tests benchmarks cluster

run:
	$(BIN)/spd-ray run tms_5-2

bench:
	$(BIN)/spd-ray bench

# What benchmarks/gpu_session.sh needs on a lent GPU machine (README, "Checks on a GPU").
gpu-kit:
	PY=$(BIN)/python bash benchmarks/gpu_kit.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
