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

.PHONY: install demo test lint format bench fuzz services services-stop prism clean

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

# Beam's Prism runner (a Go program) at the installed Beam's version, from the Go module proxy,
# into the venv (`cdi run --runner prism`). Skipped with a reason where Go is missing.
prism: install
	@if [ -x $(BIN)/prism ]; then echo "prism: $(BIN)/prism"; \
	elif command -v go >/dev/null; then \
	  v=$$($(BIN)/python -c 'import apache_beam; print(apache_beam.__version__)' 2>/dev/null); \
	  echo "prism: building github.com/apache/beam/sdks/v2/go/cmd/prism@v$$v"; \
	  GOBIN=$(abspath $(BIN)) go install github.com/apache/beam/sdks/v2/go/cmd/prism@v$$v; \
	elif [ "$$CDI_REQUIRE_SERVICES" = "1" ]; then echo "prism: no Go to build it" >&2; exit 1; \
	else echo "prism: skipped: no Go to build it (its tests skip)"; fi

services-stop:
	infra/local/services.sh stop

test: lint services prism
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
