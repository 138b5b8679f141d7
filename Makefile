# Two commands do all set-up on a fresh machine (Python 3.11 and apt available):
#   make demo   - virtualenv, install, run the monitored demo
#   make test   - virtualenv, install test needs, run the whole suite
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTO_SRC := proto/v1/telemetry.proto
PROTO_GEN := proto/v1/telemetry_pb2.py proto/v1/telemetry_pb2_grpc.py proto/v1/telemetry_pb2.pyi

.PHONY: all venv sysdeps proto demo dashboard check lint test test-fast bench bench-peers clean

all: venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,test,dev]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the tests need (ClickHouse server and client, docker-compose, Chromium).
sysdeps:
	bash scripts/system-deps.sh

# Generated wire code is committed; this regenerates it with the pinned grpcio-tools.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO_SRC)

# The demo run injects an activation blow-up into one expert of the deepest MoE layer at step
# 150: the collector's detectors flag it and clamp it on the fly; the report explains it.
DEMO_FAULT ?= blowup@150:layer=8,expert=1
demo: $(STAMP)
	$(PY) scripts/demo.py $(if $(DEMO_FAULT),--inject $(DEMO_FAULT))

# The live dashboard on a store (default: the demo's).
STORE ?= parquet:runs/demo-store
dashboard: $(STAMP)
	$(PY) -m dashboard --store $(STORE) --server.headless true

# Lint, format and type gates (CI runs this before the tests; .pre-commit-config.yaml runs the same).
check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Rewrite what ruff can fix and format the tree.
lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: $(STAMP) sysdeps
	$(PY) -m pytest -q tests

test-fast: $(STAMP) sysdeps
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) -m benchmarks.suite

# stepwatch vs wandb (offline) and TensorBoard on one logging workload (~16 min on 2 shared cores),
# into benchmarks/PEERS.md; the peers come from the `bench` extra, installed on first use.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	touch $(BENCH_STAMP)

bench-peers: $(BENCH_STAMP)
	$(PY) -m benchmarks.peers

clean:
	rm -rf $(VENV) runs artifacts .pytest_cache
