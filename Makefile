# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo proto lint bench gpu-check results check-results clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) -m examples.cartpole

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. \
		proto/evochi/v1/evochi.proto

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m benchmarks.orchestration --transport http2,grpcio
	$(PY) -m benchmarks.transport
	$(PY) -m benchmarks.adversarial
	$(PY) -m benchmarks.es_update
	$(PY) -m benchmarks.portable_update
	$(PY) -m benchmarks.population_forward
	$(PY) -m benchmarks.lowrank all
	$(PY) -m benchmarks.mujoco_limit
	$(PY) -m benchmarks.cartpole_solve

# The MuJoCo results table (env steps, wall-clock, core-minutes, fraction of the raw env.step
# speed) from the run directories under benchmarks/results/mujoco, and a re-evaluation of the
# committed best policies.
results: $(STAMP)
	$(PY) -m benchmarks.results_table table benchmarks/results/mujoco --plots --out benchmarks/results/mujoco/TABLE.md

check-results: $(STAMP)
	$(PY) -m benchmarks.mujoco --check HalfCheetah-v5

# CUDA-only tests, CartPole on cuda:0 and the device benchmarks; skips (exit 0) without a GPU.
gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check

clean:
	rm -rf $(VENV) .venv-interop runs .pytest_cache
