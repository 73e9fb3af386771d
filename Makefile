# Entry points for a new user: `make run`, `make test`, and `make shell` (a shell where `ecom` is on the PATH).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench bench-all install shell clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/ecom db upgrade
	$(BIN)/ecom run

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

# The static gate (.ci/run runs it before the tests): lint rules, formatting, types; config in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# A shell with the virtual environment active: `ecom ...` as written in README.md; `exit` leaves it.
shell: $(STAMP)
	@echo "ecom is on the PATH in this shell ($(abspath $(BIN))); type exit to leave it"
	@VIRTUAL_ENV="$(abspath $(VENV))" PATH="$(abspath $(BIN)):$$PATH" exec "$${SHELL:-/bin/sh}" -i

bench: $(STAMP)
	$(BIN)/python -m bench.actors

# Every benchmark (--quick runs; BENCH_ARGS=--full for full ones) -> var/bench/results.md, one markdown table.
bench-all: $(STAMP)
	$(BIN)/python -m bench.all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
