# Two entry points for a fresh machine (Python 3.11, nothing else): `make demo` and `make test`
# (which also starts the local services the integration tests use: Kafka, PostgreSQL, Redis).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_DIR ?= data/demo
DEMO_EVENTS ?= 10000
DEMO_PERSONS ?= 500

FUZZ_SECONDS ?= 60
FUZZ_DIR ?= data/fuzz

.PHONY: install demo test lint format bench fuzz services services-stop clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/cdi generate --events $(DEMO_EVENTS) --persons $(DEMO_PERSONS) --seed 7 --out $(DEMO_DIR)/events.ndjson
	$(BIN)/cdi run --config schemas/configs/example.yaml --input $(DEMO_DIR)/events.ndjson --output $(DEMO_DIR)/out

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Kafka (KRaft, from Maven jars), PostgreSQL and Redis (Debian packages) on loopback, no Docker;
# idempotent. A service whose tools are missing is skipped (and its tests skip) unless
# CDI_REQUIRE_SERVICES=1, as in CI. `infra/local/services.sh env` prints the addresses.
services:
	infra/local/services.sh start

services-stop:
	infra/local/services.sh stop

test: lint services
	$(BIN)/python -m pytest

# Coverage-guided fuzzing (atheris) of decode + validate + the pure per-event path, seeded with
# tests/corpus/; a crash leaves its input in $(FUZZ_DIR)/crash-* (add it to tests/corpus/).
fuzz: install
	$(BIN)/python -m pip install --quiet -e '.[dev,fuzz]'
	mkdir -p $(FUZZ_DIR)/corpus
	PYTHONPATH=. $(BIN)/python tests/atheris_validate.py -max_total_time=$(FUZZ_SECONDS) \
		-artifact_prefix=$(FUZZ_DIR)/ $(FUZZ_DIR)/corpus

bench: install
	$(BIN)/python -m benchmarks.run_benchmark

clean:
	rm -rf $(VENV) data *.egg-info .pytest_cache .ruff_cache
