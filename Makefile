# Two commands do all set-up on a fresh machine (Python 3.11 and apt available):
#   make demo   - virtualenv, install, run the monitored demo
#   make test   - virtualenv, install test needs, run the whole suite
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torchtitan cannot share the project venv (see pyproject's torchtitan extra): its tests and
# benchmark run in a second one holding the client, the collector and torchtitan.
TITAN_VENV  := .venv-titan
TITAN_PY    := $(TITAN_VENV)/bin/python
TITAN_STAMP := $(TITAN_VENV)/.installed
PROTO_SRC := proto/v1/telemetry.proto
PROTO_GEN := proto/v1/telemetry_pb2.py proto/v1/telemetry_pb2_grpc.py proto/v1/telemetry_pb2.pyi

.PHONY: all venv venv-titan sysdeps proto demo dashboard check lint test test-fast test-titan bench bench-adapters bench-peers bench-agents clean

all: venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,hf,lightning,test,dev,bench]'
	touch $(STAMP)

venv: $(STAMP)

$(TITAN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(TITAN_VENV)
	$(TITAN_PY) -m pip install -q --upgrade pip
	$(TITAN_PY) -m pip install -q -e '.[collector,torchtitan]' 'pytest>=8' 'pytest-timeout>=2.3'
	touch $(TITAN_STAMP)

venv-titan: $(TITAN_STAMP)

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

# tests/torchtitan runs in the torchtitan venv, after the rest of the suite.
test: $(STAMP) $(TITAN_STAMP) sysdeps
	$(PY) -m pytest -q tests --ignore=tests/torchtitan
	$(TITAN_PY) -m pytest -q tests/torchtitan

test-fast: $(STAMP) sysdeps
	$(PY) -m pytest -q -m "not slow" tests --ignore=tests/torchtitan

test-titan: $(TITAN_STAMP)
	$(TITAN_PY) -m pytest -q tests/torchtitan

bench: $(STAMP)
	$(PY) -m benchmarks.suite

# Monitored / plain step time of the shipped adapters (HF Mixtral here, torchtitan in its venv).
bench-adapters: $(STAMP) $(TITAN_STAMP)
	$(PY) -m benchmarks.adapter_overhead --family hf-mixtral
	$(TITAN_PY) -m benchmarks.adapter_overhead --family torchtitan

# stepwatch vs wandb (offline) and TensorBoard on one logging workload (~16 min on 2 shared cores),
# into benchmarks/PEERS.md; the peers come from the `bench` extra (installed by `make venv`, so
# the smoke test in tests/benchmarks runs in `make test`).
bench-peers: $(STAMP)
	$(PY) -m benchmarks.peers

# 512 simulated ranks direct, then through 64 node agents, in the same run (~1 minute).
bench-agents: $(STAMP)
	$(PY) -m benchmarks.agent_fanin --ranks 512 --agents 64 --metrics-per-step 102400 --steps 12

clean:
	rm -rf $(VENV) $(TITAN_VENV) runs artifacts .pytest_cache
