# Switchboard: the two quick-start commands are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
BIN := $(VENV)/bin
DEMO_GOAL ?= What is 12*7 and what is Apache Kafka?
# The URLs tests use: the ones you exported, else the local servers `make infra-up` starts.
TEST_KAFKA := $(or $(KAFKA_BOOTSTRAP_SERVERS),127.0.0.1:9092)
TEST_REDIS := $(or $(REDIS_URL),redis://127.0.0.1:6379/0)

.PHONY: help deps demo test test-unit infra-up infra-down infra-status bench bench-memory typecheck

help:
	@echo "make demo        run a sample goal on the embedded defaults (no servers, no API key)"
	@echo "make test        start local Kafka + Redis, run every test against them, stop them"
	@echo "make test-unit   only the unit tests (no servers)"
	@echo "make typecheck   mypy --strict on schemas/, memory/ and services/runtime/"
	@echo "make infra-up    start local Kafka (KRaft) and Redis; make infra-down stops them"
	@echo "make bench       benchmark on the local Kafka and Redis with the offline model"
	@echo "make bench-memory  semantic memory quality per offline embedder, on seeded goal streams"

# Installs uv when missing, then the locked dependencies into .venv.
$(BIN)/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
	uv sync --frozen
	@touch $@

deps: $(BIN)/.synced

demo: deps
	$(BIN)/switchboard run "$(DEMO_GOAL)"

infra-up:
	bash compose/local/infra.sh up

infra-down:
	bash compose/local/infra.sh down

infra-status:
	bash compose/local/infra.sh status

test-unit: deps
	$(BIN)/pytest -m unit

# Type-checks, starts the infrastructure, runs the whole suite against it, and always stops it again.
test: typecheck
	bash compose/local/infra.sh up
	status=0; \
	KAFKA_BOOTSTRAP_SERVERS=$(TEST_KAFKA) REDIS_URL=$(TEST_REDIS) $(BIN)/pytest || status=$$?; \
	bash compose/local/infra.sh down; \
	exit $$status

bench: deps
	bash compose/local/infra.sh up
	status=0; \
	KAFKA_BOOTSTRAP_SERVERS=$(TEST_KAFKA) REDIS_URL=$(TEST_REDIS) $(BIN)/python -m tests.bench.pipeline || status=$$?; \
	bash compose/local/infra.sh down; \
	exit $$status

# Reports recall, conflicts, leaks, merges, lessons, context size and latency; misses do not fail it.
bench-memory: deps
	bash compose/local/infra.sh up
	status=0; \
	REDIS_URL=$(TEST_REDIS) $(BIN)/python -m tests.bench.memory || status=$$?; \
	bash compose/local/infra.sh down; \
	exit $$status

# The house style: strict typing on the contract, memory and the shared runtime.
typecheck: deps
	$(BIN)/mypy schemas memory services/runtime
